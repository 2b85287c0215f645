"""Load-balancing losses and the auxiliary-loss-free bias update.

Legend: T tokens, B sequences, S tokens per sequence, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

CountReducer = Callable[[Tensor], Tensor]  # sums a tensor over data-parallel ranks


def switch_aux_loss(scores: Tensor, experts: Tensor, n_experts: int, n_groups: int = 1,
                    count_reducer: Optional[CountReducer] = None) -> Tensor:
    """Switch-style balance loss ``E * sum_i f_i * P_i``, averaged over groups.

    ``f_i`` is the fraction of the group's K*S assignments that chose expert i (before
    any capacity dropping), ``P_i`` the mean router probability of expert i. It is 1 for a
    perfectly balanced router. Groups: ``n_groups=1`` is the micro-batch scope, ``B`` the
    per-sequence scope (DeepSeek-V3's sequence-wise loss). For the global-batch scope pass
    ``count_reducer``, which sums the assignment counts over data-parallel ranks first
    (Qwen's global-batch balancing); ``P_i`` stays local.
    """
    t, k = experts.shape
    if t % n_groups:
        raise ValueError(f"{t} tokens do not split into {n_groups} equal sequences")
    s = t // n_groups
    counts = torch.zeros(n_groups, n_experts, device=experts.device, dtype=torch.float32)
    counts.scatter_add_(1, experts.reshape(n_groups, s * k),
                        torch.ones(n_groups, s * k, device=experts.device))  # [G, E]
    total = torch.full((n_groups, 1), float(s * k), device=experts.device)
    if count_reducer is not None:
        counts, total = count_reducer(counts), count_reducer(total)
    frac = counts / total  # [G, E]
    p_mean = scores.float().reshape(n_groups, s, n_experts).mean(1)  # [G, E]
    return (n_experts * (frac * p_mean).sum(-1)).mean()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@torch.no_grad()
def update_balance_bias(bias: Tensor, counts: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each step, raise the selection
    bias of under-loaded experts and lower it for over-loaded ones by ``rate``.

    ``counts`` [E] are the assignments seen during the step. Updates ``bias`` in place."""
    bias += rate * torch.sign(counts.float().mean() - counts.float())
    return bias
