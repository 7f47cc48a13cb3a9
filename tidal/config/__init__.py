"""The typed config tree of a run: one pydantic model per component, YAML loading, dotted overrides.

Every field has a docstring (used to generate the README's field reference), unknown keys are
rejected with their full dotted path, and every user mistake surfaces as a `ConfigError` whose
message is one line that says what to change. Sections live in `base` (model, data, rollout,
trainer, loop), `rl` (weight sync, algorithm, filters, rewards, envs) and `run` (the whole tree);
`loading` reads YAML and overrides.
"""

from tidal.config.base import (
    DEFAULT_PRESET,
    AdaptiveStaleness,
    ArithmeticData,
    ConfigError,
    DataConfig,
    EvalConfig,
    FileData,
    ModelConfig,
    MonitorConfig,
    RayConfig,
    RolloutConfig,
    ScheduleConfig,
    SFTConfig,
    Strict,
    TrainConfig,
    TrainerConfig,
    VLLMConfig,
)
from tidal.config.loading import dump_config, load_config, parse_overrides
from tidal.config.rl import (
    AlgorithmConfig,
    BehaviorCorrection,
    BroadcastSync,
    ClipTrustRegion,
    Correction,
    DiskSync,
    EnvSpec,
    FilterConfig,
    KLConfig,
    LossConfig,
    M2POTrustRegion,
    MaskCorrection,
    NoCorrection,
    ObjectStoreSync,
    RewardsConfig,
    RewardSpec,
    TISCorrection,
    TrustRegion,
    WeightSyncConfig,
)
from tidal.config.run import RunConfig

__all__ = [
    "DEFAULT_PRESET", "AdaptiveStaleness", "AlgorithmConfig", "ArithmeticData", "BehaviorCorrection", "BroadcastSync",
    "ClipTrustRegion", "ConfigError", "Correction", "DataConfig", "DiskSync", "EnvSpec", "EvalConfig", "FileData",
    "FilterConfig", "KLConfig", "LossConfig", "M2POTrustRegion", "MaskCorrection", "ModelConfig", "MonitorConfig",
    "NoCorrection", "ObjectStoreSync", "RayConfig", "RewardSpec", "RewardsConfig", "RolloutConfig", "RunConfig",
    "SFTConfig", "ScheduleConfig", "Strict", "TISCorrection", "TrainConfig", "TrainerConfig", "TrustRegion",
    "VLLMConfig", "WeightSyncConfig", "dump_config", "load_config", "parse_overrides",
]  # fmt: skip
