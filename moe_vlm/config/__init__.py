"""Config schema (dataclasses), validation and Hydra loading."""

from moe_vlm.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    ProjectorConfig,
    RoutingConfig,
    RunConfig,
    TrainConfig,
    VisionConfig,
    validate,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "MoEConfig", "ParallelConfig",
    "ProjectorConfig", "RoutingConfig", "RunConfig", "TrainConfig", "VisionConfig", "validate", "load_config", "config_dir",
]


def __getattr__(name: str):  # keep hydra out of `import moe_vlm.config` until needed
    if name in ("load_config", "config_dir", "register_schema", "to_config"):
        from moe_vlm.config import loader
        return getattr(loader, name)
    raise AttributeError(name)
