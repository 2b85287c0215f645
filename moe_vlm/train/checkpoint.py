"""Atomic, self-describing training checkpoints: ``checkpoints/step_00000100.pt``."""

from __future__ import annotations

import re
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
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - fall back to an older checkpoint
            print(f"warning: could not read checkpoint {path} ({e}); trying an older one")
    return None
