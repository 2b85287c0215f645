"""Local Hugging Face checkpoint directories: read ``config.json`` and the weights (all of
them, or only the tensors a caller names), and write them atomically. The one reader of
such directories: the vision tower loader (``moe_vlm.model.vision``) and the decoder
import / export (``moe_vlm.upcycling``) both go through it. Nothing is downloaded.

Reading accepts ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` (``torch.load(weights_only=True)``)
and sharded ``.bin`` with ``pytorch_model.bin.index.json``, in that order of preference
(``WEIGHTS_FILES``). Tensors come back on the CPU in the dtype they are stored in; the
caller converts. A weights file that cannot be read (truncated, not safetensors, a pickle
that holds more than tensors) raises ``CheckpointError`` naming it; an index whose shard
names leave the model directory (``../x``, an absolute path, a symlink out) is refused,
never followed; a ``config.json`` that is not a JSON object raises ``ConfigError`` naming
the file. Writing produces one ``model.safetensors`` (``{"format": "pt"}`` metadata, which
older transformers versions insist on) next to ``config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor

from moe_vlm.errors import CheckpointError, ConfigError

PathLike = Union[str, Path]
# The weights of a checkpoint directory, in order of preference: a file, or an index of shards.
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
Loader = Callable[[Path, Optional[list[str]]], dict[str, Tensor]]


def read_json(f: Path, error: type[ValueError] = ConfigError) -> dict:
    """A JSON object from ``f``; ``error`` (naming the file) if it is anything else."""
    try:
        with open(f, encoding="utf-8") as h:
            data = json.load(h)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise error(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _unreadable(f: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{f}: cannot read the weights ({_first_line(e)}); the file may be "
                           f"truncated or not a checkpoint: download it again")


@contextmanager
def _readable(f: Path) -> Iterator[None]:
    """A safetensors file that cannot be read: ``CheckpointError`` naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(f, e) from None


def _load_safetensors(f: Path, keys: Optional[list[str]] = None) -> dict[str, Tensor]:
    """All tensors of ``f``, or those of ``keys`` it holds (only they are read)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with _readable(f):
        if keys is None:
            return load_file(str(f), device="cpu")
        with safe_open(str(f), framework="pt") as h:
            held = set(h.keys())
            return {k: h.get_tensor(k) for k in keys if k in held}


def _safetensors_keys(f: Path) -> list[str]:
    """The tensor names in ``f``'s header (no tensor is read)."""
    from safetensors import safe_open

    with _readable(f), safe_open(str(f), framework="pt") as h:
        return list(h.keys())


def _load_bin(f: Path, keys: Optional[list[str]] = None) -> dict[str, Tensor]:
    """A pickled state dict read with ``weights_only=True`` (all of it, whatever ``keys``
    asks for): a pickle that needs anything but tensors (code could run) is refused as
    untrusted, like a damaged file."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # "pickle protocol N" notes before the real error
            warnings.simplefilter("ignore", UserWarning)
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the reason follows "WeightsUnpickler error:"
        why = str(e).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        why = " ".join(why.split())[:200] or _first_line(e)
        raise CheckpointError(f"{f}: refused by torch.load(weights_only=True): not a plain "
                              f"state dict of tensors, or damaged ({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _unreadable(f, e) from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{f}: expected a flat state dict of tensors")
    return sd if keys is None else {k: sd[k] for k in keys if k in sd}


def _loader(where: Path) -> Loader:
    return _load_safetensors if where.name.startswith("model.safetensors") else _load_bin


def _shard_path(index: Path, shard: object) -> Path:
    """The file a ``weight_map`` entry names, which must lie inside the model directory:
    an absolute name, ``..`` or a symlink out would read files the index's author chose.
    The one exception is the Hugging Face hub cache, where ``snapshots/<rev>/<file>`` are
    symlinks to ``../../blobs/<hash>`` of the same repository."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: weight_map holds {shard!r}, not a shard file name")
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise CheckpointError(f"{index}: weights shard {shard!r} is outside the model "
                              f"directory {index.parent}; refusing to read it")
    f = index.parent / shard
    home = index.parent.resolve()
    allowed = [home]
    if home.parent.name == "snapshots":  # hub cache: <repo>/snapshots/<rev> -> <repo>/blobs
        allowed.append(home.parent.parent / "blobs")
    target = f.resolve()
    if not any(target.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{index}: weights shard {shard!r} resolves to {target}, outside "
                              f"the model directory {index.parent}; refusing to read it")
    return f


