"""Routed experts: stacked SwiGLU weights and the grouped compute on expert-sorted rows.

Legend: N rows (one per assignment), D model width, F expert width, E experts.

Weights are stacked so grouped kernels and expert parallelism use them directly:
``w_in [E, D, 2F]`` (columns ``:F`` gate, ``F:`` up) and ``w_out [E, F, D]``.

The decoder's experts are SwiGLU without biases. Experts may instead be a ViT's MLP,
``act(x W_in + b_in) W_out + b_out`` (``act`` one of ``layers.GELU_ACTS``, biases
optional: ``b_in [E, F]``, ``b_out [E, D]``, ``w_in [E, D, F]``), so MoE layers in the
vision tower (V-MoE) can start from, and equal, its dense MLPs. Those run on the ``torch``
and ``grouped_mm`` backends (``mlp_torch``, ``mlp_grouped_mm``); the Triton kernels are
fused SwiGLU only.

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
- ``auto``: ``triton`` on CUDA (SwiGLU experts without biases), else ``grouped_mm`` where
  it runs, else ``torch``.

``moe.ternary`` (MoTE) installs ``GroupedExperts.quant``, which quantises the weights (and
activations) and then runs the chosen backend on plain tensors
(``moe_vlm.model.ternary_experts``); the fused Triton pair is not used then.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_vlm.model.layers import GELU_ACTS, gelu_act

ExpertFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
EXPERT_ACTS = ("swiglu", *GELU_ACTS)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Combine in fp32 (fp64 for fp64 inputs, so the reference keeps full precision)."""
    return torch.promote_types(dtype, torch.float32)


def _expert_loop(rows: Tensor, offsets: Tensor, d_out: int, expert: Callable[[int, Tensor], Tensor],
                 *params: Tensor) -> Tensor:
    """Each group of rows [n, D] (in the compute dtype) through ``expert(e, rows)`` ->
    [n, d_out], concatenated: [N, d_out]. One host sync (the offsets). ``params``, the
    stacked weights, are kept in the graph by an exact zero, so their gradients are zeros
    (not None) when no row reaches an expert."""
    dt = compute_dtype(rows)
    bounds = [0, *offsets.tolist()]  # host sync
    outs = []
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        outs.append(expert(e, rows[lo:hi].to(dt)))
    out = torch.cat(outs) if outs else rows.new_zeros((0, d_out), dtype=dt)
    keep = rows[:0].sum()
    for p in params:
        keep = keep + p[:0].sum()
    return out + keep.to(dt)


