"""MoTE's routed experts: SwiGLU with ternary weights and (optionally) 8-bit activations,
on any expert backend (``moe.ternary``, ``moe.ternary_act_bits``).

Legend: N rows (one per assignment, sorted by expert), D model width, F expert width,
E experts.

Per expert e and row x (Wang et al. 2025, MoTE, following BitNet b1.58; ``ternary``)::

    h = Q_a(x) @ Q_w(W_in[e])              Q_w per expert and matrix: gate, up, down
    y = Q_a(silu(h_gate) * h_up) @ Q_w(W_out[e])

Q_w is absmean ternary, Q_a per-token absmax at ``act_bits`` bits (0: the identity, weights
only); both pass gradients straight through. The weights are quantised before any backend
sees them, so ``torch``, ``grouped_mm`` and ``triton`` run plain tensors. Weights only
(``act_bits=0``), each backend runs its usual SwiGLU pair; with activation quantisation the
hidden activation must be quantised between the two GEMMs, so the pair runs as two grouped
GEMMs of that backend (``triton``: ``triton_kernels.grouped_gemm``, not the fused kernels,
whose SwiGLU lives in the first GEMM's epilogue).

The full-precision latent weights stay the parameters (and what checkpoints hold); the
ternary codes are recomputed from them each forward. Training cost: the quantisation
adds elementwise passes over the expert weights per step, no matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_vlm.model.experts import BACKENDS, _expert_loop, compute_dtype
from moe_vlm.model.ternary import quantize_activations, ternary_weight

GroupedGemm = Callable[[Tensor, Tensor, Tensor], Tensor]


def gemm_torch(rows: Tensor, offsets: Tensor, w: Tensor) -> Tensor:
    """Each group of rows [n, K] times its expert's ``w[e]`` [K, M]: [N, K] -> [N, M] in
    the compute dtype. One host sync (the offsets)."""
    dt = compute_dtype(rows)
    return _expert_loop(rows, offsets, w.shape[2], lambda e, x: x @ w[e].to(dt), w)


def gemm_grouped_mm(rows: Tensor, offsets: Tensor, w: Tensor) -> Tensor:
    """``gemm_torch`` as one ``torch._grouped_mm``. No host sync."""
    dt = compute_dtype(rows)
    return torch._grouped_mm(rows.to(dt), w.to(dt), offs=offsets)


def gemm_triton(rows: Tensor, offsets: Tensor, w: Tensor) -> Tensor:
    """``gemm_torch`` as ``triton_kernels.grouped_gemm`` (in the compute dtype: the kernel
    ignores autocast, so the cast happens here, differentiably). No host sync."""
    from triton_kernels import grouped_gemm

    dt = compute_dtype(rows)
    with torch.autocast(rows.device.type, enabled=False):
        return grouped_gemm(rows.to(dt), w.to(dt), offsets)


GEMMS: dict[str, GroupedGemm] = {"torch": gemm_torch, "grouped_mm": gemm_grouped_mm,
                                 "triton": gemm_triton}


@dataclass(frozen=True)
class TernaryExperts:
    """The compute of ternary SwiGLU experts, installed on a ``GroupedExperts`` as its
    ``quant`` (by the decoder, for ``moe.ternary=true``), which then calls it with its
    latent weights and its resolved backend name."""

    act_bits: int = 8  # bits of the per-token activation quantisation (0 = none)

    def __call__(self, rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor,
                 backend: str) -> Tensor:
        """rows [N, D] sorted by expert, offsets [E] int32 group ends, latent weights
        ``w_in [E, D, 2F]`` (gate | up), ``w_out [E, F, D]`` -> out [N, D] in the compute
        dtype."""
        wq_in = ternary_weight(w_in, n_mats=2)  # [E, D, 2F]: gate and up scaled apart
        wq_out = ternary_weight(w_out)  # [E, F, D]
        if self.act_bits == 0:
            return BACKENDS[backend]()(rows, offsets, wq_in, wq_out)
        gemm = GEMMS[backend]
        h = gemm(quantize_activations(rows, self.act_bits), offsets, wq_in)  # [N, 2F]
        gate, up = h.chunk(2, dim=-1)  # [N, F] each
        hidden = F.silu(gate) * up  # [N, F]
        return gemm(quantize_activations(hidden, self.act_bits), offsets, wq_out)  # [N, D]
