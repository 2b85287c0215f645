"""Config schema (dataclasses), validation and Hydra loading."""

from moe_vlm.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    LogConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    ProjectorConfig,
    RoutingConfig,
    RunConfig,
    TrainConfig,
    UpcycleConfig,
    VisionConfig,
)
from moe_vlm.config.validation import validate

__all__ = [
    "Config", "ConfigError", "DataConfig", "LogConfig", "ModelConfig", "MoEConfig", "ParallelConfig",
    "ProjectorConfig", "RoutingConfig", "RunConfig", "TrainConfig", "UpcycleConfig", "VisionConfig", "validate", "load_config",
    "config_dir", "config_from_file", "apply_overrides",
]


def __getattr__(name: str):  # keep hydra out of `import moe_vlm.config` until needed
    if name in ("load_config", "config_dir", "register_schema", "to_config", "config_from_file",
                "apply_overrides"):
        from moe_vlm.config import loader
        return getattr(loader, name)
    raise AttributeError(name)