def swiglu_torch(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """Reference: each group of rows through its expert's SwiGLU, one matmul pair per
    expert. rows [N, D] -> [N, D] in the compute dtype. One host sync (the offsets)."""
    dt = compute_dtype(rows)

    def expert(e: int, x: Tensor) -> Tensor:
        gate, up = (x @ w_in[e].to(dt)).chunk(2, dim=-1)  # [n, F] each
        return (F.silu(gate) * up) @ w_out[e].to(dt)  # [n, D]

    return _expert_loop(rows, offsets, w_out.shape[2], expert, w_in, w_out)


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


def _hidden(h: Tensor, act: str) -> Tensor:
    """The activation of the first GEMM's output h [n, 2F] (SwiGLU) or [n, F] (a GELU)."""
    if act == "swiglu":
        gate, up = h.chunk(2, dim=-1)  # [n, F] each
        return F.silu(gate) * up
    return gelu_act(act)(h)


def mlp_torch(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor,
              b_in: Optional[Tensor], b_out: Optional[Tensor], act: str) -> Tensor:
    """Reference for any expert MLP (``act``, optional biases): each group of rows through
    ``act(x w_in[e] + b_in[e]) w_out[e] + b_out[e]``, one ``F.linear`` pair per expert,
    i.e. as ``nn.Linear`` computes it, so an expert holding a ViT MLP's weights gives that
    MLP's outputs (bit for bit on the CPUs we test). rows [N, D] -> [N, D] in the compute
    dtype. One host sync (the offsets)."""
    dt = compute_dtype(rows)

    def expert(e: int, x: Tensor) -> Tensor:
        bi = None if b_in is None else b_in[e].to(dt)
        bo = None if b_out is None else b_out[e].to(dt)
        h = F.linear(x, w_in[e].to(dt).t(), bi)  # [n, F] (or [n, 2F])
        return F.linear(_hidden(h, act), w_out[e].to(dt).t(), bo)  # [n, D]

    params = [p for p in (w_in, w_out, b_in, b_out) if p is not None]
    return _expert_loop(rows, offsets, w_out.shape[2], expert, *params)


def expert_of_rows(offsets: Tensor, n_rows: int) -> Tensor:
    """The expert [N] (int64) of each expert-sorted row, from the group ends ``offsets``
    [E]: row i belongs to the first group whose end exceeds i. No host sync."""
    rows = torch.arange(n_rows, device=offsets.device)  # [N]
    return torch.searchsorted(offsets.long(), rows, right=True)


def mlp_grouped_mm(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor,
                   b_in: Optional[Tensor], b_out: Optional[Tensor], act: str) -> Tensor:
    """``mlp_torch`` as two ``torch._grouped_mm`` calls, each row's expert bias gathered
    and added after its GEMM: rows [N, D] -> [N, D]. No host sync."""
    dt = compute_dtype(rows)
    h = torch._grouped_mm(rows.to(dt), w_in.to(dt), offs=offsets)  # [N, F] (or [N, 2F])
    eid = expert_of_rows(offsets, rows.shape[0]) if b_in is not None or b_out is not None else None
    if b_in is not None:
        h = h + b_in.to(dt).index_select(0, eid)
    y = torch._grouped_mm(_hidden(h, act), w_out.to(dt), offs=offsets)  # [N, D]
    if b_out is not None:
        y = y + b_out.to(dt).index_select(0, eid)
    return y


MLP_BACKENDS = {"torch": mlp_torch, "grouped_mm": mlp_grouped_mm}


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
                    d_expert: int, act: str = "swiglu", bias: bool = False) -> str:
    """Pick a concrete backend name; ``auto`` prefers triton (CUDA, SwiGLU experts without
    biases: what its fused kernels compute), then grouped_mm."""
    fused = act == "swiglu" and not bias
    if name == "auto":
        if fused and device.type == "cuda" and triton_supported(device, dtype) is None:
            return "triton"
        if grouped_mm_supported(device, dtype, d_model, d_expert) is None:
            return "grouped_mm"
        return "torch"
    if name == "triton" and not fused:
        raise ValueError(f"moe.backend=triton runs fused SwiGLU experts without biases; these "
                         f"experts are {act} MLPs{' with biases' if bias else ''} (the vision "
                         "tower's MoE layers, vision.moe_every > 0): use moe.backend=auto (triton "
                         "for the decoder where it runs, grouped_mm or torch for these), "
                         "grouped_mm or torch")
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
    """E experts stored stacked; ``forward`` runs the chosen backend on expert-sorted rows.
    SwiGLU without biases by default (the decoder's); ``act`` a GELU and ``bias=True`` give
    ViT MLPs (the vision tower's MoE layers). Under expert parallelism it holds this rank's
    slice of the experts (``n_experts`` is then the local count) and the dispatcher does
    the rest."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: str = "auto",
                 act: str = "swiglu", bias: bool = False):
        super().__init__()
        if act not in EXPERT_ACTS:
            raise ValueError(f"expert activation {act!r} is unknown; choose one of {list(EXPERT_ACTS)}")
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.act, self.has_bias = act, bias
        self.backend = backend  # requested; resolved lazily per device/dtype
        width = 2 * d_expert if act == "swiglu" else d_expert
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, width))  # [E, D, 2F] or [E, D, F]
        self.w_out = nn.Parameter(torch.empty(n_experts, d_expert, d_model))  # [E, F, D]
        self.b_in = nn.Parameter(torch.empty(n_experts, width)) if bias else None  # [E, F]
        self.b_out = nn.Parameter(torch.empty(n_experts, d_model)) if bias else None  # [E, D]
        self._resolved: dict[tuple, ExpertFn] = {}
        # parallel.activation_checkpointing=moe: the compute is recomputed in the backward
        # (only the rows and offsets are kept), set by moe_vlm.parallel.parallelize
        self.recompute = False
        # moe.ternary (MoTE): computes the experts from quantised weights instead of the
        # backend's plain SwiGLU (moe_vlm.model.ternary_experts.TernaryExperts, installed by
        # the decoder) and is called as quant(rows, offsets, w_in, w_out, backend=NAME);
        # None: full precision
        self.quant: Optional[Callable[..., Tensor]] = None

    def run(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        """``fn(*args)``, under non-reentrant activation checkpointing when ``recompute``
        is set and gradients are on (the dispatcher's fused path goes through here too)."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @property
    def stacked_names(self) -> tuple[str, ...]:
        """The names of the stacked ``[E, ...]`` parameters (what expert parallelism slices)."""
        return ("w_in", "w_out", "b_in", "b_out") if self.has_bias else ("w_in", "w_out")

    @property
    def plain_swiglu(self) -> bool:
        """SwiGLU without biases: the decoder's experts, which every backend runs."""
        return self.act == "swiglu" and not self.has_bias

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float,
                     generator: Optional[torch.Generator] = None) -> None:
        """Normal weights (``w_out`` with ``out_std``), zero biases."""
        self.w_in.normal_(0.0, std, generator=generator)
        self.w_out.normal_(0.0, out_std, generator=generator)
        for b in (self.b_in, self.b_out):
            if b is not None:
                b.zero_()

    def backend_name(self, x: Tensor) -> str:
        return resolve_backend(self.backend, x.device, compute_dtype(x), self.d_model,
                               self.d_expert, self.act, self.has_bias)

    def forward(self, rows: Tensor, offsets: Tensor) -> Tensor:
        """rows [N, D] sorted by expert, offsets [E] int32 group ends -> out [N, D] in the
        compute dtype (the dispatcher weights and combines it)."""
        if self.quant is not None:
            return self.run(partial(self.quant, backend=self.backend_name(rows)), rows, offsets,
                            self.w_in, self.w_out)
        key = (self.backend, rows.device, compute_dtype(rows))
        fn = self._resolved.get(key)
        if fn is None:
            name = self.backend_name(rows)
            fn = BACKENDS[name]() if self.plain_swiglu else partial(MLP_BACKENDS[name], act=self.act)
            self._resolved[key] = fn
        if self.plain_swiglu:
            return self.run(fn, rows, offsets, self.w_in, self.w_out)
        return self.run(fn, rows, offsets, self.w_in, self.w_out, self.b_in, self.b_out)

    def extra_repr(self) -> str:
        extra = "" if self.plain_swiglu else f", act={self.act}, bias={self.has_bias}"
        if self.quant is not None:
            extra += f", quant={self.quant}"
        return (f"n_experts={self.n_experts}, d_model={self.d_model}, "
                f"d_expert={self.d_expert}, backend={self.backend}{extra}")
