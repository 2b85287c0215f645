"""Atomic, self-describing training checkpoints: ``checkpoints/step_00000100.pt``."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from moe_vlm.train.rundir import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write atomically, then delete all but the newest ``keep`` checkpoints."""
    path = checkpoint_path(ckpt_dir, step)
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> Optional[dict[str, Any]]:
    """The newest readable checkpoint, or None. A file that fails to load (it cannot be
    torn, writes are atomic, but a disk can fail) is reported and the previous one used."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:  # memory-mapped on CPU: each process copies out only what it needs
            mmap = {"mmap": True} if str(map_location) == "cpu" else {}
            return torch.load(path, map_location=map_location, weights_only=False, **mmap)
        except Exception as e:  # noqa: BLE001 - fall back to an older checkpoint
            warnings.warn(f"could not read checkpoint {path} ({e}); trying an older one")
    return None


def load_weights(model: torch.nn.Module, source: str | Path,
                 map_location: str | torch.device = "cpu") -> Path:
    """Load only the model weights of another run (``train.init_from``): a run directory
    (its newest checkpoint), a ``checkpoints/`` directory, or one ``.pt`` file. Shapes and
    names must match exactly; the error lists what differs."""
    src = Path(source)
    if src.is_dir():
        found = list_checkpoints(src / "checkpoints") or list_checkpoints(src)
        if not found:
            raise FileNotFoundError(f"train.init_from: no checkpoints/step_*.pt under {src}")
        src = found[-1][1]
    elif not src.is_file():
        raise FileNotFoundError(f"train.init_from: {src} is neither a run directory nor a checkpoint file")
    state = torch.load(src, map_location=map_location, weights_only=False)
    weights = state["model"] if isinstance(state, dict) and "model" in state else state
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shape = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise ValueError(
            f"train.init_from: {src} does not fit this model: missing {few(missing) or 'none'}; "
            f"unexpected {few(unexpected) or 'none'}; shape mismatch {few(shape) or 'none'}. "
            "Use the same model/vision/moe settings as that run (a dense checkpoint needs "
            "upcycling before MoE training).")
    model.load_state_dict(weights)
    return src
