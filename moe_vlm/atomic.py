"""Atomic file writes: the one helper every writer of results, records and checkpoints uses.

A reader (another process, a resumed run, a crash) sees the old file or the new one, never
a half-written one: the content goes to a temp file beside the target, is fsynced, and is
renamed over it (atomic on POSIX). Standard library only, so pure-numpy parts (scaling fits)
can use it without importing torch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

UMASK = os.umask(0)
os.umask(UMASK)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write via ``write(fileobj)`` (opened with ``mode``: ``"w"`` text, ``"wb"`` bytes) to a
    temp file beside ``path``, fsync, rename; the temp file is removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
