"""Token permute and unpermute+combine: moving rows between token order and expert order.

    permute:    rows[perm[t*K + k], :] = x[t, :]
    unpermute:  y[t, :] = sum_k weights[t, k] * rows[perm[t*K + k], :]

Legend: T tokens, K experts per token, N = T*K assignments (rows), D width, E experts.
Shapes: ``x [T, D]``, ``experts [T, K]`` (int, values in [0, E)), ``rows [N, D]`` sorted by
expert (stable: within an expert, token order), ``perm [N]`` int32 (assignment -> row),
``offsets [E]`` int32 cumulative group ends, ``weights [T, K]``. Dtypes: fp32, bf16, fp16
data; weights in any float dtype (combined in fp32).

The index work (counts, offsets, the permutation) is a stable sort on the device, no
host sync. Each data pass is one kernel over blocks of tokens: permute reads every token
row once and writes its K copies; unpermute reads the K rows of each token, weights and
sums them in fp32 and writes the token once. Backward: permute's is a plain unpermute
(sum of the K row gradients); unpermute's writes ``drows = weight * dy[token]`` and
``dweights = <dy[token], row>`` in one pass.

Kernels also accept a variable number of assignments per token (token-CSR ``tok_ptr
[T+1]`` instead of a fixed K), which the fused MoE function uses for capacity-dropped and
expert-choice routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_kernels._utils import (
    check_device,
    check_expert_counts,
    count_ids,
    check_float,
    check_int,
    check_n_experts,
    check_shape,
    interpreting,
)


# ----------------------------------------------------------------------------- reference

def permute_reference(x: Tensor, experts: Tensor, n_experts: int
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Plain torch: stable sort of the flattened assignments by expert, then gather."""
    e = check_n_experts(n_experts, "permute_reference")
    t, k = experts.shape
    flat = experts.reshape(-1)  # [N]
    order = torch.argsort(flat, stable=True)  # [N] row -> assignment
    perm = torch.empty_like(order)
    perm[order] = torch.arange(flat.numel(), device=flat.device)  # assignment -> row
    counts = torch.bincount(flat, minlength=e)  # [E] unless some id >= E
    check_expert_counts(counts, e, "permute_reference")
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # [E]
    rows = x[order // k]  # [N, D]
    return rows, perm.to(torch.int32), offsets


def unpermute_reference(rows: Tensor, perm: Tensor, weights: Tensor) -> Tensor:
    """Plain torch: gather each token's K rows, weight them, sum in fp32."""
    t, k = weights.shape
    got = rows[perm.long()].float().reshape(t, k, rows.shape[1])  # [T, K, D]
    return (got * weights.float()[..., None]).sum(1).to(rows.dtype)


# ----------------------------------------------------------------------------- index plan

@dataclass(frozen=True)
class TokenIndex:
    """Where each token's assignments live in token-sorted assignment order: either a
    fixed ``k`` per token (assignment ``t*k + j``) or a CSR ``tok_ptr [T+1]``."""

    n_tokens: int
    k: int = 0  # > 0: fixed K
    tok_ptr: Optional[Tensor] = None  # [T+1] int32 when k == 0

    def launch_args(self) -> tuple[Tensor | None, int]:
        return self.tok_ptr, self.k


def expert_plan(expert_idx: Tensor, n_experts: int, op: str = "expert_plan"
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Stable expert sort of flat assignments ``expert_idx [N]`` (ids in [0, E)), on the
    device. E is the caller's ``n_experts``, never inferred from the ids, so ``offsets`` has
    E entries even when the highest experts get no tokens.

    Returns ``order [N]`` (row -> assignment), ``row_of [N]`` (assignment -> row), both
    int32, and ``offsets [E]`` int32. No host sync (fixed-size counting, ``count_ids``);
    an id outside [0, E) is refused on the CPU, a device-side index error on CUDA."""
    n_experts = check_n_experts(n_experts, op)
    n = expert_idx.numel()
    order = torch.argsort(expert_idx, stable=True)  # [N]
    row_of = torch.empty(n, dtype=torch.int32, device=expert_idx.device)
    row_of[order] = torch.arange(n, dtype=torch.int32, device=expert_idx.device)
    counts = count_ids(expert_idx, n_experts, op)  # [E]
    return order.to(torch.int32), row_of, torch.cumsum(counts, 0).to(torch.int32)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _token_span(tok_ptr, offs_t, mask_t, FIXED_K: tl.constexpr):
    if FIXED_K > 0:
        start = offs_t * FIXED_K
        cnt = tl.where(mask_t, FIXED_K, 0)
    else:
        start = tl.load(tok_ptr + offs_t, mask=mask_t, other=0)
        cnt = tl.load(tok_ptr + offs_t + 1, mask=mask_t, other=0) - start
    return start, cnt


@triton.jit
def _scatter_rows_kernel(x_ptr, row_of_ptr, tok_ptr, rows_ptr, T, D, stride_x, stride_r,
                         FIXED_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """rows[row_of[a], :] = x[t, :] for every assignment a of token t (x read once)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    xv = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_x + offs_d[None, :],
                 mask=mask_t[:, None] & mask_d[None, :], other=0.0)
    start, cnt = _token_span(tok_ptr, offs_t, mask_t, FIXED_K)
    n_iter = tl.max(cnt, axis=0)
    for j in range(0, n_iter):
        valid = j < cnt
        r = tl.load(row_of_ptr + start + j, mask=valid, other=0).to(tl.int64)
        tl.store(rows_ptr + r[:, None] * stride_r + offs_d[None, :], xv,
                 mask=valid[:, None] & mask_d[None, :])


@triton.jit
def _combine_rows_kernel(rows_ptr, row_of_ptr, tok_ptr, w_ptr, y_ptr, T, D, stride_r, stride_y,
                         HAS_W: tl.constexpr, FIXED_K: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """y[t, :] = sum_a w[a] * rows[row_of[a], :] over the assignments a of token t (fp32)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start, cnt = _token_span(tok_ptr, offs_t, mask_t, FIXED_K)
    n_iter = tl.max(cnt, axis=0)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, n_iter):
        valid = j < cnt
        r = tl.load(row_of_ptr + start + j, mask=valid, other=0).to(tl.int64)
        v = tl.load(rows_ptr + r[:, None] * stride_r + offs_d[None, :],
                    mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            wt = tl.load(w_ptr + start + j, mask=valid, other=0.0).to(tl.float32)
            v = v * wt[:, None]
        acc += v
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * stride_y + offs_d[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _unpermute_bwd_kernel(dy_ptr, rows_ptr, row_of_ptr, tok_ptr, w_ptr, drows_ptr, dw_ptr,
                          T, D, stride_dy, stride_r,
                          FIXED_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """drows[row_of[a]] = w[a] * dy[t];  dw[a] = <dy[t], rows[row_of[a]]> (fp32)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    start, cnt = _token_span(tok_ptr, offs_t, mask_t, FIXED_K)
    n_iter = tl.max(cnt, axis=0)
    t64 = offs_t.to(tl.int64)
    for j in range(0, n_iter):
        valid = j < cnt
        r = tl.load(row_of_ptr + start + j, mask=valid, other=0).to(tl.int64)
        wt = tl.load(w_ptr + start + j, mask=valid, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = valid[:, None] & (offs_d < D)[None, :]
            g = tl.load(dy_ptr + t64[:, None] * stride_dy + offs_d[None, :], mask=m,
                        other=0.0).to(tl.float32)
            v = tl.load(rows_ptr + r[:, None] * stride_r + offs_d[None, :], mask=m,
                        other=0.0).to(tl.float32)
            dot += tl.sum(g * v, axis=1)
            tl.store(drows_ptr + r[:, None] * stride_r + offs_d[None, :],
                     (g * wt[:, None]).to(drows_ptr.dtype.element_ty), mask=m)
        tl.store(dw_ptr + start + j, dot.to(dw_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- launchers

# Sized by registers (sm90_compile_check, bf16, D=2048): 8192 elements on 4 warps held 64 per
# thread in 54-226 registers (combine: 4 blocks of 4 warps per SM; unpermute backward: 2);
# 4096 on 8 warps hold 16 per thread (two 16-byte vectors of bf16) in 32-63 registers:
# 40 resident warps per SM for the combine, 32 for the unpermute backward.
_PROGRAM_ELEMS = 4096
_THREAD_ELEMS = 16


def _blocks(d: int, max_d: int = 1024) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) on GPU: ``_PROGRAM_ELEMS`` per program, rows of up to
    ``max_d`` columns, warps so that each thread holds ``_THREAD_ELEMS``. Interpreting:
    bigger-but-fewer programs (each costs Python time there)."""
    if interpreting():
        return 16, min(triton.next_power_of_2(max(d, 1)), 128), 4
    bd = min(triton.next_power_of_2(max(d, 1)), max_d)
    bt = max(1, _PROGRAM_ELEMS // bd)
    warps = min(16, max(1, bt * bd // (32 * _THREAD_ELEMS)))
    return bt, bd, warps


def scatter_rows(x: Tensor, row_of: Tensor, idx: TokenIndex, n_rows: int) -> Tensor:
    """rows [n_rows, D] with each token's row copied to its assignments' rows. Rows no
    assignment points at are left uninitialised (the caller never reads them)."""
    t, d = x.shape
    rows = torch.empty(n_rows, d, device=x.device, dtype=x.dtype)  # [N, D]
    if t == 0 or n_rows == 0:
        return rows
    bt, bd, warps = _blocks(d)
    tok_ptr, k = idx.launch_args()
    _scatter_rows_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        x, row_of, tok_ptr if tok_ptr is not None else row_of, rows, t, d, x.stride(0),
        rows.stride(0), FIXED_K=k, BLOCK_T=bt, BLOCK_D=bd, num_warps=warps)
    return rows


def combine_rows(rows: Tensor, row_of: Tensor, idx: TokenIndex, weights: Optional[Tensor],
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """y [T, D]: per token, the (weighted) fp32 sum of its assignments' rows."""
    t, d = idx.n_tokens, rows.shape[1]
    y = torch.empty(t, d, device=rows.device, dtype=out_dtype or rows.dtype)  # [T, D]
    if t == 0:
        return y
    bt, bd, warps = _blocks(d)
    tok_ptr, k = idx.launch_args()
    _combine_rows_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        rows, row_of, tok_ptr if tok_ptr is not None else row_of,
        weights if weights is not None else row_of, y, t, d, rows.stride(0), y.stride(0),
        HAS_W=weights is not None, FIXED_K=k, BLOCK_T=bt, BLOCK_D=bd, num_warps=warps)
    return y


def unpermute_backward(dy: Tensor, rows: Tensor, row_of: Tensor, idx: TokenIndex,
                       weights: Tensor) -> tuple[Tensor, Tensor]:
    """(drows [N, D] in rows' dtype, dweights [N] in weights' dtype) in one pass."""
    t, d = dy.shape
    drows = torch.empty_like(rows)  # [N, D]
    dw = torch.empty(row_of.numel(), device=dy.device, dtype=weights.dtype)  # [N]
    if t == 0 or row_of.numel() == 0:
        return drows.zero_(), dw.zero_()
    bt, bd, warps = _blocks(d, max_d=256)
    tok_ptr, k = idx.launch_args()
    _unpermute_bwd_kernel[(triton.cdiv(t, bt),)](
        dy, rows, row_of, tok_ptr if tok_ptr is not None else row_of, weights, drows, dw,
        t, d, dy.stride(0), rows.stride(0), FIXED_K=k, BLOCK_T=bt, BLOCK_D=bd, num_warps=warps)
    return drows, dw


# ----------------------------------------------------------------------------- autograd

class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, row_of: Tensor, k: int) -> Tensor:
        idx = TokenIndex(x.shape[0], k=k)
        ctx.save_for_backward(row_of)
        ctx.idx = idx
        return scatter_rows(x, row_of, idx, row_of.numel())

    @staticmethod
    def backward(ctx, drows: Tensor):
        (row_of,) = ctx.saved_tensors
        return combine_rows(drows.contiguous(), row_of, ctx.idx, None), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, row_of: Tensor, weights: Tensor, t: int, k: int) -> Tensor:
        idx = TokenIndex(t, k=k)
        ctx.save_for_backward(rows, row_of, weights)
        ctx.idx = idx
        return combine_rows(rows, row_of, idx, weights)

    @staticmethod
    def backward(ctx, dy: Tensor):
        rows, row_of, weights = ctx.saved_tensors
        drows, dw = unpermute_backward(dy.contiguous(), rows, row_of, ctx.idx, weights)
        return drows, None, dw.reshape(weights.shape), None, None


# ----------------------------------------------------------------------------- public

def permute(x: Tensor, experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather tokens into expert-sorted rows: ``x [T, D]``, ``experts [T, K]`` (ids in
    [0, E)), ``n_experts`` E -> ``(rows [T*K, D], perm [T*K] int32, offsets [E] int32)``;
    differentiable in ``x``.

    E is required (the configured expert count): inferring it from ``experts`` would be a
    host sync and would drop the offsets of the highest experts when they get no tokens.
    Raises ``ValueError`` if an id is >= E."""
    op = "permute"
    n_experts = check_n_experts(n_experts, op)
    check_shape(x, 2, "x", op, "[T, D]")
    check_shape(experts, 2, "experts", op, "[T, K]")
    check_float(x, "x", op)
    check_int(experts, "experts", op)
    check_device(x, experts, op=op)
    if experts.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: experts has {experts.shape[0]} rows but x has {x.shape[0]} tokens")
    t, k = experts.shape
    _, row_of, offsets = expert_plan(experts.reshape(-1), n_experts, op)  # [N], [E]
    rows = _Permute.apply(x.contiguous(), row_of, k)
    return rows, row_of, offsets


def unpermute(rows: Tensor, perm: Tensor, weights: Tensor) -> Tensor:
    """Weighted combine back to tokens: ``rows [T*K, D]``, ``perm [T*K]`` (from
    ``permute``), ``weights [T, K]`` -> ``y [T, D]`` (in rows' dtype, summed in fp32).
    Differentiable in ``rows`` and ``weights``."""
    op = "unpermute"
    check_shape(rows, 2, "rows", op, "[T*K, D]")
    check_shape(weights, 2, "weights", op, "[T, K]")
    check_float(rows, "rows", op)
    check_float(weights, "weights", op)
    check_int(perm, "perm", op)
    check_device(rows, perm, weights, op=op)
    t, k = weights.shape
    if perm.numel() != t * k or rows.shape[0] < t * k:
        raise ValueError(f"{op}: weights {tuple(weights.shape)} needs perm of {t * k} entries "
                         f"and at least that many rows; got perm {perm.numel()}, rows "
                         f"{rows.shape[0]}")
    return _Unpermute.apply(rows.contiguous(), perm.to(torch.int32).contiguous(),
                            weights.contiguous(), t, k)
