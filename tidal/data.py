"""Prompt data: the built-in arithmetic task and local json / jsonl / parquet files, through HF `datasets`.

A row is a plain mapping with at least `prompt` and `answer` (strings); configured metadata columns
ride along for reward functions.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from tidal.config import ArithmeticData, ConfigError, CountingData, DataConfig, FileData

if TYPE_CHECKING:  # imported where data is loaded: a rollout worker, which only encodes texts, starts
    # without `datasets` and the pandas it brings (about a second of its start-up on two cores).
    from datasets import Dataset

_INT = re.compile(r"\s*(-?\d+)")


# ------------------------------------------------------------------------------------------ arithmetic


def _problem(rng: random.Random, cfg: ArithmeticData) -> tuple[str, str]:
    hi = 10**cfg.digits - 1
    operands = [rng.randint(0, hi) for _ in range(cfg.num_operands)]
    ops = [rng.choice(cfg.ops) for _ in range(cfg.num_operands - 1)]
    expr = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:], strict=True))
    # eval is safe here: the string is built from integers and operators above.
    return f"{expr}=", str(eval(expr))  # noqa: S307


def arithmetic_splits(cfg: ArithmeticData) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out problems; held-out problems never appear in train."""
    rng = random.Random(cfg.seed)
    space = (10**cfg.digits) ** cfg.num_operands * len(cfg.ops) ** (cfg.num_operands - 1)
    if cfg.eval_size > space // 2:
        raise ConfigError(
            f"data.source.eval_size={cfg.eval_size} is more than half of the {space} distinct problems; "
            "raise data.source.digits or lower eval_size"
        )

    def draw() -> dict[str, str]:
        p, a = _problem(rng, cfg)
        return {"prompt": p, "answer": a}

    return disjoint_splits(draw, cfg.train_size, cfg.eval_size, "arithmetic")


def disjoint_splits(
    draw: Callable[[], dict[str, Any]], train_size: int, eval_size: int, task: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`eval_size` distinct held-out rows (by prompt), then `train_size` train rows whose prompts are
    not held out, in the order `draw` makes them; fails in one line when too few distinct prompts come."""
    held: dict[str, dict[str, Any]] = {}
    for _ in range(100 * eval_size):
        if len(held) == eval_size:
            break
        row = draw()
        held.setdefault(row["prompt"], row)
    else:
        raise ConfigError(f"data.source: fewer than eval_size={eval_size} distinct {task} problems; lower it")
    train = []
    while len(train) < train_size:
        row = draw()
        if row["prompt"] not in held:
            train.append(row)
    return train, list(held.values())


# ------------------------------------------------------------------------------------------ counting


def _count(rng: random.Random, cfg: CountingData) -> dict[str, Any]:
    n = max(1, min(cfg.max_count, round(rng.lognormvariate(math.log(cfg.median_count), cfg.sigma))))
    a = rng.randint(0, cfg.max_value + 1 - n)
    answer = " ".join(str(x) for x in range(a, a + n))
    return {"prompt": f"count {a} to {a + n - 1}:", "answer": answer, "max_new_tokens": len(answer) + cfg.slack}


def counting_splits(cfg: CountingData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and held-out counting problems; held-out problems never appear in train."""
    rng = random.Random(cfg.seed)
    return disjoint_splits(lambda: _count(rng, cfg), cfg.train_size, cfg.eval_size, "counting")


def parse_int_answer(completion: str) -> int | None:
    m = _INT.match(completion)
    return int(m.group(1)) if m else None


def exact_match(completion: str, answer: str) -> bool:
    """Exact verifier: the completion, up to its end, is the answer (surrounding spaces allowed).

    Used for the arithmetic task, whose answers are unique integers written one way."""
    return completion.strip() == answer.strip()


# ---------------------------------------------------------------------------------------------- files


def _load_files(files: list[str], cfg: FileData, split: str) -> Dataset:
    import datasets
    from datasets import Value, load_dataset

    datasets.disable_progress_bars()

    suffixes = {Path(f).suffix for f in files}
    builder = "parquet" if suffixes == {".parquet"} else "json"
    if builder == "json" and ".parquet" in suffixes:
        raise ConfigError(f"data.source.{split}_files mixes parquet and json files; use one format per split")
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"data file {f!r} does not exist")
    try:
        ds = load_dataset(builder, data_files=[str(Path(f).resolve()) for f in files], split="train")
    except Exception as e:  # datasets raises many types for a malformed file; the user needs one line.
        raise ConfigError(f"cannot read data.source.{split}_files {files}: {type(e).__name__}: {e}") from None
    needed = [cfg.prompt_field, cfg.answer_field, *cfg.metadata_fields]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"data.source.{split}_files: column(s) {missing} not found; the files have {ds.column_names} "
            "(set data.source.prompt_field / answer_field / metadata_fields)"
        )
    renames = {cfg.prompt_field: "prompt", cfg.answer_field: "answer"}
    ds = ds.select_columns(needed)
    ds = ds.rename_columns({k: v for k, v in renames.items() if k != v})
    for col in ("prompt", "answer"):
        if ds.features[col] != Value("string"):
            ds = ds.cast_column(col, Value("string"))
    return ds


