"""The typed config tree of a run: one pydantic model per component, YAML loading, dotted overrides.

Every field has a docstring (used to generate the README's field reference), unknown keys are
rejected with their full dotted path, and every user mistake surfaces as a `ConfigError` whose
message is one line that says what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a config file or override; the CLI prints it as one line and exits 2."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------------- model


DEFAULT_PRESET = "tiny-qwen3-moe"


class ModelConfig(Strict):
    path: str | None = None
    """A Hugging Face causal-LM directory (save_pretrained format, with its tokenizer). Exclusive with `preset`."""
    preset: Literal["tiny-glm4-moe", "tiny-glm5-moe", "tiny-qwen3-moe"] | None = None
    """A tiny MoE built from config for CPU work (`tiny-qwen3-moe` when `path` is unset):
    GLM-4.5 (`glm4_moe`), GLM-5 (`glm_moe_dsa`, with
    DeepSeek sparse attention) or Qwen3-MoE, with a character-level tokenizer built in-process."""
    init_seed: int = 0
    """Seed of the random initialisation of a preset (presets are cached per name and seed)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the rollout engine runs the model in. The trainer's precision is `trainer.precision`."""

    @model_validator(mode="before")
    @classmethod
    def _default_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is None and data.get("preset") is None:
            data = {**data, "preset": DEFAULT_PRESET}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path is not None and self.preset is not None:
            raise ValueError("set only one of model.path (a HF checkpoint directory) or model.preset")
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(f"model.path {self.path!r} is not a directory; point it at a save_pretrained folder")
        return self


# ----------------------------------------------------------------------------------------------- data


class ArithmeticData(Strict):
    type: Literal["arithmetic"] = "arithmetic"
    """Built-in synthetic arithmetic: prompts like `12+7=`, answers checked exactly."""
    digits: int = Field(2, ge=1, le=6)
    """Difficulty knob: the largest number of digits of an operand."""
    num_operands: int = Field(2, ge=2, le=4)
    """Difficulty knob: operands per problem."""
    ops: list[Literal["+", "-", "*"]] = ["+", "-"]
    """Operators to draw from."""
    train_size: int = Field(20000, ge=1)
    """Problems in the train split."""
    eval_size: int = Field(200, ge=1)
    """Problems in the held-out split (disjoint from train)."""
    seed: int = 1234
    """Seed of the generator; the same seed gives the same splits."""


class FileData(Strict):
    type: Literal["files"] = "files"
    """Prompts from local json / jsonl / parquet files, read through HF `datasets`."""
    train_files: list[str]
    """Files of the train split."""
    eval_files: list[str] = []
    """Files of the held-out split (empty: no held-out evaluation)."""
    prompt_field: str = "prompt"
    """Column holding the prompt text."""
    answer_field: str = "answer"
    """Column holding the reference answer."""
    metadata_fields: list[str] = []
    """Extra columns carried with each row (e.g. for reward functions)."""

    @model_validator(mode="after")
    def _files_exist(self) -> FileData:
        for f in [*self.train_files, *self.eval_files]:
            if not Path(f).is_file():
                raise ValueError(f"data file {f!r} does not exist")
            if Path(f).suffix not in (".json", ".jsonl", ".parquet"):
                raise ValueError(f"data file {f!r}: expected a .json, .jsonl or .parquet file")
        return self


class DataConfig(Strict):
    source: Annotated[ArithmeticData | FileData, Field(discriminator="type")] = ArithmeticData()
    """Where prompts come from; `type` picks the variant (`arithmetic` or `files`)."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (user turn + generation prompt)."""
    max_prompt_tokens: int = Field(256, ge=1)
    """Prompts longer than this many tokens are an error rather than silently cut."""


# -------------------------------------------------------------------------------------------- rollout


class RolloutConfig(Strict):
    engine: Literal["transformers"] = "transformers"
    """Generation engine. `transformers` runs on CPU or GPU."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 is greedy. Behavior log-probs are of logits / temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens (0: no limit)."""
    max_new_tokens: int = Field(16, ge=1)
    """Largest number of generated tokens per completion."""
    stop: list[str] = []
    """Stop strings: generation of a completion ends after the token that completes one."""
    batch_size: int = Field(64, ge=1)
    """Prompts generated together in one batch."""


