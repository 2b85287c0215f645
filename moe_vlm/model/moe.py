"""Sparse MoE FFN: router -> dispatcher -> routed experts -> combine (weighted sum) + shared
experts.

Legend: B batch, S sequence, T = B*S tokens, D model width.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.model.dispatch import LocalDispatcher
from moe_vlm.model.experts import GroupedExperts
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.layers import SwiGLU
from moe_vlm.routing.balancing import update_balance_bias
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.recurrent import RouterGRU
from moe_vlm.routing.router import Router, RouterOutput


def real_rows(mask: Tensor) -> Optional[Tensor]:
    """The flat indices [T] (int64, row-major) of the real tokens of ``mask`` [B, S]
    (False = padding), or None when every token is real. ``nonzero``: a host sync on a
    device tensor, none on a CPU one."""
    rows = mask.reshape(-1).nonzero().squeeze(1)  # [T]
    return None if rows.numel() == mask.numel() else rows


class MoELayer(nn.Module):
    """DeepSeekMoE-style layer: ``y = sum_k w_k * expert_k(x) + shared(x)``.

    Dropped assignments (capacity) contribute nothing, so a fully dropped token leaves
    the block through the residual (plus the shared experts, if any). ``dispatcher`` moves
    tokens to the experts and back: ``LocalDispatcher`` here, an all-to-all one under expert
    parallelism (``moe_vlm.parallel.expert_parallel``)."""

    def __init__(self, d_model: int, sizes: MoESizes, routing: RoutingConfig, backend: str,
                 act: str = "swiglu", bias: bool = False):
        """``act``, ``bias``: the routed experts' MLP (``GroupedExperts``); the decoder's
        are SwiGLU without biases, the vision tower's copy its GELU MLPs with biases."""
        super().__init__()
        self.sizes = sizes
        self.router = Router(d_model, sizes.n_experts, sizes.top_k, routing)
        self.experts = GroupedExperts(sizes.n_experts, d_model, sizes.d_expert, backend,
                                      act=act, bias=bias)
        self.dispatcher: nn.Module = LocalDispatcher()
        self.shared: Optional[SwiGLU] = SwiGLU(d_model, sizes.d_shared) if sizes.d_shared else None

    def forward(self, x: Tensor, mask: Optional[Tensor] = None,
                loss_norm: Optional[LossNorm] = None, rows: Optional[Tensor] = None,
                is_image: Optional[Tensor] = None, state: Optional[Tensor] = None,
                gru: Optional[RouterGRU] = None) -> tuple[Tensor, RouterOutput]:
        """x [B, S, D], mask [B, S] bool (False = padding) -> y [B, S, D] and the router
        output over the real tokens.

        Only real tokens are routed and computed: padded rows are dropped before the
        router (so they never enter a balance loss, the z-loss, the counts or the bias
        update, and cost no expert compute, shared experts included) and get y = 0. The
        router's ``token_idx`` then indexes the real tokens in row-major order,
        ``x[mask]``. ``rows`` [T] (``real_rows(mask)``): the real tokens' flat indices when
        the caller has them; the decoder finds them once for all its MoE layers (the
        training loop on the host, from the CPU batch), so the layer has no host sync.
        Without them, a given ``mask`` costs one (``nonzero``). ``is_image`` [B, S] bool:
        the image tokens, for modality-aware routing (``routing.modality``). ``state``,
        ``gru``: the recurrent router's previous state [T, R] over the same real tokens and
        the decoder's shared GRU cell (``routing.recurrent``); the new state comes back in
        the router output."""
        b, s, d = x.shape
        flat = x.reshape(b * s, d)  # [B*S, D]
        if rows is None and mask is not None:
            rows = real_rows(mask)
        xr = flat if rows is None else flat.index_select(0, rows)  # [T, D] real tokens
        pos = torch.arange(b * s, device=x.device) if rows is None else rows  # [T]
        img = None
        if is_image is not None:
            img = is_image.reshape(-1) if rows is None else is_image.reshape(-1).index_select(0, rows)
        r = self.router(xr, n_seqs=b, seq_ids=pos // s, loss_norm=loss_norm, is_image=img,
                        state=state, gru=gru)
        y = self.dispatcher(xr, r.token_idx, r.expert_idx, r.weight, self.experts)  # [T, D]
        if r.stats and hasattr(self.dispatcher, "routing_stats"):  # LSH-MoE's rows sent
            r.stats.update(self.dispatcher.routing_stats(x.device))
        if self.shared is not None:
            y = y + self.shared(xr)
        if rows is not None:  # padded rows: 0 (unique indices, so no accumulation order)
            y = y.new_zeros(b * s, d).index_copy(0, rows, y)
        return y.reshape(b, s, d), r

    @torch.no_grad()
    def update_bias(self, counts: Tensor, rate: float) -> None:
        """Aux-loss-free balancing step (call once per optimiser step)."""
        update_balance_bias(self.router.bias, counts, rate)