def _weight_map(index: Path) -> dict[str, Path]:
    """HF key -> shard file of an index; every entry is checked (``_shard_path``) before
    any shard is read."""
    weight_map = read_json(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object")
    return {key: _shard_path(index, shard) for key, shard in weight_map.items()}


def find_weights(d: Path) -> Path:
    """The weights file or shard index of checkpoint directory ``d``: the first of
    ``WEIGHTS_FILES`` it has. FileNotFoundError listing what it holds otherwise."""
    for name in WEIGHTS_FILES:
        if (d / name).is_file():
            return d / name
    present = sorted(p.name for p in d.iterdir())
    raise FileNotFoundError(f"no weights in {d}: expected model.safetensors, "
                            f"model.safetensors.index.json with its shards, or "
                            f"pytorch_model.bin; found {present}")


@dataclass(frozen=True)
class WeightFiles:
    """Which file of a checkpoint directory holds each tensor, known before any tensor is
    read: to read part of a checkpoint (a vision tower out of a two-tower model)."""

    where: Path  # the weights file or the shard index: what errors name
    files: dict[str, Path]  # HF key -> the file that holds it

    def read(self, keys: Optional[Iterable[str]] = None, whole: bool = False) -> dict[str, Tensor]:
        """The tensors of ``keys`` (default: every key), on CPU, dtype as stored. Every key
        must be in the file that holds it. ``whole``: every tensor of each file read, also
        those no key names (a shard's extras). Costs one pass per file; a ``.bin`` file is
        unpickled whole whatever ``keys`` asks for."""
        by_file: dict[Path, list[str]] = {}
        for k in self.files if keys is None else keys:
            by_file.setdefault(self.files[k], []).append(k)
        load, listed = _loader(self.where), self.where.name
        out: dict[str, Tensor] = {}
        for f, ks in sorted(by_file.items()):
            if not f.is_file():
                raise FileNotFoundError(f"weights shard {f} (listed in {listed}) does not exist")
            tensors = load(f, None if whole else ks)
            missing = [k for k in ks if k not in tensors]
            if missing:
                raise CheckpointError(f"{f}: lacks {missing[:5]} (listed in {listed}"
                                      f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''})")
            out.update(tensors)
        return out


def weight_files(d: Path) -> WeightFiles:
    """The ``WeightFiles`` of checkpoint directory ``d`` (``find_weights``): from the index,
    the safetensors header, or, for a single ``.bin``, by unpickling it (its whole size)."""
    where = find_weights(d)
    if where.name.endswith(".index.json"):
        return WeightFiles(where, _weight_map(where))
    keys = _safetensors_keys(where) if _loader(where) is _load_safetensors else _load_bin(where)
    return WeightFiles(where, {k: where for k in keys})


def read_hf_checkpoint(path: PathLike) -> tuple[dict, dict[str, Tensor]]:
    """``(config.json as a dict, {HF key: tensor on CPU, dtype as stored})`` of a local
    Hugging Face checkpoint directory. Reads every tensor into memory (costs the whole
    checkpoint's size in host RAM). Raises FileNotFoundError naming what is missing."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {d} does not exist")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'} does not exist")
    config = read_json(d / "config.json")
    where = find_weights(d)
    if where.name.endswith(".index.json"):
        return config, WeightFiles(where, _weight_map(where)).read(whole=True)
    return config, _loader(where)(where, None)


def _own_storage(t: Tensor) -> Tensor:
    """A contiguous CPU tensor with storage of its own: safetensors refuses tensors that
    share memory, such as the gate / up halves of one ``w_in`` (copies only such views)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous():
        return t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def write_hf_checkpoint(out_dir: PathLike, config: dict, tensors: dict[str, Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` atomically: into a
    temporary directory beside it, then one rename. Refuses a non-empty ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory; "
                              f"choose a new output directory or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        flat = {k: _own_storage(v) for k, v in tensors.items()}
        save_file(flat, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "config.json", "w") as h:
            json.dump(config, h, indent=2, sort_keys=True)
            h.write("\n")
        os.replace(tmp, out)  # atomic; replaces an empty directory on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
