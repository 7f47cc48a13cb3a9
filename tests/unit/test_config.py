from pathlib import Path

import pytest

from tidal.config import ConfigError, FileData, RunConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "examples").rglob("*.yaml"))

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.name


def test_shipped_configs_exist() -> None:
    assert any(p.name == "sft_arithmetic.yaml" for p in SHIPPED)


def test_defaults_without_file() -> None:
    cfg = load_config(None)
    assert cfg.model.preset == "tiny-qwen3-moe" and cfg.model.path is None
    assert cfg.trainer.zero_stage == 0


def test_dotted_overrides_any_depth(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs/sft_arithmetic.yaml",
        [
            "trainer.lr=2e-5",
            "model.preset=tiny-glm4-moe",
            "trainer.schedule.warmup_steps=7",
            "rollout.stop=[x, y]",
        ],
    )
    assert cfg.trainer.lr == pytest.approx(2e-5)
    assert cfg.model.preset == "tiny-glm4-moe"
    assert cfg.trainer.schedule.warmup_steps == 7
    assert cfg.rollout.stop == ["x", "y"]


def test_path_override_replaces_preset(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/sft_arithmetic.yaml", [f"model.path={tmp_path}"])
    assert cfg.model.path == str(tmp_path) and cfg.model.preset is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.lrr=1", "unknown config key 'trainer.lrr'"),
        ("trainer.lr=abc", "config key 'trainer.lr'"),
        ("trainer.zero_stage=4", "config key 'trainer.zero_stage': Input should be less than or equal to 3"),
        ("data.source.digits=9", "config key 'data.source.digits'"),
        ("model.preset=gpt5", "config key 'model.preset'"),
        ("nonsense", "is not of the form key.path=value"),
        ("trainer.lr.x=1", "trainer.lr is a value, not a section"),
        ("rollout.engine=sglang", "config key 'rollout.engine'"),
        ("rollout.vllm.kv_cache_gb=0", "config key 'rollout.vllm.kv_cache_gb'"),
        ("trainer.offload_optimizer=true", "trainer.offload_optimizer needs trainer.zero_stage >= 1"),
        ("trainer.offload_params=true", "trainer.offload_params needs trainer.zero_stage=3"),
        ("trainer.max_tokens_per_micro_batch=0", "config key 'trainer.max_tokens_per_micro_batch'"),
        ("trainer.packing=true", "trainer.packing needs trainer.max_tokens_per_micro_batch"),
    ],
)
def test_bad_overrides_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/sft_arithmetic.yaml", [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_nested_key_in_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  schedule:\n    warmup: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.schedule.warmup'"):
        load_config(f)


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("trainer: [1,\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)


def test_missing_data_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data file '.*nope.jsonl' does not exist"):
        load_config(None, ["data.source.type=files", f"data.source.train_files=[{tmp_path}/nope.jsonl]"])
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ConfigError, match="expected a .json, .jsonl or .parquet"):
        load_config(None, ["data.source.type=files", f"data.source.train_files=[{csv}]"])


def test_model_path_must_exist_and_excludes_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(None, [f"model.path={tmp_path}/none"])
    f = tmp_path / "c.yaml"
    f.write_text(f"model:\n  path: {tmp_path}\n  preset: tiny-glm4-moe\n")
    with pytest.raises(ConfigError, match="set only one of model.path"):
        load_config(f)


def test_parse_overrides_types() -> None:
    assert parse_overrides(["a.b=1", "a.c=1e-3", "a.d=true", "a.e=[1, 2]", "a.f=hello", "a.g="]) == [
        ("a.b", 1),
        ("a.c", 1e-3),
        ("a.d", True),
        ("a.e", [1, 2]),
        ("a.f", "hello"),
        ("a.g", ""),
    ]


def test_every_field_has_a_docstring() -> None:
    """The field reference (docs/config.md) is generated from these; an undocumented field is a bug."""
    from pydantic import BaseModel

    seen: set[type] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            for sub in _models_in(field.annotation):
                walk(sub, f"{prefix}{name}.")

    walk(RunConfig, "")
    assert FileData in seen


def _models_in(annotation: object) -> list[type]:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def test_docs_config_reference_is_current() -> None:
    from tidal.config.reference import BEGIN, END, reference

    text = (REPO / "docs" / "config.md").read_text()
    section = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert section == reference(), "docs/config.md's config reference is stale: run `python -m tidal.config.reference`"


def test_reference_shows_the_defaults_a_user_gets() -> None:
    """A tagged union's `type` row shows the variant chosen by default (not each variant's own tag),
    and only the default variant's fields carry the default instance's values."""
    from tidal.config.reference import reference_rows

    rows = reference_rows(RunConfig)
    (correction,) = [r for r in rows if r.startswith("| `algorithm.loss.correction.type` |")]
    assert "| `'tis'` |" in correction and "`mask`" in correction
    (transport,) = [r for r in rows if r.startswith("| `weight_sync.transport.type` |")]
    assert "| `'object_store'` |" in transport
    assert not any(r.startswith("| `algorithm.loss.correction.type` | `'none'`") for r in rows)
    assert sum(r.startswith("| `algorithm.loss.correction` with type") for r in rows) == 4


def test_over_sampling_needs_streaming() -> None:
    with pytest.raises(ConfigError, match="filter.max_oversample needs streaming rollout"):
        load_config(None, ["rollout.deterministic=true", "filter.max_oversample=0.5"])
    cfg = load_config(None, ["filter.max_oversample=0.5", "rollout.prompts_per_step=10"])
    assert cfg.oversample_per_batch == 5 and load_config(None, []).oversample_per_batch == 0


def test_a_warm_start_is_named_by_the_settings_set_away_from_their_defaults(tmp_path: Path) -> None:
    """A key written at its default (as every key tidal adds later is) keeps a cached warm start's
    name; a setting that changes the weights gives another."""
    from tidal.model.loading import warm_start_dir

    base = (REPO / "configs/sft_arithmetic.yaml").read_text()
    same, other = tmp_path / "a" / "sft_arithmetic.yaml", tmp_path / "b" / "sft_arithmetic.yaml"
    same.parent.mkdir()
    other.parent.mkdir()
    same.write_text(base + "\nseed: 0\n")
    other.write_text(base + "\nseed: 1\n")
    assert load_config(same).seed == 0  # the default, written out
    assert warm_start_dir(same) == warm_start_dir(REPO / "configs/sft_arithmetic.yaml")
    assert warm_start_dir(other) != warm_start_dir(REPO / "configs/sft_arithmetic.yaml")
