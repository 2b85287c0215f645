"""Routed experts: stacked SwiGLU weights and the grouped compute on expert-sorted rows.

Legend: N rows (one per assignment), D model width, F expert width, E experts.

Weights are stacked so grouped kernels and expert parallelism use them directly:
``w_in [E, D, 2F]`` (columns ``:F`` gate, ``F:`` up) and ``w_out [E, F, D]``.

Experts are pure compute: ``rows [N, D]`` sorted by expert with ``offsets [E]`` (int32
cumulative group ends) -> ``out [N, D]``, row i through the expert whose group holds it.
Getting tokens into that order and the outputs back, weighted, is a dispatcher's job
(``moe_vlm.model.dispatch``; ``moe_vlm.parallel.expert_parallel`` across processes).

Backends (identical results within dtype tolerance), all ``(rows, offsets, w_in, w_out)``:
- ``torch``: a loop over the groups, the readable ground truth; any device, any dtype
  (one host sync to read the offsets).
- ``grouped_mm``: two ``torch._grouped_mm`` calls. Needs fp32/bf16/fp16 and widths whose
  rows are 16-byte aligned.
- ``triton``: ours, ``triton_kernels.sorted_experts`` (grouped GEMMs, SwiGLU in the first
  one's epilogue). CUDA; CPU only under ``TRITON_INTERPRET=1`` (tests). With the local
  dispatcher the ``triton`` backend runs the fused pair instead (``dispatch.fused_triton``).
- ``auto``: ``triton`` on CUDA, else ``grouped_mm`` where it runs, else ``torch``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

ExpertFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Combine in fp32 (fp64 for fp64 inputs, so the reference keeps full precision)."""
    return torch.promote_types(dtype, torch.float32)


