"""Grouped GEMM: one GEMM per expert over expert-sorted rows, in one persistent launch.

    y[r, :] = x[r, :] @ w[e(r)]      for rows r in group e = [offsets[e-1], offsets[e])

Legend: R rows (expert-sorted), K reduction width, N output width, E groups (experts).
Shapes: ``x [R, K]``, ``w [E, K, N]``, ``offsets [E]`` int32 cumulative group ends
(non-decreasing, ``offsets[-1] <= R``; rows past ``offsets[-1]`` come out as zeros).
Dtypes: fp32, bf16, fp16 (x and w alike), fp32 accumulation, output in the input dtype.
Any group size, including zero; K and N need not be multiples of the block sizes.
Backward: ``dx = dy @ w[e]^T`` per group (the same kernel reading w transposed) and
``dw[e] = x_e^T @ dy_e`` (a kernel tiled over (e, K, N) that reduces over the group).

Tile scheduling is persistent: a fixed grid of programs (a few per SM) walks the tiles of
all groups in order, reading group ends from ``offsets`` on the device, so launching never
waits for the host to learn the group sizes. The same two kernels also serve the fused
MoE function (``triton_kernels.moe``): rows of ``x`` can be gathered through an index
(permute fused into the first GEMM), scaled per row, and the first GEMM can finish with a
SwiGLU epilogue (gate and up accumulated side by side, ``silu(gate) * up`` stored).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_kernels import tuning
from triton_kernels._utils import (
    check_device,
    check_float,
    check_int,
    check_same_dtype,
    check_shape,
    interpreting,
)
from triton_kernels.tma import dw_tma_ok, ensure_allocator, gg_tma_ok, w_tile


# ----------------------------------------------------------------------------- reference

def grouped_gemm_reference(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Plain-torch loop over groups (fp32 accumulation). One host sync (``tolist``)."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)  # [R, N]
    start = 0
    for e, end in enumerate(offsets.tolist()):  # host sync
        if end > start:
            out[start:end] = (x[start:end].float() @ w[e].float()).to(x.dtype)
        start = end
    return out


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gg_kernel(
    a_ptr, a_idx_ptr, scale_ptr, w_ptr, c_ptr, h_ptr, offs_ptr,
    R, E, N, K,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_cm, stride_hm,
    HAS_A_IDX: tl.constexpr, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr,
    TRANS_W: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
):
    """C[r, n] = scale[r] * sum_k A[src(r), k] * W[e(r), k, n] over persistent tiles.

    src(r) = a_idx[r] if HAS_A_IDX else r. With SWIGLU, W has 2N columns (gate | up):
    H[r, :] = [gate | up] is stored and C[r, n] = silu(gate) * up. Group E (one past the
    last) is the tail of rows past offsets[E-1]: it is written as zeros. USE_TMA loads W
    (and A unless gathered) through tensor descriptors (``tma.py``); TRANS_W says W is
    stored [E, N, K] (only the descriptors need to know)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    if USE_TMA:
        NW = 2 * N if SWIGLU else N
        if not HAS_A_IDX:
            a_desc = tl.make_tensor_descriptor(a_ptr, [R, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        if TRANS_W:
            w_desc = tl.make_tensor_descriptor(w_ptr, [E, NW, K], [stride_we, stride_wn, 1],
                                               [1, BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, [E, K, NW], [stride_we, stride_wk, 1],
                                               [1, BLOCK_K, BLOCK_N])
    tile = pid
    tile_base = 0
    start = 0
    for e in range(0, E + 1):
        if e < E:
            end = tl.load(offs_ptr + e)
        else:
            end = R
        tiles_m = tl.cdiv(end - start, BLOCK_M)
        tiles_e = tiles_m * tiles_n
        while tile < tile_base + tiles_e:
            local = tile - tile_base
            tm = local % tiles_m  # m fastest: neighbouring programs share a weight tile
            tn = local // tiles_m
            offs_m = start + tm * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if e < E:
                if HAS_A_IDX:
                    src = tl.load(a_idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
                else:
                    src = offs_m.to(tl.int64)
                w_base = w_ptr + e * stride_we.to(tl.int64)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < K
                    if USE_TMA and not HAS_A_IDX:
                        a = a_desc.load([start + tm * BLOCK_M, k0])
                    else:
                        a = tl.load(a_ptr + src[:, None] * stride_am + offs_k[None, :] * stride_ak,
                                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    if USE_TMA:
                        b = w_tile(w_desc, e, k0, tn * BLOCK_N, TRANS_W, BLOCK_K, BLOCK_N)
                    else:
                        w_ptrs = w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
                        w_mask = mask_k[:, None] & mask_n[None, :]
                        b = tl.load(w_ptrs, mask=w_mask, other=0.0)
                    if DOT_FP32:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
                    if SWIGLU:
                        if USE_TMA:  # up columns start at N (gate columns past N are masked)
                            bu = w_tile(w_desc, e, k0, N + tn * BLOCK_N, TRANS_W, BLOCK_K, BLOCK_N)
                        else:
                            bu = tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0)
                        if DOT_FP32:
                            bu = bu.to(tl.float32)
                        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
                if HAS_SCALE:
                    s = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
                    acc = acc * s[:, None]
                    acc_u = acc_u * s[:, None]
            rows64 = offs_m.to(tl.int64)
            out_mask = mask_m[:, None] & mask_n[None, :]
            if SWIGLU:
                h_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_n[None, :]
                gate = acc.to(h_ptr.dtype.element_ty)
                up = acc_u.to(h_ptr.dtype.element_ty)
                tl.store(h_ptrs, gate, mask=out_mask)
                tl.store(h_ptrs + N, up, mask=out_mask)
                # the activation is computed from the stored (rounded) gate/up, exactly as the
                # backward recomputes it
                g32 = gate.to(tl.float32)
                acc = g32 * tl.sigmoid(g32) * up.to(tl.float32)
            tl.store(c_ptr + rows64[:, None] * stride_cm + offs_n[None, :],
                     acc.to(c_ptr.dtype.element_ty), mask=out_mask)
            tile += nprog
        tile_base += tiles_e
        start = end


@triton.jit
def _gg_dw_kernel(
    a_ptr, a_idx_ptr, b_ptr, b_idx_ptr, dw_ptr, offs_ptr,
    E, K, N,
    stride_am, stride_bm, stride_dwe, stride_dwk,
    HAS_A_IDX: tl.constexpr, HAS_B_IDX: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dW[e, k, n] = sum_{r in group e} A[srcA(r), k] * B[srcB(r), n]; persistent over
    (e, k-tile, n-tile) tiles, each reducing over its group's rows (zeros if empty).

    A gathered operand's row indices are loaded one step ahead (``*_next``): an index load
    feeding the tile load in the same iteration made the pipeliner keep only 2 buffers
    whatever ``num_stages`` said. USE_TMA loads the non-gathered operands through
    descriptors that end at the group's last row."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles_n = tl.cdiv(N, BLOCK_N)
    total = E * tiles_k * tiles_n
    for tile in range(pid, total, nprog):
        e = tile // (tiles_k * tiles_n)
        rest = tile % (tiles_k * tiles_n)
        tk = rest % tiles_k
        tn = rest // tiles_k
        end = tl.load(offs_ptr + e)
        if e > 0:
            start = tl.load(offs_ptr + e - 1)
        else:
            start = end * 0
        offs_k = tk * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            rows = tl.maximum(end - start, 1)  # an empty group: never loaded, keep it valid
            if not HAS_A_IDX:
                a_desc = tl.make_tensor_descriptor(a_ptr + start.to(tl.int64) * stride_am, [rows, K],
                                                   [stride_am, 1], [BLOCK_M, BLOCK_K])
            if not HAS_B_IDX:
                b_desc = tl.make_tensor_descriptor(b_ptr + start.to(tl.int64) * stride_bm, [rows, N],
                                                   [stride_bm, 1], [BLOCK_M, BLOCK_N])
        nxt = start + tl.arange(0, BLOCK_M)
        if HAS_A_IDX:
            sa_next = tl.load(a_idx_ptr + nxt, mask=nxt < end, other=0)
        if HAS_B_IDX:
            sb_next = tl.load(b_idx_ptr + nxt, mask=nxt < end, other=0)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            nxt = offs_m + BLOCK_M
            if HAS_A_IDX:
                sa = sa_next.to(tl.int64)
                sa_next = tl.load(a_idx_ptr + nxt, mask=nxt < end, other=0)
            else:
                sa = offs_m.to(tl.int64)
            if HAS_B_IDX:
                sb = sb_next.to(tl.int64)
                sb_next = tl.load(b_idx_ptr + nxt, mask=nxt < end, other=0)
            else:
                sb = offs_m.to(tl.int64)
            if USE_TMA and not HAS_A_IDX:
                at = a_desc.load([m0 - start, tk * BLOCK_K]).T  # [BK, BM]
            else:
                at = tl.load(a_ptr + sa[None, :] * stride_am + offs_k[:, None],
                             mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BK, BM]
            if USE_TMA and not HAS_B_IDX:
                b = b_desc.load([m0 - start, tn * BLOCK_N])  # [BM, BN]
            else:
                b = tl.load(b_ptr + sb[:, None] * stride_bm + offs_n[None, :],
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # [BM, BN]
            if DOT_FP32:
                at = at.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(at, b, acc, input_precision=PRECISION)
        dw_ptrs = (dw_ptr + e * stride_dwe.to(tl.int64) + offs_k[:, None].to(tl.int64) * stride_dwk
                   + offs_n[None, :])
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty),
                 mask=mask_k[:, None] & mask_n[None, :])


_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
_tuned: dict[tuple[str, str, int, bool], object] = {}
# Each variant tunes apart: gathered rows, a row scale, a transposed weight (stride_wn != 1)
# or fp32's dot precision change the kernel's speed, so one tile choice need not fit all.
_TUNE_KEYS = {"gg": ["N", "K", "stride_wn", "HAS_A_IDX", "HAS_SCALE", "PRECISION"],
              "dw": ["K", "N", "HAS_A_IDX", "HAS_B_IDX", "PRECISION"]}


def _kernel(space: str, a: Tensor, tma_ok: bool = False) -> tuple[object, dict, list[triton.Config]]:
    """(kernel, launch kwargs, configs it may run) for ``space`` (gg, swiglu, dw; ``a`` is the
    first operand, for its dtype and device). On GPU: autotuned, cached per space, TMA
    mode, element size and fp32 precision. In the interpreter: one small config, with TMA
    only when asked for (``TRITON_KERNELS_TMA=1``) and the operands allow it (``tma_ok``).

    Under ``torch.use_deterministic_algorithms(True)`` the autotuner is bypassed for the
    first config of the space that fits the device: tile sizes set the order of the fp32
    accumulation (BLOCK_K for the forward, BLOCK_M for dw), and a timing-based choice may
    differ between runs."""
    base = _gg_dw_kernel if space == "dw" else _gg_kernel
    if interpreting():
        use_tma = tma_ok and tuning.tma_mode() == "on"
        return base, {**_INTERPRET_BLOCKS, "USE_TMA": use_tma}, []
    # fp32 in ieee precision runs FMA dots: a space of its own, and no TMA (FMA dots fed
    # by TMA spilled hundreds of bytes per thread)
    fma = a.dtype == torch.float32 and tuning.dot_args(a.dtype)["PRECISION"] == "ieee"
    mode = tuning.tma_mode() if tma_ok and not fma else "off"
    if mode != "off" and a.is_cuda:
        ensure_allocator()
    cfgs = tuning.configs(space, a.element_size(), fma, mode)
    if torch.are_deterministic_algorithms_enabled():
        cfg = tuning.pruner(space)(cfgs, {"a_ptr": a})[0]
        return base, {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, [cfg]
    key = (space, mode, a.element_size(), fma)
    if key not in _tuned:
        _tuned[key] = triton.autotune(configs=cfgs, key=_TUNE_KEYS["dw" if space == "dw" else "gg"],
                                      prune_configs_by={"early_config_prune": tuning.pruner(space)})(base)
    return _tuned[key], {}, cfgs


# ----------------------------------------------------------------------------- launchers

def gg_forward(a: Tensor, w: Tensor, offsets: Tensor, *, a_idx: Optional[Tensor] = None,
               scale: Optional[Tensor] = None, transpose_w: bool = False, swiglu: bool = False,
               n_rows: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Launch ``_gg_kernel``; no validation (callers validate). Returns ``(c, h)``.

    a [Ra, K] (rows gathered through ``a_idx [R]`` when given, else R = Ra), w [E, K, N]
    (or [E, N, K] read transposed), offsets [E] int32, scale [R] -> c [R, N]; with
    ``swiglu`` w has 2N columns and h [R, 2N] holds gate | up."""
    rows = n_rows if n_rows is not None else (a_idx.shape[0] if a_idx is not None else a.shape[0])
    e = w.shape[0]
    if transpose_w:
        kdim, ncols = w.shape[2], w.shape[1]
        s_wk, s_wn = w.stride(2), w.stride(1)
    else:
        kdim, ncols = w.shape[1], w.shape[2]
        s_wk, s_wn = w.stride(1), w.stride(2)
    n = ncols // 2 if swiglu else ncols
    c = torch.empty(rows, n, device=a.device, dtype=a.dtype)  # [R, N]
    h = torch.empty(rows, 2 * n, device=a.device, dtype=a.dtype) if swiglu else None  # [R, 2N]
    dummy = offsets
    space = "swiglu" if swiglu else "gg"
    kern, blocks, cfgs = _kernel(space, a, gg_tma_ok(a, w, a_idx, transpose_w, swiglu))
    # tiles: each group's row tiles (at most one partial per group) and the tail's
    grid = tuning.persistent_grid(space, cfgs, a.device, lambda m: (
        triton.cdiv(rows, m["BLOCK_M"]) + e + 1) * triton.cdiv(n, m["BLOCK_N"]))
    kern[grid](
        a, a_idx if a_idx is not None else dummy, scale if scale is not None else dummy,
        w, c, h if h is not None else c, offsets,
        rows, e, n, kdim,
        a.stride(0), a.stride(1), w.stride(0), s_wk, s_wn, c.stride(0),
        h.stride(0) if h is not None else 0,
        HAS_A_IDX=a_idx is not None, HAS_SCALE=scale is not None, SWIGLU=swiglu,
        TRANS_W=transpose_w, **tuning.dot_args(a.dtype), **blocks)
    return c, h


def gg_weight_grad(a: Tensor, b: Tensor, offsets: Tensor, n_experts: int, *,
                   a_idx: Optional[Tensor] = None, b_idx: Optional[Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Launch ``_gg_dw_kernel``: ``dw [E, K, N]`` with ``dw[e] = A_e^T @ B_e`` (rows of A and
    B optionally gathered through ``a_idx`` / ``b_idx``, both indexed by sorted row)."""
    kdim, n = a.shape[1], b.shape[1]
    dw = torch.empty(n_experts, kdim, n, device=a.device, dtype=out_dtype or a.dtype)  # [E, K, N]
    dummy = offsets
    kern, blocks, cfgs = _kernel("dw", a, dw_tma_ok(a, b, a_idx, b_idx))
    grid = tuning.persistent_grid("dw", cfgs, a.device, lambda m: (
        n_experts * triton.cdiv(kdim, m["BLOCK_K"]) * triton.cdiv(n, m["BLOCK_N"])))
    kern[grid](
        a, a_idx if a_idx is not None else dummy, b, b_idx if b_idx is not None else dummy,
        dw, offsets, n_experts, kdim, n,
        a.stride(0), b.stride(0), dw.stride(0), dw.stride(1),
        HAS_A_IDX=a_idx is not None, HAS_B_IDX=b_idx is not None,
        **tuning.dot_args(a.dtype), **blocks)
    return dw


def check_offsets(offsets: Tensor, n_experts: int, op: str) -> Tensor:
    """int32 contiguous ``offsets [E]``; int64 is converted. Monotonicity is the caller's
    promise (checking it would cost a host sync)."""
    check_int(offsets, "offsets", op)
    check_shape(offsets, 1, "offsets", op, "[E] cumulative group ends")
    if offsets.shape[0] != n_experts:
        raise ValueError(f"{op}: offsets has {offsets.shape[0]} entries but w has "
                         f"{n_experts} experts; pass one cumulative end per expert")
    return offsets.to(torch.int32).contiguous()


# ----------------------------------------------------------------------------- autograd

class _GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        y, _ = gg_forward(x, w, offsets)
        ctx.save_for_backward(x, w, offsets)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx, _ = gg_forward(dy, w, offsets, transpose_w=True)  # [R, K]
        if ctx.needs_input_grad[1]:
            dw = gg_weight_grad(x, dy, offsets, w.shape[0], out_dtype=w.dtype)  # [E, K, N]
        return dx, dw, None


def grouped_gemm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """``x [R, K]`` (rows sorted by group) times ``w [E, K, N]`` per group -> ``[R, N]``.

    ``offsets [E]`` are cumulative group ends (int32; int64 accepted). Differentiable in
    ``x`` and ``w``. Rows past ``offsets[-1]`` get zeros (and zero gradient)."""
    op = "grouped_gemm"
    check_shape(x, 2, "x", op, "[rows, K]")
    check_shape(w, 3, "w", op, "[E, K, N]")
    check_float(x, "x", op)
    check_same_dtype(op, x=x, w=w)
    check_device(x, w, offsets, op=op)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x has K={x.shape[1]} columns but w is {tuple(w.shape)} "
                         f"([E, K, N] with K={w.shape[1]})")
    offsets = check_offsets(offsets, w.shape[0], op)
    return _GroupedGemm.apply(x.contiguous(), w.contiguous(), offsets)
