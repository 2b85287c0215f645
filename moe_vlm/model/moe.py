"""Sparse MoE FFN: router -> routed experts (weighted sum) + shared experts.

Legend: B batch, S sequence, T = B*S tokens, D model width.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.model.experts import GroupedExperts
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.layers import SwiGLU
from moe_vlm.routing.balancing import update_balance_bias
from moe_vlm.routing.router import Router, RouterOutput


class MoELayer(nn.Module):
    """DeepSeekMoE-style layer: ``y = sum_k w_k * expert_k(x) + shared(x)``.

    Dropped assignments (capacity) contribute nothing, so a fully dropped token leaves
    the block through the residual (plus the shared experts, if any)."""

    def __init__(self, d_model: int, sizes: MoESizes, routing: RoutingConfig, backend: str):
        super().__init__()
        self.sizes = sizes
        self.router = Router(d_model, sizes.n_experts, sizes.top_k, routing)
        self.experts = GroupedExperts(sizes.n_experts, d_model, sizes.d_expert, backend)
        self.shared: Optional[SwiGLU] = SwiGLU(d_model, sizes.d_shared) if sizes.d_shared else None

    def forward(self, x: Tensor) -> tuple[Tensor, RouterOutput]:
        b, s, d = x.shape
        flat = x.reshape(b * s, d)  # [T, D]
        r = self.router(flat, n_seqs=b)
        y = self.experts(flat, r.token_idx, r.expert_idx, r.weight)  # [T, D]
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.reshape(b, s, d), r

    @torch.no_grad()
    def update_bias(self, counts: Tensor, rate: float) -> None:
        """Aux-loss-free balancing step (call once per optimiser step)."""
        update_balance_bias(self.router.bias, counts, rate)
