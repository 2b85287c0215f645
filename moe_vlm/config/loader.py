"""Find ``configs/``, register the schema with Hydra, and turn a composed config into
validated dataclasses. ``load_config`` is the programmatic twin of ``moe-vlm train``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe_vlm.config.schema import Config, ConfigError
from moe_vlm.config.validation import choice_error, validate

SCHEMA_NAME = "moe_vlm_schema"


def config_dir() -> Path:
    """The Hydra config directory: ``$MOE_VLM_CONFIG_DIR`` or the repo's ``configs/``."""
    env = os.environ.get("MOE_VLM_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no config.yaml in {path}; install the repo in editable mode "
            "(pip install -e .) or point MOE_VLM_CONFIG_DIR at a configs/ directory")
    return path


def _product(xs) -> int | float:
    out = 1
    for x in xs:
        out = out * x
    return int(out) if float(out).is_integer() else out


def experiments_dir() -> Path:
    """Sweep definitions live in ``experiments/sweep/`` (config group ``sweep``):
    ``$MOE_VLM_EXPERIMENTS_DIR`` or the repo's ``experiments/``."""
    env = os.environ.get("MOE_VLM_EXPERIMENTS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "experiments"


def searchpath_override() -> str:
    """The Hydra override that makes ``sweep=NAME`` find ``experiments/sweep/NAME.yaml``."""
    return f"hydra.searchpath=[file://{experiments_dir()}]"


def register_schema() -> None:
    """Register the structured schema (so YAML presets are type-checked on merge), the
    ``first_set`` resolver that lets ``run.dir`` double as Hydra's job directory, and the
    integer ``mul``/``div`` resolvers that tie sizes together in presets and sweeps."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    if not OmegaConf.has_resolver("first_set"):
        OmegaConf.register_new_resolver("first_set", lambda *xs: next((x for x in xs if x), None))
    if not OmegaConf.has_resolver("mul"):  # sweeps tie widths together: ${mul:4,${model.d_model}}
        OmegaConf.register_new_resolver("mul", lambda *xs: _product(xs))
    if not OmegaConf.has_resolver("div"):  # moe presets size experts by the model: ${div:${model.d_ff},2}
        OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))


def to_config(cfg: DictConfig) -> Config:
    """Composed ``DictConfig`` -> validated ``Config`` (drops Hydra's own keys)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) \
        if "hydra" in cfg else cfg
    try:  # a --config-path file with an unknown key or a wrong type: name it, no traceback
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    except Exception as e:  # noqa: BLE001 - OmegaConf's errors name the key and the type
        raise choice_error(e) or ConfigError(" ".join(str(e).split())) from None
    assert isinstance(obj, Config)
    return validate(obj)


def load_config(overrides: Sequence[str] = ()) -> Config:
    """Compose ``configs/config.yaml`` with Hydra overrides, outside of a Hydra app.

    Group overrides are looked up first: Hydra skips a missing *optional* preset
    (``experiment=smok``) and would run the default job."""
    from moe_vlm.config.groups import check_group_overrides

    check_group_overrides(overrides)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[searchpath_override(), *overrides])
    except ConfigError:
        raise
    except Exception as e:  # Hydra's errors already name the offending key
        cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
        raise choice_error(e) or ConfigError(f"{e}{cause}") from e
    return to_config(cfg)


def apply_overrides(cfg: Config | str | Path, overrides: Sequence[str] = ()) -> Config:
    """A ``Config`` (or a run's saved ``config.yaml``) plus dotted ``key=value`` overrides
    -> validated ``Config``. No Hydra composition: config groups (``routing=NAME``) do not
    apply here, only dotted keys (``routing.top_k=2``)."""
    if not isinstance(cfg, Config):
        path = Path(cfg)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
    bad = [o for o in overrides if "=" not in o or "." not in o.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"overrides must be dotted key=value pairs (e.g. moe.n_experts=8), got {bad}")
    try:
        base = OmegaConf.structured(cfg) if isinstance(cfg, Config) else OmegaConf.load(cfg)
        merged = OmegaConf.merge(OmegaConf.structured(Config), base,
                                 OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(merged)
    except Exception as e:  # OmegaConf names the key and the expected type
        raise choice_error(e) or ConfigError(f"{e}") from e
    assert isinstance(obj, Config)
    return validate(obj)


def config_from_file(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A run's saved ``config.yaml`` (plus dotted overrides) -> validated ``Config``."""
    return apply_overrides(Path(path), overrides)
