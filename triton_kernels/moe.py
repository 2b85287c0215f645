"""Fused SwiGLU MoE experts: permute into GEMM 1, SwiGLU in its epilogue, GEMM 2, combine.

    y[t] = sum_{assignments (t, e, w)} w * (silu(x[t] @ Wg[e]) * (x[t] @ Wu[e])) @ Wo[e]

Legend: T tokens, D model width, F expert width, E experts, N assignments (rows).
Shapes: ``x [T, D]``; flat assignments ``token_idx, expert_idx, weight [N]`` (any order,
any number per token: top-k, capacity-dropped, expert-choice); ``w_in [E, D, 2F]``
(columns ``:F`` gate, ``F:`` up), ``w_out [E, F, D]``. Dtypes: x and weights fp32, bf16
or fp16 alike, routing weights any float; fp32 accumulation everywhere.

Forward is three launches after a device-side index plan (stable sorts, no host sync):
1. grouped GEMM 1 reads token rows of ``x`` through the row->token index (the permute
   is fused into the A-operand load), accumulates gate and up side by side and stores
   ``h = [gate | up]`` and ``act = silu(gate) * up``;
2. grouped GEMM 2: ``out = act @ w_out[e]``;
3. combine: per token, the routing-weighted fp32 sum of its rows.
Saved for backward: ``h [N, 2F]`` (plus ``x``, weights and int32 indices): less than the
``torch._grouped_mm`` pipeline, which keeps the permuted rows, gate, up, silu(gate),
their product and the expert outputs.

Backward: ``g = dy[token] @ w_out[e]^T`` (gather fused again), one elementwise pass
gives ``dh``, ``w * act`` and the routing-weight gradient ``<g, act>``, two weight-gradient
grouped GEMMs, ``drows = dh @ w_in[e]^T`` and a combine for ``dx``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from triton_kernels._utils import (
    check_device,
    check_float,
    check_int,
    check_same_dtype,
    check_shape,
    count_ids,
    interpreting,
)
from triton_kernels.grouped_gemm import check_offsets, gg_forward, gg_weight_grad
from triton_kernels.permute import TokenIndex, combine_rows, expert_plan


# ----------------------------------------------------------------------------- reference

def moe_experts_reference(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                          w_in: Tensor, w_out: Tensor) -> Tensor:
    """Plain torch: stable sort by expert, gather, ``sorted_experts_reference``, weighted
    fp32 combine. One host sync (the offsets)."""
    order = torch.argsort(expert_idx, stable=True)  # [N]
    offsets = torch.cumsum(torch.bincount(expert_idx, minlength=w_in.shape[0]), 0)  # [E]
    tok = token_idx[order]
    out = sorted_experts_reference(x[tok], offsets, w_in, w_out)  # [N, D]
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=acc)  # [T, D]
    y = y.index_add(0, tok, out.to(acc) * weight[order, None].to(acc))
    # keep every input in the graph so all gradients exist (zeros when nothing is routed)
    y = y + 0 * (x.sum() + weight.sum()).to(acc)
    return y.to(x.dtype)


def sorted_experts_reference(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """Plain torch: each group of expert-sorted rows through its expert's SwiGLU.
    One host sync (the offsets)."""
    bounds = [0, *offsets.tolist()]  # host sync
    out = rows.new_zeros(rows.shape[0], w_out.shape[2])  # [N, D]
    for e in range(w_in.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            gate, up = (rows[lo:hi] @ w_in[e]).chunk(2, dim=-1)  # [n, F]
            out[lo:hi] = (F.silu(gate) * up) @ w_out[e]
    return out + 0 * (w_in.sum() + w_out.sum())  # every input in the graph


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _swiglu_bwd_kernel(g_ptr, h_ptr, w_ptr, dh_ptr, actw_ptr, dw_ptr, R, FF,
                       stride_g, stride_h, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    """Per row r (weight w, h = [a | b], g = dL/d(out_r) @ Wo^T unweighted):
    act = silu(a) * b;  dw = <g, act>;  dact = w * g;
    dh = [dact * b * silu'(a) | dact * silu(a)];  actw = w * act."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < R
    r64 = offs_m.to(tl.int64)
    wt = tl.load(w_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for f0 in range(0, FF, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        m = mask_m[:, None] & (offs_f < FF)[None, :]
        g = tl.load(g_ptr + r64[:, None] * stride_g + offs_f[None, :], mask=m, other=0.0).to(tl.float32)
        h_ptrs = h_ptr + r64[:, None] * stride_h + offs_f[None, :]
        a = tl.load(h_ptrs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(h_ptrs + FF, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        act = silu * b
        dot += tl.sum(g * act, axis=1)
        dact = g * wt[:, None]
        dh_ptrs = dh_ptr + r64[:, None] * stride_h + offs_f[None, :]
        tl.store(dh_ptrs, (dact * b * sig * (1.0 + a * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dh_ptrs + FF, (dact * silu).to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(actw_ptr + r64[:, None] * stride_g + offs_f[None, :],
                 (act * wt[:, None]).to(actw_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + offs_m, dot, mask=mask_m)


def swiglu_backward(g: Tensor, h: Tensor, w_row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dh [N, 2F], actw [N, F], dw_row [N] fp32) from g [N, F], h [N, 2F], w_row [N]."""
    n, f = g.shape
    dh = torch.empty_like(h)
    actw = torch.empty_like(g)
    dw = torch.empty(n, device=g.device, dtype=torch.float32)
    if n == 0:
        return dh, actw, dw
    if interpreting():  # few, big programs: each costs Python time there
        bm, bf, warps = 16, min(triton.next_power_of_2(f), 128), 4
    else:
        # 8 rows x 256 columns on 8 warps: 8 elements of each of g, gate, up per thread
        # (53 registers); 32 x 256 on 4 warps held 64 and spilled ~240 B per thread
        bm, bf = 8, min(triton.next_power_of_2(f), 256)
        warps = max(1, bm * bf // (32 * 8))
    _swiglu_bwd_kernel[(triton.cdiv(n, bm),)](g, h, w_row, dh, actw, dw, n, f, g.stride(0),
                                              h.stride(0), BLOCK_M=bm, BLOCK_F=bf, num_warps=warps)
    return dh, actw, dw


# ----------------------------------------------------------------------------- index plan

def _token_order(token_idx: Tensor, expert_idx: Tensor, weight: Tensor, n_tokens: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, TokenIndex]:
    """Stable sort of flat assignments by token (no host sync): returns the sort order,
    sorted token/expert/weight and the token CSR (``tok_ptr [T+1]``)."""
    ts = torch.argsort(token_idx, stable=True)  # [N]
    counts = count_ids(token_idx, n_tokens, "moe_experts", "token ids")  # [T], no host sync
    tok_ptr = torch.zeros(n_tokens + 1, dtype=torch.int32, device=token_idx.device)
    tok_ptr[1:] = torch.cumsum(counts, 0)
    return ts, token_idx[ts], expert_idx[ts], weight[ts], TokenIndex(n_tokens, tok_ptr=tok_ptr)


# ----------------------------------------------------------------------------- autograd

# The fused pipeline and the sorted-rows experts are each a pair of ``torch.library``
# custom ops (forward, backward) with fake implementations, so ``torch.compile`` keeps a
# layer that calls them in one graph (the ops are opaque to it) instead of tracing into
# kernel launches.

@torch.library.custom_op("triton_kernels::moe_experts_fwd", mutates_args=())
def _moe_fwd(x: Tensor, w_in: Tensor, w_out: Tensor, weight_s: Tensor, tok_s: Tensor,
             exp_s: Tensor, tok_ptr: Optional[Tensor], k: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Assignments already token-sorted (``*_s [N]``); tokens either fixed-K or CSR ->
    (y [T, D], and for the backward: h [N, 2F], src_row [N], w_row [N], row_of [N],
    offsets [E])."""
    t, n_exp = x.shape[0], w_in.shape[0]
    idx = TokenIndex(t, k=k, tok_ptr=tok_ptr)
    order, row_of, offsets = expert_plan(exp_s, n_exp, "moe_experts")  # [N], [N], [E]
    src_row = tok_s[order.long()].to(torch.int32)  # [N] token of each row
    w_row = weight_s[order.long()].contiguous()  # [N] routing weight of each row
    act, h = gg_forward(x, w_in, offsets, a_idx=src_row, swiglu=True)  # [N, F], [N, 2F]
    out, _ = gg_forward(act, w_out, offsets)  # [N, D]
    y = combine_rows(out, row_of, idx, weight_s)  # [T, D]
    return y, h, src_row, w_row, row_of, offsets


@_moe_fwd.register_fake
def _(x, w_in, w_out, weight_s, tok_s, exp_s, tok_ptr, k):
    n, (e, _, f2) = tok_s.shape[0], w_in.shape
    i32 = dict(dtype=torch.int32, device=x.device)
    return (x.new_empty(x.shape), x.new_empty(n, f2), torch.empty(n, **i32),
            weight_s.new_empty(n), torch.empty(n, **i32), torch.empty(e, **i32))


@torch.library.custom_op("triton_kernels::moe_experts_bwd", mutates_args=())
def _moe_bwd(dy: Tensor, x: Tensor, w_in: Tensor, w_out: Tensor, h: Tensor, src_row: Tensor,
             w_row: Tensor, row_of: Tensor, offsets: Tensor, tok_ptr: Optional[Tensor], k: int,
             need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [T, D], dw_in [E, D, 2F], dw_out [E, F, D], dweight_s [N] fp32); a gradient
    not in ``need`` (x, w_in, w_out, weight) is not computed and comes back empty."""
    dy = dy.contiguous()
    n_exp = w_in.shape[0]
    idx = TokenIndex(x.shape[0], k=k, tok_ptr=tok_ptr)
    g, _ = gg_forward(dy, w_out, offsets, a_idx=src_row, transpose_w=True)  # [N, F]
    dh, actw, dw_row = swiglu_backward(g, h, w_row)  # [N, 2F], [N, F], [N]
    dx, dw_in, dw_out, dweight_s = (x.new_empty(0) for _ in range(4))  # distinct: no aliasing
    if need[2]:
        dw_out = gg_weight_grad(actw, dy, offsets, n_exp, b_idx=src_row)  # [E, F, D]
    if need[1]:
        dw_in = gg_weight_grad(x, dh, offsets, n_exp, a_idx=src_row)  # [E, D, 2F]
    if need[0]:
        drows, _ = gg_forward(dh, w_in, offsets, transpose_w=True)  # [N, D]
        dx = combine_rows(drows, row_of, idx, None)  # [T, D]
    if need[3]:
        dweight_s = dw_row[row_of.long()]  # [N] back to token-sorted assignment order
    return dx, dw_in, dw_out, dweight_s


@_moe_bwd.register_fake
def _(dy, x, w_in, w_out, h, src_row, w_row, row_of, offsets, tok_ptr, k, need):
    def made(i: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        return like.new_empty(like.shape if need[i] else (0,), dtype=dtype)

    n = src_row.shape[0]
    return (made(0, x, x.dtype), made(1, w_in, x.dtype), made(2, w_out, x.dtype),
            made(3, src_row.new_empty(n), torch.float32))


def _moe_setup(ctx, inputs, output) -> None:
    x, w_in, w_out, _, _, _, tok_ptr, k = inputs
    _, h, src_row, w_row, row_of, offsets = output
    ctx.save_for_backward(x, w_in, w_out, h, src_row, w_row, row_of, offsets, tok_ptr)
    ctx.k = k
    ctx.mark_non_differentiable(*output[1:])


def _moe_backward(ctx, dy: Tensor, *_unused: Tensor):
    x, w_in, w_out, h, src_row, w_row, row_of, offsets, tok_ptr = ctx.saved_tensors
    need = [bool(b) for b in ctx.needs_input_grad[:4]]
    grads = _moe_bwd(dy, x, w_in, w_out, h, src_row, w_row, row_of, offsets, tok_ptr, ctx.k, need)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)


_moe_fwd.register_autograd(_moe_backward, setup_context=_moe_setup)


@torch.library.custom_op("triton_kernels::sorted_experts_fwd", mutates_args=())
def _sorted_fwd(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor
                ) -> tuple[Tensor, Tensor]:
    """SwiGLU experts on rows already sorted by expert: GEMM 1 with SwiGLU in its
    epilogue, GEMM 2 -> (out [N, D], h [N, 2F] for the backward)."""
    act, h = gg_forward(rows, w_in, offsets, swiglu=True)  # [N, F], [N, 2F]
    out, _ = gg_forward(act, w_out, offsets)  # [N, D]
    return out, h


@_sorted_fwd.register_fake
def _(rows, offsets, w_in, w_out):
    return rows.new_empty(rows.shape[0], w_out.shape[2]), rows.new_empty(rows.shape[0], w_in.shape[2])


@torch.library.custom_op("triton_kernels::sorted_experts_bwd", mutates_args=())
def _sorted_bwd(dout: Tensor, rows: Tensor, w_in: Tensor, w_out: Tensor, h: Tensor,
                offsets: Tensor, need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(drows [N, D], dw_in [E, D, 2F], dw_out [E, F, D]) as ``_moe_bwd`` without gathers
    or combines; a gradient not in ``need`` (rows, w_in, w_out) comes back empty."""
    dout = dout.contiguous()
    n_exp = w_in.shape[0]
    g, _ = gg_forward(dout, w_out, offsets, transpose_w=True)  # [N, F]
    ones = torch.ones(rows.shape[0], device=rows.device, dtype=torch.float32)
    dh, act, _ = swiglu_backward(g, h, ones)  # [N, 2F], [N, F]
    drows, dw_in, dw_out = (rows.new_empty(0) for _ in range(3))  # distinct: no aliasing
    if need[2]:
        dw_out = gg_weight_grad(act, dout, offsets, n_exp)  # [E, F, D]
    if need[1]:
        dw_in = gg_weight_grad(rows, dh, offsets, n_exp)  # [E, D, 2F]
    if need[0]:
        drows, _ = gg_forward(dh, w_in, offsets, transpose_w=True)  # [N, D]
    return drows, dw_in, dw_out


@_sorted_bwd.register_fake
def _(dout, rows, w_in, w_out, h, offsets, need):
    return tuple(t.new_empty(t.shape if n else (0,)) for t, n in zip((rows, w_in, w_out), need))


def _sorted_setup(ctx, inputs, output) -> None:
    rows, offsets, w_in, w_out = inputs
    ctx.save_for_backward(rows, w_in, w_out, output[1], offsets)
    ctx.mark_non_differentiable(output[1])


def _sorted_backward(ctx, dout: Tensor, _dh: Tensor):
    rows, w_in, w_out, h, offsets = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[i]) for i in (0, 2, 3)]
    drows, dw_in, dw_out = _sorted_bwd(dout, rows, w_in, w_out, h, offsets, need)
    return (drows if need[0] else None, None, dw_in if need[1] else None,
            dw_out if need[2] else None)


_sorted_fwd.register_autograd(_sorted_backward, setup_context=_sorted_setup)


# ----------------------------------------------------------------------------- public

def sorted_experts(rows: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """SwiGLU experts on expert-sorted rows: ``rows [N, D]`` with ``offsets [E]`` (int32
    cumulative group ends; rows ``offsets[e-1]:offsets[e]`` belong to expert e) ->
    ``out [N, D]``. What a dispatcher (permute, all-to-all) feeds; differentiable in rows
    and both weights. No host sync."""
    op = "sorted_experts"
    _validate(rows, w_in, w_out, op)
    check_device(rows, offsets, w_in, w_out, op=op)
    offsets = check_offsets(offsets, w_in.shape[0], op)
    return _sorted_fwd(rows.contiguous(), offsets, w_in.contiguous(), w_out.contiguous())[0]


def _validate(x: Tensor, w_in: Tensor, w_out: Tensor, op: str) -> None:
    check_shape(x, 2, "x", op, "[T, D]")
    check_shape(w_in, 3, "w_in", op, "[E, D, 2F]")
    check_shape(w_out, 3, "w_out", op, "[E, F, D]")
    check_float(x, "x", op)
    check_same_dtype(op, x=x, w_in=w_in, w_out=w_out)
    e, d, f2 = w_in.shape
    if x.shape[1] != d or f2 % 2 or tuple(w_out.shape) != (e, f2 // 2, d):
        raise ValueError(f"{op}: shapes do not fit: x {tuple(x.shape)} [T, D], w_in "
                         f"{tuple(w_in.shape)} [E, D, 2F], w_out {tuple(w_out.shape)} [E, F, D]")


def moe_experts(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                w_in: Tensor, w_out: Tensor) -> Tensor:
    """Routed SwiGLU experts over flat assignments -> ``y [T, D]`` (x's dtype).

    The ``triton`` expert backend of ``moe_vlm``; same signature as its other backends.
    Differentiable in ``x``, ``w_in``, ``w_out`` and ``weight``. No host sync."""
    op = "moe_experts"
    _validate(x, w_in, w_out, op)
    for name, v in (("token_idx", token_idx), ("expert_idx", expert_idx)):
        check_int(v, name, op)
        check_shape(v, 1, name, op, "[N]")
    check_float(weight, "weight", op)
    if not token_idx.shape == expert_idx.shape == weight.shape:
        raise ValueError(f"{op}: token_idx, expert_idx, weight must all be [N]; got "
                         f"{tuple(token_idx.shape)}, {tuple(expert_idx.shape)}, {tuple(weight.shape)}")
    check_device(x, token_idx, expert_idx, weight, w_in, w_out, op=op)
    ts, tok_s, exp_s, w_s, idx = _token_order(token_idx, expert_idx, weight, x.shape[0])
    return _moe_fwd(x.contiguous(), w_in.contiguous(), w_out.contiguous(), w_s, tok_s, exp_s,
                    idx.tok_ptr, 0)[0]


def moe_experts_topk(x: Tensor, experts: Tensor, weights: Tensor, w_in: Tensor,
                     w_out: Tensor) -> Tensor:
    """Token-choice form: ``experts, weights [T, K]`` (every token has K assignments) ->
    ``y [T, D]``. Skips the token sort of ``moe_experts``."""
    op = "moe_experts_topk"
    _validate(x, w_in, w_out, op)
    check_shape(experts, 2, "experts", op, "[T, K]")
    check_shape(weights, 2, "weights", op, "[T, K]")
    check_int(experts, "experts", op)
    check_float(weights, "weights", op)
    if experts.shape != weights.shape or experts.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: experts {tuple(experts.shape)} and weights "
                         f"{tuple(weights.shape)} must both be [T, K] with T={x.shape[0]}")
    check_device(x, experts, weights, w_in, w_out, op=op)
    t, k = experts.shape
    tok = torch.arange(t, device=x.device, dtype=torch.int32).repeat_interleave(k)  # [N]
    return _moe_fwd(x.contiguous(), w_in.contiguous(), w_out.contiguous(),
                    weights.reshape(-1), tok, experts.reshape(-1), None, k)[0]
