"""Generate the README's config reference from the config models' field docstrings.

`python -m tidal.docs` rewrites the section between the markers in README.md; a test checks that
the README is current, so the reference is never written twice by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tidal.config import RunConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _submodels(a)]


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return ""
    return f"`{field.default!r}`".replace("|", "\\|")


def reference_rows(model: type[BaseModel], prefix: str = "", seen: dict[type, str] | None = None) -> list[str]:
    """Rows of `model`'s fields; a section model met again (e.g. an env's `data`) is one row that
    points to where its fields are listed."""
    seen = {} if seen is None else seen
    rows = []
    for name, field in model.model_fields.items():
        subs = _submodels(field.annotation)
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        if not subs:
            rows.append(f"| `{prefix}{name}` | {_default(field)} | {doc} |")
            continue
        if len(subs) == 1 and subs[0] in seen:
            rows.append(f"| `{prefix}{name}` | {_default(field)} | {doc} Fields as under `{seen[subs[0]]}`. |")
            continue
        if len(subs) == 1:
            seen[subs[0]] = f"{prefix}{name}"
        for sub in subs:
            tag = sub.model_fields.get("type")
            # Variants of a tagged union are listed under the `type` value that selects them.
            sub_prefix = f"{prefix}{name}."
            if tag is not None and len(subs) > 1:
                rows.append(f"| `{prefix}{name}` (type `{tag.default}`) | | {doc} |")
            rows.extend(reference_rows(sub, sub_prefix, seen))
    return rows


def reference() -> str:
    head = "| key | default | meaning |\n|---|---|---|"
    return "\n".join([BEGIN, head, *reference_rows(RunConfig), END])


def update_readme(path: Path) -> bool:
    """Rewrite the reference section of `path`; True when the file changed."""
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + reference() + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README.md config reference " + ("updated" if changed else "already current"))
