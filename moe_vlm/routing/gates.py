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
                 bias: Optional[Tensor] = None, experts: Optional[Tensor] = None) -> TopKChoice:
    """Softmax over experts, keep the top k (Switch/GShard; Mixtral when renormalised).

    ``bias`` [E] shifts only the *selection* (auxiliary-loss-free balancing); the weights
    come from the unbiased probabilities, as in DeepSeek-V3. ``experts`` [T, K]: a given
    selection instead of the top k (router replay, forced balance); the weights are then
    the probabilities there, normalised as usual (Megatron-Core's replay gathers them so).
    """
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    if experts is None:
        select = probs if bias is None else probs + bias
        experts = select.topk(k, dim=-1).indices  # [T, K]
    weights = probs.gather(-1, experts)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return TopKChoice(weights, experts, probs)


def sigmoid_topk(logits: Tensor, k: int, bias: Optional[Tensor] = None,
                 normalize: bool = True, experts: Optional[Tensor] = None) -> TopKChoice:
    """DeepSeek-V3 gate: sigmoid affinities, top k on (affinity + bias), weights are the
    selected affinities normalised to sum 1 (raw affinities with ``normalize=False``).
    ``experts`` [T, K]: a given selection instead of the top k (as ``softmax_topk``)."""
    aff = torch.sigmoid(logits)  # [T, E]
    if experts is None:
        select = aff if bias is None else aff + bias
        experts = select.topk(k, dim=-1).indices  # [T, K]
    weights = aff.gather(-1, experts)  # [T, K]
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    scores = aff / aff.sum(-1, keepdim=True).clamp_min(1e-20)  # [T, E]
    return TopKChoice(weights, experts, scores)


def round_robin_experts(n_tokens: int, k: int, n_experts: int, device: torch.device) -> Tensor:
    """Forced balance (torchtitan's ``_debug_force_load_balance``): assignment i of the
    ``n_tokens * k`` goes to expert ``i mod E``, so a token's k experts are distinct
    (k <= E) and every expert gets exactly ``T*k/E`` assignments when E divides T*k (else
    the loads differ by at most one). -> [T, K] int64, whatever the scores."""
    return (torch.arange(n_tokens * k, device=device) % n_experts).reshape(n_tokens, k)


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
