"""The run directory: resolved config, metrics.jsonl, summary.json, checkpoints/.

Every file that a reader may see half-written is written to a temp file in the same
directory and renamed into place (atomic on POSIX)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


from moe_vlm.atomic import UMASK as _UMASK
from moe_vlm.atomic import atomic_write  # noqa: F401  (re-exported: the run directory's writer)


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
    """The JSON-object rows of ``path``. A line that does not parse (a torn line after a
    hard kill, a disk error) or is not an object is skipped, and the rows after it kept."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files ``atomic_write`` leaves when a process is killed
    mid-write (in ``run_dir`` and ``run_dir/checkpoints``). Call only while holding the
    run directory's lock: another live writer's temporaries would look the same."""
    removed = []
    for d in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` for as long as a run writes there, so a
    second process on the same ``run.dir`` stops at once with a message naming the first
    (``pid``, host, start time, written into the file). The kernel drops the lock when
    the holder exits, killed or not: a stale lock file never blocks a resume."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket
        import time

        from moe_vlm.errors import RunDirError

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"run.dir {self.path.parent} is in use by {holder}; wait for it to "
                              "finish or choose another run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless)
            self._fd = None


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
