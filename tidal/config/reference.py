"""Generate the config reference page from the config models' field docstrings.

`python -m tidal.config.reference` rewrites the section between the markers in docs/config.md; a test checks
that the page is current, so the reference is never written twice by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tidal.config import RunConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "config.md"
"""The page that holds the reference: docs/config.md of the repository."""


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _submodels(a)]


def _value(value: Any) -> str:
    return f"`{value!r}`".replace("|", "\\|")


def _default(field: Any, instance: BaseModel | None, name: str) -> str:
    """The value a user gets by leaving the field out: the enclosing default instance's value
    when there is one (a section's default may differ from its class's), else the field's."""
    if instance is not None:
        return _value(getattr(instance, name))
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    return _value(field.get_default(call_default_factory=True))


def _default_instance(field: Any, instance: BaseModel | None, name: str) -> BaseModel | None:
    value = getattr(instance, name) if instance is not None else field.get_default(call_default_factory=True)
    return value if isinstance(value, BaseModel) else None


def reference_rows(
    model: type[BaseModel], prefix: str = "", seen: dict[type, str] | None = None, instance: BaseModel | None = None
) -> list[str]:
    """Rows of `model`'s fields with the defaults a user gets; a section model met again (e.g. an
    env's `data`) is one row that points to where its fields are listed; an optional section that is
    off by default is a row of its own before its fields. A tagged union (a field
    whose `type` picks a variant) is one row for `type` with its real default, then each variant's
    fields, marked with the `type` that selects them."""
    seen = {} if seen is None else seen
    rows = []
    for name, field in model.model_fields.items():
        subs = _submodels(field.annotation)
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        key = f"{prefix}{name}"
        if not subs:
            rows.append(f"| `{key}` | {_default(field, instance, name)} | {doc} |")
            continue
        current = _default_instance(field, instance, name)
        if len(subs) == 1 and subs[0] in seen:
            rows.append(f"| `{key}` | | {doc} Fields as under `{seen[subs[0]]}`. |")
            continue
        if len(subs) == 1:
            seen[subs[0]] = key
            if field.default is None:  # an optional section, off unless given: its own row, then its fields
                rows.append(f"| `{key}` | {_default(field, instance, name)} | {doc} |")
            rows.extend(reference_rows(subs[0], f"{key}.", seen, current))
            continue
        tags = [sub.model_fields["type"].default for sub in subs]
        chosen = _value(current.type) if current is not None else "required"
        if not all(f"`{t}`" in doc for t in tags):
            doc += f" One of {', '.join(f'`{t}`' for t in tags)}."
        rows.append(f"| `{key}.type` | {chosen} | {doc} |")
        for sub, tag in zip(subs, tags, strict=True):
            variant_doc = " ".join((sub.model_fields["type"].description or "").split()).replace("|", "\\|")
            rows.append(f"| `{key}` with type `{tag}` | | {variant_doc} |")
            mine = current if current is not None and current.type == tag else None
            fields = reference_rows(sub, f"{key}.", seen, mine)
            rows.extend(row for row in fields if not row.startswith(f"| `{key}.type` |"))
    return rows


def reference() -> str:
    head = "| key | default | meaning |\n|---|---|---|"
    return "\n".join([BEGIN, head, *reference_rows(RunConfig), END])


def update_page(path: Path = PAGE) -> bool:
    """Rewrite the reference section of `path` (between `BEGIN` and `END`); True when the file changed."""
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + reference() + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    page = Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE
    changed = update_page(page)
    name = sys.argv[1] if len(sys.argv) > 1 else "docs/config.md"
    print(f"{name} config reference " + ("updated" if changed else "already current"))