# -------------------------------------------------------------------------------------------- trainer


class ScheduleConfig(Strict):
    type: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 over this many optimizer steps."""
    total_steps: int | None = Field(None, ge=1)
    """Steps the decay spans (default: the run's number of steps)."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the decay as a fraction of `lr`."""


class TrainerConfig(Strict):
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage (0-3)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision. bf16 keeps fp32 master weights in the optimizer."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward/backward on one rank."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step; the global batch is
    micro_batch_size x grad_accum x world size."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Learning-rate schedule."""
    backend: Literal["gloo", "nccl"] | None = None
    """torch.distributed backend (default: nccl with CUDA, gloo otherwise)."""


# ------------------------------------------------------------------------------------------ sft, eval


class SFTConfig(Strict):
    steps: int = Field(300, ge=1)
    """Optimizer steps of supervised fine-tuning."""
    log_every: int = Field(10, ge=1)
    """Log training metrics every this many steps."""


class EvalConfig(Strict):
    num_samples: int | None = Field(None, ge=1)
    """Held-out problems to evaluate (default: the whole held-out split)."""
    max_new_tokens: int = Field(16, ge=1)
    """Largest number of tokens of a greedy answer."""


class MonitorConfig(Strict):
    wandb: Literal["online", "offline", "disabled"] = "offline"
    """wandb mode; `online` needs WANDB_API_KEY, `offline` writes under the run directory."""
    project: str = "tidal"
    """wandb project."""


# ------------------------------------------------------------------------------------------------ run


class RunConfig(Strict):
    name: str = "run"
    """Run name; outputs go to `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed of sampling, data order and dropout."""
    model: ModelConfig = ModelConfig()
    """The policy model."""
    data: DataConfig = DataConfig()
    """Prompt data."""
    rollout: RolloutConfig = RolloutConfig()
    """Generation."""
    trainer: TrainerConfig = TrainerConfig()
    """DeepSpeed trainer."""
    sft: SFTConfig = SFTConfig()
    """Supervised fine-tuning stage (`tidal sft`)."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation."""
    monitor: MonitorConfig = MonitorConfig()
    """Metrics sinks."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings into (path, value); values are parsed as YAML (`1e-3`, `true`, `[1, 2]`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string; users mean a number
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
            except ValueError:
                pass
        parsed.append((key, value))
    return parsed


def _dotted_loc(loc: tuple[int | str, ...], tree: Any) -> str:
    """The user's key path of an error location, without the union tags pydantic inserts."""
    parts, node = [], tree
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # a discriminated union's tag, not a key the user wrote
        parts.append(f"[{part}]" if isinstance(part, int) else str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts).replace(".[", "[")


def _format_error(err: ValidationError, tree: dict[str, Any]) -> str:
    unknown, parts = [], []
    for e in err.errors():
        loc = _dotted_loc(e["loc"], tree)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            unknown.append(f"'{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing config key '{loc}'")
        elif isinstance(e.get("input"), dict) or not loc:
            parts.append(msg)
        else:
            parts.append(f"config key '{loc}': {msg} (got {e.get('input')!r})")
    if unknown:
        parts.insert(
            0,
            f"unknown config key {', '.join(unknown)} (check the spelling; `tidal check` prints the known keys)",
        )
    return "; ".join(parts)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when `path` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config sections, got {type(loaded).__name__}")
        tree = loaded or {}
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_dotted(tree, key, value)
    # A preset override replaces a path from the file (and vice versa), as a user expects.
    model = tree.get("model")
    if isinstance(model, dict) and parsed:
        keys = {k for k, _ in parsed}
        if "model.preset" in keys and "model.path" not in keys:
            model.pop("path", None)
        if "model.path" in keys and "model.preset" not in keys:
            model.pop("preset", None)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, tree)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
