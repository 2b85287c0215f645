"""Dispatch -> grouped expert compute -> combine: the seam between the router and the experts.

Legend: T tokens (real, unpadded), D model width, E experts, N assignments (token, expert,
weight) from the router, in any order and any number per token (top-k, capacity-dropped,
expert choice).

A dispatcher moves the tokens of the assignments into expert-sorted rows, lets the experts
compute on them, and brings the outputs back weighted::

    rows, offsets, routed = dispatcher.dispatch(x, token_idx, expert_idx, weight, n_experts)
    out = experts(rows, offsets)           # pure compute: [N, D] rows -> [N, D]
    y = dispatcher.combine(out, routed)    # y[t] = sum over t's assignments of weight * out

``LocalDispatcher`` does this on one process (a stable sort by expert, a gather, and a
weighted ``index_add`` in fp32); with the ``triton`` expert backend it runs the fused pair
instead (``triton_kernels.moe_experts``: the gather inside the first grouped GEMM, the combine
in one pass). Expert parallelism swaps in ``moe_vlm.parallel.expert_parallel
.AllToAllDispatcher``, which wraps the same steps around two all-to-alls; the experts and the
MoE layer do not change. Padding never reaches a dispatcher: the MoE layer passes the real
tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_vlm.model.experts import BACKENDS, GroupedExperts, accum_dtype, compute_dtype
from moe_vlm.routing.counts import count_ids


@dataclass(frozen=True)
class Routed:
    """What ``combine`` needs: the token and routing weight of each expert-sorted row."""

    token: Tensor  # [N] token of each row
    weight: Tensor  # [N] routing weight of each row
    n_tokens: int
    dtype: torch.dtype  # the input's dtype, which the output takes


def sort_by_expert(expert_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """(order [N]: assignment of each row, stable within an expert; offsets [E] int32
    cumulative group ends). No host sync (``routing.counts.count_ids``)."""
    order = torch.argsort(expert_idx, stable=True)  # [N]
    offsets = torch.cumsum(count_ids(expert_idx, n_experts), 0).to(torch.int32)
    return order, offsets


def weighted_combine(out: Tensor, token: Tensor, weight: Tensor, n_tokens: int,
                     dtype: torch.dtype) -> Tensor:
    """``y [T, D]``: each row of ``out [N, D]`` times its weight, summed into its token in
    fp32 (fp64 for fp64), returned in ``dtype``. ``index_add`` runs serially over the rows
    on CPU, so a token's sum is taken in row order: deterministic."""
    acc = accum_dtype(dtype)
    y = torch.zeros(n_tokens, out.shape[1], device=out.device, dtype=acc)
    y = y.index_add(0, token, out.to(acc) * weight[:, None].to(acc))  # [T, D]
    return y.to(dtype)


class LocalDispatcher(nn.Module):
    """All experts on this process. No parameters."""

    def dispatch(self, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                 n_experts: int) -> tuple[Tensor, Tensor, Routed]:
        """x [T, D] and flat assignments [N] -> (rows [N, D] sorted by expert, offsets [E],
        what ``combine`` needs)."""
        order, offsets = sort_by_expert(expert_idx, n_experts)
        tok = token_idx[order]  # [N]
        # index_select, not x[tok]: each token appears K times, and the backward of x[tok]
        # (index_put_ with accumulate) adds duplicates with atomics on several CPU threads, so
        # gradients differed between runs; index_select's backward (index_add_) is serial over
        # the index on CPU, and deterministic on CUDA under train.deterministic.
        rows = x.index_select(0, tok)  # [N, D]
        return rows, offsets, Routed(tok, weight[order], x.shape[0], x.dtype)

    def combine(self, out: Tensor, routed: Routed) -> Tensor:
        """Expert outputs [N, D] (rows as dispatched) -> y [T, D]."""
        return weighted_combine(out, routed.token, routed.weight, routed.n_tokens, routed.dtype)

    def forward(self, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                experts: GroupedExperts) -> Tensor:
        """y [T, D] = sum over each token's assignments of weight * expert(x[token])."""
        if experts.backend_name(x) == "triton" and experts.quant is None:  # quant: unfused
            return experts.run(fused_triton, x, token_idx, expert_idx, weight, experts)
        rows, offsets, routed = self.dispatch(x, token_idx, expert_idx, weight, experts.n_experts)
        return self.combine(experts(rows, offsets), routed)


def fused_triton(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                 experts: "GroupedExperts | _Weights") -> Tensor:
    """The fused dispatcher + experts pair: ``triton_kernels.moe_experts`` gathers the
    token rows inside the first grouped GEMM (SwiGLU in its epilogue) and combines in one
    pass, with the index plan on the device (no host sync). In the compute dtype (the
    kernels ignore autocast, so the cast happens here, differentiably)."""
    from triton_kernels import moe_experts

    dt = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = moe_experts(x.to(dt), token_idx, expert_idx, weight, experts.w_in.to(dt),
                        experts.w_out.to(dt))
    return y.to(x.dtype)


def routed_experts(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                   w_in: Tensor, w_out: Tensor, backend: str) -> Tensor:
    """The routed-expert computation of one MoE layer as a function of plain tensors, as
    the model runs it on one process (for tests and benchmarks): x [T, D], assignments
    [N], ``w_in [E, D, 2F]``, ``w_out [E, F, D]`` -> y [T, D]. ``backend`` is a concrete
    name (``torch``, ``grouped_mm``, or ``triton``: the fused pair)."""
    if backend == "triton":
        return fused_triton(x, token_idx, expert_idx, weight, _Weights(w_in, w_out))
    disp = LocalDispatcher()
    rows, offsets, routed = disp.dispatch(x, token_idx, expert_idx, weight, w_in.shape[0])
    return disp.combine(BACKENDS[backend]()(rows, offsets, w_in, w_out), routed)


@dataclass(frozen=True)
class _Weights:
    """Stand-in for a ``GroupedExperts`` where only its two weights are read."""

    w_in: Tensor
    w_out: Tensor
