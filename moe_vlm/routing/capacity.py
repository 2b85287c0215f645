"""Expert capacity and token dropping (token-choice routing).

Legend: T tokens, K experts per token, E experts.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from moe_vlm.routing.counts import count_ids


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * T * K / E)`` (GShard/Switch), in exact
    arithmetic on the factor as written (1.1 is 11/10), so float rounding never adds a
    slot: ``expert_capacity(100, 1, 2, 1.1) == 55``."""
    return max(1, math.ceil(exact_fraction(capacity_factor) * n_tokens * top_k / n_experts))


def exact_fraction(x: float) -> Fraction:
    """The decimal a user wrote (``str(1.1) == '1.1'`` -> 11/10), not the binary float."""
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


def capacity_keep_mask(experts: Tensor, n_experts: int, capacity: int) -> Tensor:
    """Which assignments fit: ``keep [T, K]`` bool.

    Priority follows GShard: all first choices before any second choice, and within a
    choice rank, earlier tokens first. An expert keeps its first ``capacity``
    assignments in that order; the rest are dropped (their tokens keep the residual)."""
    t, k = experts.shape
    flat = experts.t().reshape(-1)  # [K*T], choice-rank major
    order = torch.argsort(flat, stable=True)  # [K*T]
    counts = count_ids(flat, n_experts)  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted  # position of each assignment inside its expert's queue
    return (rank < capacity).reshape(k, t).t()  # [T, K]
