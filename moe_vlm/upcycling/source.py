"""Where dense weights come from: one of our runs (or checkpoint files), or a local
Hugging Face directory (Llama / Qwen2 / Qwen3), as one ``Config`` plus a state dict."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from moe_vlm.config.schema import Config, DataConfig, UpcycleConfig
from moe_vlm.train.checkpoint import list_checkpoints, newest_weights


@dataclass(frozen=True)
class Checkpoint:
    config: Config  # the source's full config (HF: model/moe/routing from config.json)
    state_dict: dict[str, Tensor]
    path: Path  # the weights file or HF directory that was read
    kind: str  # "run" | "hf"


def load_checkpoint(path: str | Path, trust: bool = False, what: str = "--from") -> Checkpoint:
    """Read ``path``: a run directory (its ``config.yaml`` and newest good
    ``checkpoints/step_*.pt``; damaged newer ones are skipped with a warning), a ``.pt``
    file inside a run, or a Hugging Face directory (``config.json`` + safetensors).
    Weights load with ``weights_only=True`` (no code runs) unless ``trust``; errors name
    ``what`` (the flag or config key the path came from)."""
    from moe_vlm.config.loader import config_from_file

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from moe_vlm.upcycling.hf import import_hf
        imp = import_hf(p)
        data = DataConfig(seq_len=min(DataConfig.seq_len, imp.model.max_seq_len))
        if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            data = replace(data, tokenizer="hf", tokenizer_path=str(p.resolve()))
        cfg = Config(model=imp.model, moe=imp.moe, routing=imp.routing, data=data)
        return Checkpoint(cfg, imp.state_dict, p, "hf")
    if p.is_dir():
        run_dir = p
        if not list_checkpoints(p / "checkpoints") and not list_checkpoints(p):
            raise FileNotFoundError(f"{p}: no checkpoints/step_*.pt (and no config.json of a "
                                    "Hugging Face model) in this directory")
    elif p.is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    else:
        raise FileNotFoundError(f"{p} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} is missing: the checkpoint's model "
                                "config is read from its run directory")
    cfg = config_from_file(run_dir / "config.yaml")
    weights, sd = newest_weights(p, what, trust)
    return Checkpoint(cfg, sd, weights, "run")


def default_target_moe(cfg: Config) -> Config:
    """The config an upcycled model starts from: the source's, with ``model.moe_every=1``
    (every layer MoE) unless the source already has MoE layers; the user's overrides apply
    on top. The source's ``train.init_from`` and ``upcycle.*`` are dropped: a checkpoint
    directory (``moe-vlm import-hf`` / ``upcycle``) points ``train.init_from`` at itself,
    i.e. at the dense weights this upcycling consumes, and the upcycle options are the
    user's. The upcycled directory then points ``train.init_from`` at its own weights."""
    cfg = replace(cfg, train=replace(cfg.train, init_from=None), upcycle=UpcycleConfig())
    if cfg.model.moe_every == 0:
        return replace(cfg, model=replace(cfg.model, moe_every=1))
    return cfg