def swiglu_torch(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """Reference: each group of rows through its expert's SwiGLU, one matmul pair per
    expert. rows [N, D] -> [N, D] in the compute dtype. One host sync (the offsets)."""
    dt = compute_dtype(rows)
    bounds = [0, *offsets.tolist()]  # host sync
    outs = []
    for e in range(w_in.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        gate, up = (rows[lo:hi].to(dt) @ w_in[e].to(dt)).chunk(2, dim=-1)  # [n, F] each
        outs.append((F.silu(gate) * up) @ w_out[e].to(dt))  # [n, D]
    out = torch.cat(outs) if outs else rows.new_zeros((0, w_out.shape[2]), dtype=dt)
    # an exact zero that keeps the rows and both weights in the graph, so their gradients
    # are zeros (not None) when no row reaches an expert
    return out + (rows[:0].sum() + w_in[:0].sum() + w_out[:0].sum()).to(dt)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, d_model: int,
                         d_expert: int) -> Optional[str]:
    """None if ``torch._grouped_mm`` can run this shape here, else the reason."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm supports fp32/bf16/fp16, not {dtype}"
    size = torch.empty((), dtype=dtype).element_size()
    for name, n in (("d_model", d_model), ("d_expert", d_expert), ("2*d_expert", 2 * d_expert)):
        if (n * size) % 16:
            return (f"torch._grouped_mm needs 16-byte aligned rows: {name}={n} x {size} bytes "
                    f"is not a multiple of 16")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "torch._grouped_mm needs compute capability >= 8.0"
    return None


def swiglu_grouped_mm(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """Two ``torch._grouped_mm`` calls over the expert groups: rows [N, D] -> [N, D]."""
    dt = compute_dtype(rows)
    gate, up = torch._grouped_mm(rows.to(dt), w_in.to(dt), offs=offsets).chunk(2, dim=-1)  # [N, F]
    return torch._grouped_mm(F.silu(gate) * up, w_out.to(dt), offs=offsets)  # [N, D]


def triton_supported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if the Triton expert kernels can run here, else the reason."""
    try:
        import triton_kernels  # noqa: F401
    except ImportError as e:
        return f"triton_kernels cannot be imported ({e}); install triton"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the Triton kernels support fp32/bf16/fp16, not {dtype}"
    if device.type == "cpu":
        from triton_kernels._utils import interpreting
        if not interpreting():
            return "the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU, for tests)"
    elif device.type != "cuda":
        return f"the Triton kernels need CUDA, not {device.type}"
    return None


def _triton_backend() -> ExpertFn:
    """``triton_kernels.sorted_experts`` behind the backend signature, in the compute dtype
    (the kernels ignore autocast, so the cast happens here, differentiably)."""
    from triton_kernels import sorted_experts

    def swiglu_triton(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
        dt = compute_dtype(rows)
        with torch.autocast(rows.device.type, enabled=False):
            return sorted_experts(rows.to(dt), offsets, w_in.to(dt), w_out.to(dt))

    return swiglu_triton


BACKENDS: dict[str, Callable[[], ExpertFn]] = {
    "torch": lambda: swiglu_torch,
    "grouped_mm": lambda: swiglu_grouped_mm,
    "triton": _triton_backend,
}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, d_model: int,
                    d_expert: int) -> str:
    """Pick a concrete backend name; ``auto`` prefers triton (CUDA), then grouped_mm."""
    if name == "auto":
        if device.type == "cuda" and triton_supported(device, dtype) is None:
            return "triton"
        if grouped_mm_supported(device, dtype, d_model, d_expert) is None:
            return "grouped_mm"
        return "torch"
    if name == "triton":
        why = triton_supported(device, dtype)
        if why:
            raise ValueError(f"moe.backend=triton cannot run here: {why}; "
                             "use moe.backend=auto, torch or grouped_mm")
    if name == "grouped_mm":
        why = grouped_mm_supported(device, dtype, d_model, d_expert)
        if why:
            raise ValueError(f"moe.backend=grouped_mm cannot run here: {why}; "
                             "use moe.backend=torch or auto")
    if name not in BACKENDS:
        raise ValueError(f"moe.backend={name!r} is unknown; choose auto, {', '.join(BACKENDS)}")
    return name


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked; ``forward`` runs the chosen backend on expert-sorted
    rows. Under expert parallelism it holds this rank's slice of the experts (``n_experts``
    is then the local count) and the dispatcher does the rest."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: str = "auto"):
        super().__init__()
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.backend = backend  # requested; resolved lazily per device/dtype
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_expert))  # [E, D, 2F]
        self.w_out = nn.Parameter(torch.empty(n_experts, d_expert, d_model))  # [E, F, D]
        self._resolved: dict[tuple, ExpertFn] = {}
        # parallel.activation_checkpointing=moe: the compute is recomputed in the backward
        # (only the rows and offsets are kept), set by moe_vlm.parallel.parallelize
        self.recompute = False

    def run(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        """``fn(*args)``, under non-reentrant activation checkpointing when ``recompute``
        is set and gradients are on (the dispatcher's fused path goes through here too)."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float,
                     generator: Optional[torch.Generator] = None) -> None:
        self.w_in.normal_(0.0, std, generator=generator)
        self.w_out.normal_(0.0, out_std, generator=generator)

    def backend_name(self, x: Tensor) -> str:
        return resolve_backend(self.backend, x.device, compute_dtype(x), self.d_model,
                               self.d_expert)

    def forward(self, rows: Tensor, offsets: Tensor) -> Tensor:
        """rows [N, D] sorted by expert, offsets [E] int32 group ends -> out [N, D] in the
        compute dtype (the dispatcher weights and combines it)."""
        key = (self.backend, rows.device, compute_dtype(rows))
        fn = self._resolved.get(key)
        if fn is None:
            fn = BACKENDS[self.backend_name(rows)]()
            self._resolved[key] = fn
        return self.run(fn, rows, offsets, self.w_in, self.w_out)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, d_model={self.d_model}, "
                f"d_expert={self.d_expert}, backend={self.backend}")
