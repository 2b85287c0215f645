"""Gates: router logits -> which experts each token uses and with what weight.

Legend: T tokens, E routed experts, K experts per token, C tokens per expert.
Pure functions; all math in fp32 (the caller passes fp32 logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moe_vlm.routing.capacity import exact_fraction


@dataclass(frozen=True)
class TopKChoice:
    """Token-choice routing result."""

    weights: Tensor  # [T, K] combine weights (differentiable)
    experts: Tensor  # [T, K] int64 expert ids, distinct per token
    scores: Tensor  # [T, E] per-token distribution over experts (sums to 1), for losses/metrics


def softmax_topk(logits: Tensor, k: int, renormalize: bool = True,
                 bias: Optional[Tensor] = None) -> TopKChoice:
    """Softmax over experts, keep the top k (Switch/GShard; Mixtral when renormalised).

    ``bias`` [E] shifts only the *selection* (auxiliary-loss-free balancing); the weights
    come from the unbiased probabilities, as in DeepSeek-V3.
    """
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    select = probs if bias is None else probs + bias
    experts = select.topk(k, dim=-1).indices  # [T, K]
    weights = probs.gather(-1, experts)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return TopKChoice(weights, experts, probs)


def sigmoid_topk(logits: Tensor, k: int, bias: Optional[Tensor] = None,
                 normalize: bool = True) -> TopKChoice:
    """DeepSeek-V3 gate: sigmoid affinities, top k on (affinity + bias), weights are the
    selected affinities normalised to sum 1 (raw affinities with ``normalize=False``)."""
    aff = torch.sigmoid(logits)  # [T, E]
    select = aff if bias is None else aff + bias
    experts = select.topk(k, dim=-1).indices  # [T, K]
    weights = aff.gather(-1, experts)  # [T, K]
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    scores = aff / aff.sum(-1, keepdim=True).clamp_min(1e-20)  # [T, E]
    return TopKChoice(weights, experts, scores)


@dataclass(frozen=True)
class ExpertChoice:
    """Expert-choice routing result: each expert picked its C best tokens."""

    weights: Tensor  # [E, C] combine weights (differentiable)
    tokens: Tensor  # [E, C] int64 token ids chosen by each expert
    scores: Tensor  # [T, E] softmax over experts


def expert_choice_capacity(n_tokens: int, n_experts: int, top_k: int,
                           capacity_factor: Optional[float]) -> int:
    """Tokens per expert: on average ``top_k * capacity_factor`` experts per token."""
    c = math.ceil(n_tokens * top_k * exact_fraction(capacity_factor or 1) / n_experts)
    return max(1, min(n_tokens, c))


def expert_choice(logits: Tensor, capacity: int) -> ExpertChoice:
    """Zhou et al. 2022: softmax over experts per token, then each expert takes its top
    ``capacity`` tokens. Balanced by construction; a token may get 0..E experts. It looks
    at every token of the batch at once, so it is not causal: use it for ablations."""
    scores = torch.softmax(logits, dim=-1)  # [T, E]
    top = scores.t().topk(capacity, dim=-1)  # [E, C]
    return ExpertChoice(top.values, top.indices, scores)
