"""Load-balancing losses and the auxiliary-loss-free bias update.

Legend: T tokens, B sequences, S tokens per sequence, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from moe_vlm.routing.counts import count_ids

CountReducer = Callable[[Tensor], Tensor]  # sums a tensor over data-parallel ranks


def switch_aux_loss(scores: Tensor, experts: Tensor, n_experts: int, n_groups: int = 1,
                    count_reducer: Optional[CountReducer] = None,
                    group_ids: Optional[Tensor] = None, reduction: str = "mean",
                    group_experts: Optional[Tensor] = None) -> Tensor:
    """Switch-style balance loss ``E * sum_i f_i * P_i`` per group, then the mean (or sum)
    over the groups that hold tokens.

    ``f_i`` is the fraction of the group's K*n assignments that chose expert i (pass the
    selection *before* capacity dropping and without any balancing bias: DeepSeek-V3 eq. 18),
    ``P_i`` the mean router probability of expert i over the group's n tokens. It is 1 for
    a perfectly balanced router. Groups: one (the micro-batch scope), or sequences
    (DeepSeek-V3's sequence-wise loss) given by ``group_ids`` [T] in ``[0, n_groups)``, or
    when ``group_ids`` is None by ``n_groups`` equal consecutive runs of tokens.

    ``count_reducer`` (the global-batch scope, Qwen's global-batch balancing) sums the
    assignment and token counts over data-parallel ranks first; ``P_i`` then is this
    rank's probability sum over the *global* token count, so the loss returned is this
    rank's share and the shares of all ranks add up to the global-batch loss.

    ``group_experts`` [G]: how many experts each group's tokens may choose (modality
    groups, ``routing.modality=groups``: a group's tokens have probability 0 elsewhere);
    ``E_g * sum_i f_i * P_i`` is then 1 when the group is balanced over its own experts.
    Default: every group may choose all ``n_experts``.

    Counts are exact integers and the probability sums add in a fixed order, so the result
    does not depend on thread scheduling (``index_add_`` is serial over the index on CPU)."""
    t, k = experts.shape
    dev = experts.device
    if group_ids is None:
        if t % n_groups:
            raise ValueError(f"{t} tokens do not split into {n_groups} equal sequences")
        group_ids = torch.arange(t, device=dev) // max(1, t // n_groups)  # [T]
    key = group_ids[:, None] * n_experts + experts  # [T, K]
    counts = count_ids(key, n_groups * n_experts)
    counts = counts.reshape(n_groups, n_experts).to(scores.dtype)  # [G, E]
    n_tok = count_ids(group_ids, n_groups).to(scores.dtype)  # [G]
    if n_groups == 1:
        prob_sum = scores.sum(0, keepdim=True)  # [1, E]
    else:  # index_add_: serial over the index on CPU, deterministic on CUDA in deterministic mode
        prob_sum = scores.new_zeros(n_groups, n_experts).index_add_(0, group_ids, scores)  # [G, E]
    if count_reducer is not None:  # one reduction for counts and token totals
        flat = count_reducer(torch.cat([counts, n_tok[:, None]], 1))  # [G, E + 1]
        counts, n_tok = flat[:, :n_experts], flat[:, n_experts]
    denom = n_tok.clamp_min(1.0)[:, None]  # [G, 1]
    scale = n_experts if group_experts is None else group_experts.to(scores.dtype)  # [G]
    per_group = scale * (counts / (k * denom) * (prob_sum / denom)).sum(-1)  # [G]
    if reduction == "sum":
        return per_group.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return per_group.sum() / (n_tok > 0).sum().clamp_min(1)


def router_z_loss(logits: Tensor, reduction: str = "mean") -> Tensor:
    """ST-MoE z-loss: squared log-partition per token, mean (or sum) over tokens; keeps
    router logits small."""
    z = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                        dim=-1).square()  # [T], fp32 at least (fp64 stays fp64)
    if reduction == "sum":
        return z.sum()
    return z.mean()


@torch.no_grad()
def update_balance_bias(bias: Tensor, counts: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each step, raise the selection
    bias of under-loaded experts and lower it for over-loaded ones by ``rate``.

    ``counts`` [E] are the assignments seen during the step. Updates ``bias`` in place."""
    bias += rate * torch.sign(counts.float().mean() - counts.float())
    return bias
