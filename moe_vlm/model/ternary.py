"""Ternary weights and low-bit activations with a straight-through estimator (BitNet b1.58),
for the routed experts of MoTE (Wang et al. 2025, "MoTE: Mixture of Ternary Experts for
Memory-efficient Large Multimodal Models", arXiv 2506.14435).

Legend: E experts, R rows and C columns of a stacked weight ``[E, R, C]``, M matrices
side by side in its columns (SwiGLU's ``w_in`` holds gate and up: M = 2), N rows of
activations, D width.

Weights (absmean, one scale per expert and matrix)::

    g = max(mean |W|, eps)                       over one expert's one matrix
    W_q = clip(round(W / g), -1, 1) * g          values in {-g, 0, +g}

Activations (absmax, one scale per row = per token, b bits, q = 2^(b-1) - 1)::

    s = max(max |x|, eps)                        over one row
    x_q = round(x * (q / s)) / (q / s)           values on a grid of 2q + 1 levels

As in BitNet b1.58's reference code the scale is clamped at ``eps`` (not ``+ eps``), so a
matrix (or row) of zeros quantises to zeros and any other one is divided by its own
mean (max) exactly. ``round`` is round-half-to-even (``torch.round``). Products of
ternary weights and quantised activations sit on grids, so exact ties are common in the
next quantisation: the order of the arithmetic is part of the definition (BitNet's code's:
multiply by ``q / s``, round, divide by it).

Training keeps the full-precision latent weights; the forward uses W_q and the backward
passes the gradient of W_q (and x_q) straight through to W (and x), as if quantisation
were the identity. The two ``autograd.Function`` below return the quantised values exactly
(not ``w + (q - w).detach()``, whose sum can differ from q in the last bit).

The scales are per expert, never across experts: a rank holding a slice of the experts
(expert parallelism) quantises them as one process would, with no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-5  # BitNet b1.58's clamp on the scales


def ternary_codes(w: Tensor, n_mats: int = 1) -> tuple[Tensor, Tensor]:
    """The ternary codes and scales of stacked expert weights ``w [E, R, C]`` whose columns
    hold ``n_mats`` matrices side by side (each C / n_mats wide).

    Returns ``codes [E, R, C]`` (values -1, 0, 1, in w's dtype) and ``scales [E, M]``
    (``max(mean |W|, eps)`` of each expert's each matrix); ``codes * scale`` is W_q."""
    if w.dim() != 3:
        raise ValueError(f"ternary_codes: expected stacked weights [E, R, C], got shape {tuple(w.shape)}")
    e, r, c = w.shape
    if n_mats < 1 or c % n_mats:
        raise ValueError(f"ternary_codes: {c} columns do not split into {n_mats} equal matrices")
    blocks = w.reshape(e, r, n_mats, c // n_mats)  # [E, R, M, C/M]
    scales = blocks.abs().mean(dim=(1, 3)).clamp(min=EPS)  # [E, M]
    s = scales[:, None, :, None]  # [E, 1, M, 1]
    codes = torch.round(blocks / s).clamp(-1, 1)  # [E, R, M, C/M]
    return codes.reshape(e, r, c), scales


def ternary_dequant(codes: Tensor, scales: Tensor) -> Tensor:
    """W_q = codes * scale: ``codes [E, R, C]``, ``scales [E, M]`` -> ``[E, R, C]``."""
    e, r, c = codes.shape
    m = scales.shape[1]
    return (codes.reshape(e, r, m, c // m) * scales[:, None, :, None]).reshape(e, r, c)


def absmax_quantize(x: Tensor, bits: int) -> Tensor:
    """Per-row absmax quantisation of ``x [..., D]`` to ``bits`` bits, returned dequantised
    (same shape and dtype): ``round(x * (q / s)) / (q / s)``, ``s = max(max_row |x|, eps)``,
    ``q = 2^(bits-1) - 1`` (127 for 8 bits). Computed in fp32 (fp64 for fp64 input)."""
    if bits < 2:
        raise ValueError(f"absmax_quantize: bits={bits}; need at least 2 (1 bit has no zero)")
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    q = float(2 ** (bits - 1) - 1)
    scale = q / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # [..., 1]
    return (torch.round(xf * scale) / scale).to(x.dtype)


class _TernarySTE(torch.autograd.Function):
    """Forward: W_q (exactly). Backward: the gradient of W_q, unchanged, to W."""

    @staticmethod
    def forward(ctx, w: Tensor, n_mats: int) -> Tensor:  # type: ignore[override]
        return ternary_dequant(*ternary_codes(w, n_mats))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class _AbsmaxSTE(torch.autograd.Function):
    """Forward: x_q (exactly). Backward: the gradient of x_q, unchanged, to x."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        return absmax_quantize(x, bits)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def ternary_weight(w: Tensor, n_mats: int = 1) -> Tensor:
    """W_q of stacked expert weights ``w [E, R, C]`` (``n_mats`` matrices in the columns),
    differentiable by the straight-through estimator: dL/dW = dL/dW_q."""
    return _TernarySTE.apply(w, n_mats)


def quantize_activations(x: Tensor, bits: int) -> Tensor:
    """x_q of ``x [..., D]`` (per-row absmax, ``bits`` bits; ``bits=0``: x unchanged),
    differentiable by the straight-through estimator: dL/dx = dL/dx_q."""
    if bits == 0:
        return x
    return _AbsmaxSTE.apply(x, bits)
