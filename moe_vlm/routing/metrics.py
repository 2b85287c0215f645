"""Per-layer routing metrics, returned as (detached) values.

Legend: T real tokens routed, E experts.

Besides the per-call means, each call returns the *sums* behind them (``n_tokens``,
``entropy_sum``, ``n_requested``, ``n_kept``), so a training step can aggregate its
micro-batches and processes exactly (``moe_vlm.train.step``): the step's entropy is the
mean over all its real tokens, its drop fraction the fraction of all its requested
assignments, whatever the micro-batching.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def routing_stats(counts: Tensor, n_requested: int, n_kept: int, scores: Tensor) -> dict[str, Tensor]:
    """Metrics of one MoE layer for one forward pass over real (unpadded) tokens.

    counts [E]: assignments each expert processed (after dropping; they sum to ``n_kept``,
    which is T*K only when nothing was dropped);
    n_requested / n_kept: assignments asked for by the gate / actually computed;
    scores [T, E]: per-token router distribution (rows sum to 1).

    - ``tokens_per_expert`` [E]
    - ``max_violation``: max load / mean load - 1 (0 = perfectly balanced)
    - ``drop_frac``: fraction of requested assignments that were dropped
    - ``entropy``: mean router entropy in nats (log E = uniform, 0 = one-hot)
    - sums for exact aggregation: ``n_tokens``, ``entropy_sum``, ``n_requested``, ``n_kept``
    """
    counts = counts.float()
    dev = counts.device
    mean = counts.mean().clamp_min(1e-9)
    p = scores.float()
    ent_sum = -(p * torch.log(p.clamp_min(1e-20))).sum()
    n_tok = p.shape[0]
    drop = 1.0 - n_kept / n_requested if n_requested else 0.0
    return {
        "tokens_per_expert": counts.detach(),
        "max_violation": (counts.max() / mean - 1.0).detach() if counts.numel() else
        torch.zeros((), device=dev),
        "drop_frac": torch.tensor(drop, device=dev),
        "entropy": (ent_sum / max(1, n_tok)).detach(),
        "entropy_sum": ent_sum.detach(),
        "n_tokens": torch.tensor(float(n_tok), device=dev),
        "n_requested": torch.tensor(float(n_requested), device=dev),
        "n_kept": torch.tensor(float(n_kept), device=dev),
    }