def load_splits(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) HF datasets for the configured source; held-out is None when there is none."""
    from datasets import Dataset

    src = cfg.source
    if isinstance(src, ArithmeticData):
        train, held = arithmetic_splits(src)
        return Dataset.from_list(train), Dataset.from_list(held)
    if isinstance(src, CountingData):
        train, held = counting_splits(src)
        return Dataset.from_list(train), Dataset.from_list(held)
    train_ds = _load_files(src.train_files, src, "train")
    eval_ds = _load_files(src.eval_files, src, "eval") if src.eval_files else None
    return train_ds, eval_ds


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> str:
    """The text the model sees for `prompt` (optionally wrapped in the tokenizer's chat template)."""
    if not chat_template:
        return prompt
    if tokenizer.chat_template is None:
        raise ConfigError("data.chat_template is true but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_prompts(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: DataConfig) -> list[list[int]]:
    """Token ids of each row's prompt; a prompt over `data.max_prompt_tokens` is an error, not a cut."""
    return encode_texts(tokenizer, [row["prompt"] for row in rows], cfg)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], cfg: DataConfig) -> list[list[int]]:
    """Token ids of each prompt text (chat template applied per `cfg`); over `max_prompt_tokens` is an error."""
    out = []
    for text in texts:
        ids = tokenizer(format_prompt(tokenizer, text, cfg.chat_template), add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            raise ConfigError(
                f"a prompt has {len(ids)} tokens > data.max_prompt_tokens={cfg.max_prompt_tokens}: {text[:60]!r}..."
            )
        out.append(ids)
    return out


@dataclass(frozen=True)
class Room:
    """The model positions a prompt shares with what is generated after it: `new_tokens` (the
    setting `key`), within `positions` (whose origin `limit` names, e.g. "the model's
    max_position_embeddings")."""

    new_tokens: int
    key: str
    positions: int
    limit: str


def check_prompt_lengths(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], cfg: DataConfig, split: str, room: Room | None = None
) -> int:
    """Fail, naming the file and row, on the first prompt text of `split` ("train" or "eval", one
    text per row of that split) longer than `data.max_prompt_tokens` after the chat template, or,
    with `room`, too long to leave the model positions for its completion. The longest prompt's
    tokens (0 without any)."""
    formatted = [format_prompt(tokenizer, t, cfg.chat_template) for t in texts]
    lengths = [len(ids) for ids in tokenizer(formatted, add_special_tokens=False)["input_ids"]] if texts else []
    for i, n in enumerate(lengths):
        if n > cfg.max_prompt_tokens:
            where, limit = _row_origin(cfg.source, split, i), cfg.max_prompt_tokens
            raise ConfigError(
                f"{where}: the prompt has {n} tokens > data.max_prompt_tokens={limit}; raise "
                "data.max_prompt_tokens or shorten the row"
            )
        if room is not None and n + room.new_tokens > room.positions:
            where, key = _row_origin(cfg.source, split, i), f"{room.key}={room.new_tokens}"
            raise ConfigError(
                f"{where}: the prompt has {n} tokens, and {key} more make {n + room.new_tokens} > "
                f"{room.limit}={room.positions}; lower {room.key} or shorten the row"
            )
    return max(lengths, default=0)


def _row_origin(src: ArithmeticData | CountingData | FileData, split: str, index: int) -> str:
    """Where row `index` of a split comes from: its file and 1-based row (found only on an error)."""
    if not isinstance(src, FileData):
        return f"{src.type} {split} problem {index}"
    files = src.train_files if split == "train" else src.eval_files
    for f in files:
        n = len(_load_files([f], src, split))
        if index < n:
            return f"data file {f} row {index + 1}"
        index -= n
    return f"data.source.{split}_files row {index + 1}"
