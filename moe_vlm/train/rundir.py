"""The run directory: resolved config, metrics.jsonl, summary.json, checkpoints/.

Every file that a reader may see half-written is written to a temp file in the same
directory and renamed into place (atomic on POSIX)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write via ``write(fileobj)`` to a temp file beside ``path``, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: json.dump(_jsonable(obj), f, indent=2, sort_keys=True))


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line after a hard kill
                break
    return rows


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, rows past the checkpoint are dropped
    (atomically) so a resumed run's log matches an uninterrupted one."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        if resume_step is None:
            if self.path.exists():
                self.path.unlink()
        else:
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in keep))

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
