"""Routed experts: stacked SwiGLU weights and the compute backends that run them.

Legend: T tokens, D model width, F expert width, E experts, N assignments
(token, expert, weight) produced by the router.

Weights are stacked so grouped kernels and expert parallelism use them directly:
``w_in [E, D, 2F]`` (columns ``:F`` gate, ``F:`` up) and ``w_out [E, F, D]``.

Backends (identical results within dtype tolerance):
- ``torch``: a per-expert loop, the readable ground truth; any device, any dtype.
- ``grouped_mm``: sort assignments by expert, gather, two ``torch._grouped_mm`` calls,
  weighted scatter-add. Needs fp32/bf16/fp16 and widths whose rows are 16-byte aligned.
- ``triton``: ours, ``triton_kernels.moe_experts`` (gather fused into the first grouped
  GEMM, SwiGLU in its epilogue, fused weighted combine). CUDA; CPU only under
  ``TRITON_INTERPRET=1`` (tests).
- ``auto``: ``triton`` on CUDA, else ``grouped_mm`` where it runs, else ``torch``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ExpertFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _accum_dtype(x: Tensor) -> torch.dtype:
    """Combine in fp32 (fp64 for fp64 inputs, so the reference keeps full precision)."""
    return torch.promote_types(x.dtype, torch.float32)


def experts_torch(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                  w_in: Tensor, w_out: Tensor) -> Tensor:
    """Reference: ``y[t] = sum_{(t,e,w)} w * SwiGLU_e(x[t])`` by looping over experts.

    x [T, D], token_idx/expert_idx/weight [N], w_in [E, D, 2F], w_out [E, F, D] -> [T, D].
    One host sync per expert (``nonzero``)."""
    dt, acc = _compute_dtype(x), _accum_dtype(x)
    # Start from an exact zero that is still connected to every input, so the result stays
    # differentiable (with zero gradients) even when no expert receives a token.
    y = (x[:0].sum() + w_in[:0].sum() + w_out[:0].sum() + weight[:0].sum()).to(acc)
    y = y.expand(x.shape[0], x.shape[1]).contiguous()  # [T, D]
    for e in range(w_in.shape[0]):
        sel = (expert_idx == e).nonzero().squeeze(1)  # host sync
        if sel.numel() == 0:
            continue
        tok = token_idx[sel]
        gate, up = (x.index_select(0, tok).to(dt) @ w_in[e].to(dt)).chunk(2, dim=-1)  # [n, F] each
        out = (F.silu(gate) * up) @ w_out[e].to(dt)  # [n, D]
        y = y.index_add(0, tok, out.to(acc) * weight[sel, None].to(acc))
    return y.to(x.dtype)


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


def experts_grouped_mm(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                       w_in: Tensor, w_out: Tensor) -> Tensor:
    """Sort-based permute + two grouped GEMMs + weighted scatter-add. On CUDA
    ``bincount`` syncs with the host to size its output."""
    dt = _compute_dtype(x)
    n_exp = w_in.shape[0]
    order = torch.argsort(expert_idx, stable=True)  # [N]
    offsets = torch.cumsum(torch.bincount(expert_idx, minlength=n_exp), 0).to(torch.int32)  # [E]
    tok = token_idx[order]  # [N]
    # index_select, not x[tok]: each token appears K times, and the backward of x[tok]
    # (index_put_ with accumulate) adds duplicates with atomics on several CPU threads, so
    # gradients differed between runs; index_select's backward (index_add_) is serial over
    # the index on CPU, and deterministic on CUDA under train.deterministic.
    rows = x.index_select(0, tok).to(dt)  # [N, D], expert-sorted
    gate, up = torch._grouped_mm(rows, w_in.to(dt), offs=offsets).chunk(2, dim=-1)  # [N, F]
    out = torch._grouped_mm(F.silu(gate) * up, w_out.to(dt), offs=offsets)  # [N, D]
    acc = _accum_dtype(x)
    y = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=acc)
    y = y.index_add(0, tok, out.to(acc) * weight[order, None].to(acc))  # [T, D]
    return y.to(x.dtype)


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
    """``triton_kernels.moe_experts`` behind the backend signature, in the compute dtype
    (the kernels ignore autocast, so the cast happens here, differentiably)."""
    from triton_kernels import moe_experts

    def experts_triton(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                       w_in: Tensor, w_out: Tensor) -> Tensor:
        dt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = moe_experts(x.to(dt), token_idx, expert_idx, weight, w_in.to(dt), w_out.to(dt))
        return y.to(x.dtype)

    return experts_triton


BACKENDS: dict[str, Callable[[], ExpertFn]] = {
    "torch": lambda: experts_torch,
    "grouped_mm": lambda: experts_grouped_mm,
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
    """E SwiGLU experts stored stacked; ``forward`` runs the chosen backend."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: str = "auto"):
        super().__init__()
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.backend = backend  # requested; resolved lazily per device/dtype
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_expert))  # [E, D, 2F]
        self.w_out = nn.Parameter(torch.empty(n_experts, d_expert, d_model))  # [E, F, D]
        self._resolved: dict[tuple, ExpertFn] = {}

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float,
                     generator: Optional[torch.Generator] = None) -> None:
        self.w_in.normal_(0.0, std, generator=generator)
        self.w_out.normal_(0.0, out_std, generator=generator)

    def backend_name(self, x: Tensor) -> str:
        return resolve_backend(self.backend, x.device, _compute_dtype(x), self.d_model,
                               self.d_expert)

    def forward(self, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor) -> Tensor:
        """x [T, D] -> [T, D]: sum over each token's assignments of weight * expert(x)."""
        key = (self.backend, x.device, _compute_dtype(x))
        fn = self._resolved.get(key)
        if fn is None:
            fn = BACKENDS[self.backend_name(x)]()
            self._resolved[key] = fn
        return fn(x, token_idx, expert_idx, weight, self.w_in, self.w_out)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, d_model={self.d_model}, "
                f"d_expert={self.d_expert}, backend={self.backend}")
