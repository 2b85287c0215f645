"""Per-layer routing metrics, returned as (detached) values.

Legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def routing_stats(counts: Tensor, n_requested: int, n_kept: int, scores: Tensor) -> dict[str, Tensor]:
    """Metrics of one MoE layer for one forward pass.

    counts [E]: assignments each expert processed (after dropping);
    n_requested / n_kept: assignments asked for by the gate / actually computed;
    scores [T, E]: per-token router distribution (rows sum to 1).

    - ``tokens_per_expert`` [E]
    - ``max_violation``: max load / mean load - 1 (0 = perfectly balanced)
    - ``drop_frac``: fraction of requested assignments that were dropped
    - ``entropy``: mean router entropy in nats (log E = uniform, 0 = one-hot)
    """
    counts = counts.float()
    mean = counts.mean().clamp_min(1e-9)
    p = scores.float()
    entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
    drop = 1.0 - n_kept / n_requested if n_requested else 0.0
    return {
        "tokens_per_expert": counts.detach(),
        "max_violation": (counts.max() / mean - 1.0).detach(),
        "drop_frac": torch.tensor(drop),
        "entropy": entropy.detach(),
    }
