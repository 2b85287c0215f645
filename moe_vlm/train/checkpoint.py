"""Atomic, checksummed, code-free training checkpoints: ``checkpoints/step_00000100.pt``.

Each checkpoint is a ``torch.save`` of tensors and plain containers only, so it loads
with ``torch.load(weights_only=True)``: reading a checkpoint someone shares never runs
code. Beside it, ``step_00000100.pt.sha256`` (``sha256sum`` format) holds the hash of the
bytes written; every reader verifies it, so a file damaged on disk is caught before its
weights reach a run. The hash file is written before the checkpoint is renamed into
place, so a checkpoint that exists always has one (a ``.pt`` without one predates
checksums and is read unverified).

A checkpoint that cannot be read or fails its checksum is *quarantined*: renamed to
``step_00000100.pt.bad`` (never deleted) with a warning, and readers fall back to the
newest good one. One that needs full unpickling (an older moe-vlm's, or a planted file)
is skipped unless the caller trusts it (``train.trust_checkpoint`` / ``--trust-checkpoint``).
Rotation deletes only checkpoints older than the one just written, keeping the newest
``keep`` of them counting that one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from moe_vlm.errors import CheckpointError
from moe_vlm.train.rundir import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")
TRUST_HINT = ("if you trust where it came from, set train.trust_checkpoint=true "
              "(moe-vlm upcycle/export-hf: --trust-checkpoint); unpickling can run code")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def checksum_path(path: Path) -> Path:
    return Path(f"{path}.sha256")


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*.pt`` in ``ckpt_dir``, oldest first (quarantined
    ``.bad`` files and temporaries are not listed)."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def quarantined(ckpt_dir: Path) -> list[Path]:
    """Checkpoints renamed aside because they could not be read or verified (without
    their checksum files)."""
    d = Path(ckpt_dir)
    return sorted(p for p in d.glob("step_*.pt.bad*") if p.suffix != ".sha256") if d.is_dir() else []


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (``torch.save`` only
    writes sequentially to a file object without ``seek`` use beyond ``tell``)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: Optional[int]) -> Path:
    """Write ``state`` and its checksum atomically, then rotate: delete checkpoints older
    than ``step`` beyond the newest ``keep`` (``None``: delete nothing, as the saves made
    when a run stops on an error do). Raises ``CheckpointError`` if ``state`` holds
    anything ``weights_only`` loading would refuse, before writing a byte."""
    path = checkpoint_path(ckpt_dir, step)
    digest: dict[str, str] = {}

    def write(f: BinaryIO) -> None:
        h = _HashingWriter(f)
        torch.save(state, h)
        digest["sha"] = h.sha.hexdigest()
        # The hash file goes first: a checkpoint that exists always has its checksum.
        atomic_write(checksum_path(path), lambda g: g.write(f"{digest['sha']}  {path.name}\n"))

    atomic_write(path, write, mode="wb")
    if keep is not None:
        older = [p for s, p in list_checkpoints(ckpt_dir) if s < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
    return path


def _quarantine(path: Path) -> Path:
    """Rename ``path`` (and its checksum) aside as ``.bad`` (``.bad.1``, ... if taken)."""
    dest, i = Path(f"{path}.bad"), 0
    while dest.exists():
        i += 1
        dest = Path(f"{path}.bad.{i}")
    os.replace(path, dest)
    if checksum_path(path).exists():
        os.replace(checksum_path(path), Path(f"{dest}.sha256"))
    return dest


class _Untrusted(CheckpointError):
    """The file is intact but needs full unpickling (``weights_only=False``)."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    trust: bool = False) -> Any:
    """Verify and load one checkpoint file. Raises ``CheckpointError`` naming the file
    when it is missing, fails its checksum, cannot be read, or holds Python objects
    that ``weights_only`` loading refuses (then, only with ``trust``, it is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        sums = checksum_path(path)
        if sums.is_file():
            want = sums.read_text().split()[:1]
            got = _file_sha256(path)
            if want != [got]:
                raise CheckpointError(f"{path}: checksum mismatch (the file changed after it was "
                                      f"written: sha256 {got[:12]}..., expected "
                                      f"{(want or ['?'])[0][:12]}...)")
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: not a checkpoint (torch.save writes a zip archive; "
                                  "this file is not one)")
        mmap = {"mmap": True} if str(map_location) == "cpu" else {}
        try:  # memory-mapped on CPU: each process copies out only what it needs
            return torch.load(path, map_location=map_location, weights_only=True, **mmap)
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise
            if not trust:
                raise _Untrusted(f"{path}: holds Python objects beyond tensors and plain "
                                 f"containers (an older moe-vlm checkpoint, or one that may "
                                 f"run code); not loaded: {TRUST_HINT}") from None
            warnings.warn(f"{path}: unpickling with weights_only=False (trusted by the user)")
            return torch.load(path, map_location=map_location, weights_only=False)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, KeyError,
            AttributeError, IndexError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({msg})") from None


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu", trust: bool = False,
                quarantine: bool = True) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest good checkpoint in ``ckpt_dir`` as ``(path, state)``, or None when there
    is none. Newer files that fail are reported with a warning naming them; unreadable or
    damaged ones are renamed aside (``quarantine``, rank 0 only: other ranks skip them
    the same way), untrusted ones left in place."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = read_checkpoint(path, map_location, trust)
        except _Untrusted as e:
            warnings.warn(f"skipping {e}; trying an older checkpoint")
            continue
        except CheckpointError as e:
            moved = ""
            if quarantine and path.exists():
                try:
                    moved = f"; moved to {_quarantine(path).name}"
                except OSError:
                    pass
            warnings.warn(f"{e}{moved}; trying an older checkpoint")
            continue
        if not isinstance(state, dict) or "model" not in state:
            warnings.warn(f"{path}: not a training checkpoint (no 'model' entry); skipped")
            continue
        return path, state
    return None


def newest_weights(source: str | Path, what: str, trust: bool = False) -> tuple[Path, dict[str, Any]]:
    """The model state dict of a run directory (its newest good checkpoint), a
    ``checkpoints/`` directory, or one ``.pt`` file, for ``what`` (the key or flag named
    in errors). Damaged files in a directory are skipped with a warning, not moved (the
    directory is someone else's run)."""
    src = Path(source)
    if src.is_dir():
        ckpts = src / "checkpoints" if (src / "checkpoints").is_dir() else src
        found = load_latest(ckpts, "cpu", trust, quarantine=False)
        if found is None:
            n = len(list_checkpoints(ckpts))
            raise CheckpointError(
                f"{what}: no usable checkpoints/step_*.pt under {src}" +
                (f" ({n} found, none readable: see the warnings)" if n else ""))
        path, state = found
    elif src.is_file():
        try:
            path, state = src, read_checkpoint(src, "cpu", trust)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
    else:
        raise CheckpointError(f"{what}: {src} is neither a run directory nor a checkpoint file")
    weights = state["model"] if isinstance(state, dict) and "model" in state else state
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{what}: {path} is not a model checkpoint (expected a state "
                              "dict of tensors, or a dict with a 'model' entry)")
    return path, weights


def load_weights(model: torch.nn.Module, source: str | Path,
                 map_location: str | torch.device = "cpu", trust: bool = False) -> Path:
    """Load only the model weights of another run (``train.init_from``): a run directory
    (its newest checkpoint), a ``checkpoints/`` directory, or one ``.pt`` file. Shapes and
    names must match exactly; the error lists what differs."""
    src, weights = newest_weights(source, "train.init_from", trust)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shape = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise CheckpointError(
            f"train.init_from: {src} does not fit this model: missing {few(missing) or 'none'}; "
            f"unexpected {few(unexpected) or 'none'}; shape mismatch {few(shape) or 'none'}. "
            "Use the same model/vision/moe settings as that run (a dense checkpoint needs "
            "upcycling before MoE training).")
    model.load_state_dict({k: v.to(map_location) for k, v in weights.items()})
    return src
