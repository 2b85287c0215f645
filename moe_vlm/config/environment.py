"""Can this config run *here*? Files, hardware, packages, launcher and run directory.

``validate`` (``moe_vlm.config.validation``) only judges values, because it also runs where
a finished run's ``config.yaml`` is read on another machine (export, evaluation): a
``train.device=cuda`` run must stay readable on a laptop. ``check_runnable`` holds the
checks that depend on this machine, plus the two training-only consistency checks that
a weights-only config legitimately fails (an imported Hugging Face model with a small
vocabulary is exported, never trained with the byte tokenizer). Call it before a run
writes anything; each failure is one ``ConfigError`` line naming the key and the fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from moe_vlm.config.schema import Config
from moe_vlm.config.sizes import resolve_moe_sizes
from moe_vlm.config.validation import DEVICES, device_ok, n_moe_layers
from moe_vlm.errors import ConfigError

__all__ = ["MissingPathError", "check_runnable"]

BYTE_VOCAB = 260  # moe_vlm.data.byte_tokenizer.ByteTokenizer.vocab_size
# What ``deepspeed.init_distributed`` reads; without all of them it falls back to MPI.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


class MissingPathError(ConfigError, FileNotFoundError):
    """A configured path that does not exist; also a ``FileNotFoundError``, so callers
    that catch that (``train.init_from`` handling) keep working."""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _check_path(key: str, value: Optional[str], kind: str, fix: str) -> None:
    """``kind``: ``dir``, ``file`` or ``any`` (a run directory or a checkpoint file)."""
    if value is None:
        return
    p = Path(value)
    if not p.exists():
        raise MissingPathError(f"{key}: {p} does not exist; {fix}")
    if kind == "dir" and not p.is_dir():
        raise ConfigError(f"{key}: {p} is not a directory; {fix}")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{key}: {p} is not a file; {fix}")


def _check_paths(cfg: Config) -> None:
    d, v, u = cfg.data, cfg.vision, cfg.upcycle
    _check_path("train.init_from", cfg.train.init_from, "any",
                "give a run directory or a checkpoint .pt file, or set train.init_from=null")
    if u.method != "none":
        _check_path("upcycle.source", u.source, "any",
                    "give the dense run directory, checkpoint .pt or Hugging Face directory")
    for key, value in (("data.path", d.path if d.name not in ("text", "mixture") else None),
                       ("data.eval_path", d.eval_path)):
        _check_path(key, value, "file", "give an existing .json or .jsonl conversation file")
        if value is not None and d.name == "llava" and Path(value).suffix not in (".json", ".jsonl"):
            raise ConfigError(f"{key}: {value} is not a .json or .jsonl file; convert it or "
                              "point the key at one")
    _check_path("data.image_dir", d.image_dir, "dir",
                "give the folder the rows' image paths are relative to, or set data.image_dir=null")
    if v.name == "hf":
        _check_path("vision.hf_path", v.hf_path, "dir",
                    "give a local SigLIP/CLIP model directory (with config.json)")
    if d.tokenizer == "hf":
        _check_path("data.tokenizer_path", d.tokenizer_path, "dir",
                    "give a local Hugging Face tokenizer directory")


def _device(name: str):
    """``train.device`` as a ``torch.device`` on this machine (as ``resolve_device`` in
    ``moe_vlm.parallel.runtime`` will pick it), or a ``ConfigError`` before it fails."""
    import torch

    if not device_ok(name):
        raise ConfigError(f"train.device: unknown device {name!r}; choose one of {list(DEVICES)} "
                          "(N = GPU index)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} requested but CUDA is not available on this "
                              "machine; use train.device=auto or cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"train.device: {name!r} but this machine has {count} GPU(s) "
                              f"(cuda:0 .. cuda:{count - 1}); pick one of them or use cuda")
    if dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise ConfigError("train.device: 'mps' requested but Apple MPS is not available on this "
                          "machine; use train.device=auto or cpu")
    return dev


def _check_backend(cfg: Config, device) -> None:
    """``moe.backend=triton|grouped_mm`` must run here, or the first forward raises after
    the run directory was written. The reasons come from ``moe_vlm.model.experts``."""
    backend = cfg.moe.backend
    if backend not in ("triton", "grouped_mm") or n_moe_layers(cfg.model) == 0:
        return  # auto falls back on its own; a dense model never runs the experts
    import torch

    bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32
    if backend == "triton":
        if not _has_module("triton"):
            raise ConfigError("moe.backend: triton needs the triton package (pip install triton, "
                              "CUDA only); use moe.backend=auto, torch or grouped_mm")
        from moe_vlm.model.experts import triton_supported

        why = triton_supported(device, dtype)
    else:
        from moe_vlm.model.experts import grouped_mm_supported

        why = grouped_mm_supported(device, dtype, cfg.model.d_model,
                                   resolve_moe_sizes(cfg.moe, cfg.routing).d_expert)
    if why:
        other = "auto, torch or grouped_mm" if backend == "triton" else "auto or torch"
        raise ConfigError(f"moe.backend: {backend} cannot run here: {why}; use moe.backend={other}")


def _check_trackers(cfg: Config) -> None:
    """``log.tensorboard`` / ``log.wandb``: their packages (optional extras)."""
    for key, on, package in (("log.tensorboard", cfg.log.tensorboard, "tensorboard"),
                             ("log.wandb", cfg.log.wandb, "wandb")):
        if on and not _has_module(package):
            raise ConfigError(f"{key}=true needs the {package} package, which is not installed: "
                              f"pip install -e '.[trackers]' (or pip install {package}), or set "
                              f"{key}=false")


def _check_deepspeed() -> None:
    """``parallel.engine=deepspeed``: the package, and a launcher. ``deepspeed.initialize``
    needs the launcher's environment (the deepspeed launcher and torchrun set it) or
    else discovers an MPI job through mpi4py (Azure ML and SageMaker set their own);
    a plain ``python -m moe_vlm.train`` has neither and fails inside DeepSpeed."""
    if not _has_module("deepspeed"):
        raise ConfigError("parallel.engine: deepspeed is not installed; pip install -e "
                          "'.[deepspeed]' or use parallel.engine=torch")
    env = os.environ
    if all(k in env for k in LAUNCHER_ENV) or _has_module("mpi4py") \
            or "AZUREML_EXPERIMENT_ID" in env or "SM_TRAINING_ENV" in env:
        return
    missing = [k for k in LAUNCHER_ENV if k not in env]
    raise ConfigError(f"parallel.engine: deepspeed needs a launcher ({', '.join(missing)} unset): "
                      "start with `deepspeed --no_local_rank --module moe_vlm.train ...` or "
                      "`torchrun --nproc-per-node=N -m moe_vlm.train ...`, or use parallel.engine=torch")


def _check_run_dir(run_dir: str | Path) -> None:
    """The run directory must be creatable and writable: an existing file, a dangling
    link or a read-only parent fails only when the first file is written."""
    p = Path(run_dir).absolute()
    if p.is_symlink() and not p.exists():
        raise ConfigError(f"run.dir: {p} is a dangling symlink; remove it or choose another run.dir")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"run.dir: {p} is an existing file, not a directory; choose another run.dir")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"run.dir: {parent} is a file, so {p} cannot be created; choose another run.dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        what = "" if parent == p else f" (the nearest existing parent of {p})"
        raise ConfigError(f"run.dir: {parent}{what} is not writable; choose a run.dir you can write to")


def _check_training_only(cfg: Config) -> None:
    """Consistency a training run needs but a weights-only config may lack."""
    d, vocab = cfg.data, cfg.model.vocab_size
    if d.tokenizer == "byte" and vocab < BYTE_VOCAB:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the byte tokenizer's "
                          f"{BYTE_VOCAB} ids; raise it to >= {BYTE_VOCAB}")
    if d.tokenizer == "bpe" and vocab < d.bpe_vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than data.bpe_vocab_size="
                          f"{d.bpe_vocab_size}, the ids the BPE tokenizer is trained to; raise it "
                          "or lower data.bpe_vocab_size")
    from moe_vlm.train.freeze import GROUPS

    unknown = [g for g in cfg.train.trainable if g not in GROUPS]
    if unknown:
        raise ConfigError(f"train.trainable: unknown group(s) {unknown}; choose from {sorted(GROUPS)}")


def check_runnable(cfg: Config, run_dir: str | Path | None) -> None:
    """Raise ``ConfigError`` if ``cfg`` (already validated) cannot run on this machine:
    missing input paths, absent hardware or packages, no launcher for DeepSpeed, or a
    ``run_dir`` (when given) that cannot be created or written. Writes nothing."""
    _check_paths(cfg)
    device = _device(cfg.train.device)
    _check_backend(cfg, device)
    if cfg.parallel.engine == "deepspeed":
        _check_deepspeed()
    _check_training_only(cfg)
    _check_trackers(cfg)
    if run_dir is not None:
        _check_run_dir(run_dir)
