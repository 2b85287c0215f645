"""The router module: gate + capacity + balancing losses + metrics, in one forward.

Legend: T tokens, D model width, E routed experts, K experts per token, N assignments.

Every gate is turned into a flat list of (token, expert, weight) assignments, so
token-choice with or without dropping and expert-choice all feed the same expert
backends. Losses and metrics are returned in a frozen ``RouterOutput``, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.routing.balancing import CountReducer, router_z_loss, switch_aux_loss
from moe_vlm.routing.capacity import capacity_keep_mask, expert_capacity
from moe_vlm.routing.gates import (
    expert_choice,
    expert_choice_capacity,
    sigmoid_topk,
    softmax_topk,
)
from moe_vlm.routing.metrics import routing_stats


@dataclass(frozen=True)
class RouterOutput:
    token_idx: Tensor  # [N] int64, token each assignment reads from / writes to
    expert_idx: Tensor  # [N] int64
    weight: Tensor  # [N] combine weight (differentiable w.r.t. the router)
    counts: Tensor  # [E] float, assignments per expert after dropping (detached)
    aux_loss: Tensor  # scalar, balance loss (1.0 = balanced), unweighted
    z_loss: Tensor  # scalar, unweighted
    loss: Tensor  # scalar, aux_loss_coef * aux_loss + z_loss_coef * z_loss
    stats: dict[str, Tensor]  # detached metrics, see routing.metrics


class Router(nn.Module):
    """Linear router ``[E, D]`` plus a selection bias buffer for aux-loss-free balancing.

    ``count_reducer`` (set by ``moe_vlm.parallel`` when distributed) sums assignment
    counts over data-parallel ranks for the global-batch balance loss; the model math
    itself never touches ``torch.distributed``.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, cfg: RoutingConfig):
        super().__init__()
        self.n_experts, self.top_k, self.cfg = n_experts, top_k, cfg
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))  # [E, D]
        self.register_buffer("bias", torch.zeros(n_experts))  # [E], selection only
        self.count_reducer: Optional[CountReducer] = None

    @torch.no_grad()
    def init_weights(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        self.weight.normal_(0.0, std, generator=generator)
        self.bias.zero_()

    def forward(self, x: Tensor, n_seqs: int = 1) -> RouterOutput:
        """x [T, D] (T = n_seqs * S tokens, sequence-major)."""
        cfg, n_exp, k = self.cfg, self.n_experts, self.top_k
        t = x.shape[0]
        dt = torch.promote_types(x.dtype, torch.float32)  # fp32 routing (fp64 stays fp64)
        logits = F.linear(x.to(dt), self.weight.to(dt))  # [T, E]
        use_bias = self.bias if cfg.bias_update_rate > 0 else None
        dev = x.device

        if cfg.gate == "expert_choice":
            cap = expert_choice_capacity(t, n_exp, k, cfg.capacity_factor)
            ec = expert_choice(logits, cap)
            token_idx = ec.tokens.reshape(-1)  # [E*C]
            expert_idx = torch.arange(n_exp, device=dev).repeat_interleave(cap)
            weight = ec.weights.reshape(-1)
            scores, n_req = ec.scores, n_exp * cap
            aux = torch.zeros((), device=dev)  # balanced by construction
        else:
            if cfg.gate == "softmax_topk":
                tk = softmax_topk(logits, k, cfg.renormalize, use_bias)
            else:
                tk = sigmoid_topk(logits, k, use_bias)
            scores, n_req = tk.scores, t * k
            if cfg.aux_loss_coef > 0:
                groups = n_seqs if cfg.aux_loss_scope == "sequence" else 1
                reducer = self.count_reducer if cfg.aux_loss_scope == "global_batch" else None
                aux = switch_aux_loss(scores, tk.experts, n_exp, groups, reducer)
            else:
                aux = torch.zeros((), device=dev)
            token_idx = torch.arange(t, device=dev).repeat_interleave(k)  # [T*K]
            expert_idx = tk.experts.reshape(-1)
            weight = tk.weights.reshape(-1)
            if cfg.capacity_factor is not None:
                cap = expert_capacity(t, k, n_exp, cfg.capacity_factor)
                keep = capacity_keep_mask(tk.experts, n_exp, cap).reshape(-1)
                token_idx, expert_idx, weight = token_idx[keep], expert_idx[keep], weight[keep]

        if cfg.routed_scaling != 1.0:
            weight = weight * cfg.routed_scaling
        z = router_z_loss(logits) if cfg.z_loss_coef > 0 else torch.zeros((), device=dev)
        counts = torch.bincount(expert_idx, minlength=n_exp).float()  # [E]
        loss = cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        stats = routing_stats(counts, n_req, expert_idx.numel(), scores)
        stats["aux_loss"], stats["z_loss"] = aux.detach(), z.detach()
        return RouterOutput(token_idx, expert_idx, weight, counts.detach(), aux, z, loss, stats)
