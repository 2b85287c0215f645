"""Shared launcher helpers: interpreter detection and input validation (launch sizes:
``tuning.py``).

Kernels here run compiled on CUDA and under ``TRITON_INTERPRET=1`` on the CPU (tests).
Two interpreter quirks shape the code: its ``tl.dot`` silently returns garbage on bf16
operands (so launchers ask kernels to upcast dot operands to fp32 there), and
autotuning would run every config in Python (so the interpreter gets one small config).
"""

from __future__ import annotations

import os
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: Tensor, op: str) -> None:
    """Kernels need CUDA tensors, or CPU tensors under the interpreter; all on one device."""
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devs))}")
    dev = next(iter(devs))
    if dev.type == "cpu" and not interpreting():
        raise ValueError(f"{op}: CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter); "
                         "on CPU use the *_reference functions or moe.backend=torch/grouped_mm")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {dev}; use CUDA")


def check_float(t: Tensor, name: str, op: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be fp32, bf16 or fp16, got {t.dtype}")


def check_same_dtype(op: str, **tensors: Tensor) -> None:
    dts = {n: t.dtype for n, t in tensors.items()}
    if len(set(dts.values())) != 1:
        raise TypeError(f"{op}: dtypes must match, got "
                        + ", ".join(f"{n}={d}" for n, d in dts.items()))


def check_shape(t: Tensor, ndim: int, name: str, op: str, legend: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {legend} ({ndim}-D), got shape {tuple(t.shape)}")


def check_int(t: Tensor, name: str, op: str) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")


def check_n_experts(n_experts: int, op: str) -> int:
    """``n_experts`` (E) as a positive Python int. Callers pass the configured expert count
    (``moe.n_experts``, ``w_in.shape[0]``): inferring it from the ids would cost a host sync
    and give too few offsets when the highest experts get no tokens."""
    if isinstance(n_experts, (bool, Tensor)) or not hasattr(n_experts, "__index__"):
        raise TypeError(f"{op}: n_experts must be a positive Python int (the configured expert "
                        f"count, e.g. w_in.shape[0]), got {type(n_experts).__name__}")
    e = n_experts.__index__()
    if e <= 0:
        raise ValueError(f"{op}: n_experts must be a positive int (the configured expert "
                         f"count), got {e}")
    return e


def count_ids(ids: Tensor, n: int, op: str, what: str = "expert ids") -> Tensor:
    """Occurrences of each value of ``ids`` [N] (values in ``[0, n)``) -> int64 ``[n]``,
    equal to ``torch.bincount(ids, minlength=n)`` but without its host sync: bincount sizes
    its output by the largest id, which on CUDA it reads back to the host. An id outside
    ``[0, n)`` is refused here on the CPU (not while ``torch.compile`` traces: reading a
    value would break the graph), and is a device-side index error on CUDA."""
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        # Read through numpy: on the CPU there is no device to wait for, and the ATen
        # reads (``int(t.max())``) are what tests/model/test_host_syncs.py flags as syncs.
        vals = ids.detach().numpy()
        lo, hi = int(vals.min()), int(vals.max())
        if hi >= n or lo < 0:
            name = "n_experts" if what == "expert ids" else "n"
            raise ValueError(f"{op}: {what} must be in [0, {name}={n}) but the "
                             f"{'largest is ' + str(hi) if hi >= n else 'smallest is ' + str(lo)}; "
                             "pass the configured count, or fix the router that produced the ids")
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(
        0, ids.long(), torch.ones_like(ids, dtype=torch.int64))


def check_expert_counts(counts: Tensor, n_experts: int, op: str) -> None:
    """Raise if ``counts = bincount(expert_ids, minlength=E)`` came out longer than E, i.e.
    some id is >= E. Free: bincount already knows its length on the host."""
    if counts.shape[0] != n_experts:
        raise ValueError(f"{op}: expert ids must be in [0, n_experts={n_experts}) but the "
                         f"largest is {counts.shape[0] - 1}; pass the configured expert count "
                         f"as n_experts, or fix the router that produced the ids")
