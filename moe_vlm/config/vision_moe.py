"""The vision tower's MoE layers (V-MoE, Riquelme et al. 2021) as a config describes them:
which blocks, their sizes and their router's config. Pure arithmetic on the config, in one
place, read by validation (so its checks are the model's) and by the model."""

from __future__ import annotations

from dataclasses import replace

from moe_vlm.config.schema import RoutingConfig, VisionConfig
from moe_vlm.config.sizes import MoESizes


def vision_moe_schedule(n_layers: int, moe_every: int) -> list[bool]:
    """``is_moe`` per ViT block: the last block of every group of ``moe_every`` (V-MoE's
    "every k": blocks k-1, 2k-1, ...; 1 = every block, 0 = none). Ending each group on an
    MoE block keeps the last block, whose features the decoder reads, sparse as in V-MoE."""
    return [moe_every > 0 and (i + 1) % moe_every == 0 for i in range(n_layers)]


def vision_moe_sizes(v: VisionConfig) -> MoESizes:
    """Sizes of a vision MoE layer: ``moe_experts`` experts of width ``moe_d_expert``
    (default: the dense MLP's ``d_ff``, so one expert is the MLP), ``moe_top_k`` per
    token, no shared experts, no fine-grained split."""
    d = v.moe_d_expert if v.moe_d_expert is not None else v.d_ff
    return MoESizes(n_experts=v.moe_experts, d_expert=d, top_k=v.moe_top_k, d_shared=0,
                    granularity=1)


def vision_routing(v: VisionConfig, r: RoutingConfig) -> RoutingConfig:
    """The vision routers' config: the decoder's ``routing.*`` (z-loss, aux-loss scope,
    capacity factor, bias update rate, normalize_top1, ...) with the ``vision.moe_*`` gate,
    top-k, renormalisation and balance-loss weight, and no routed scaling (DeepSeek-V3's
    factor is tuned to its decoder gate, not to a ViT MLP), and no recurrent router (RMoE's
    state runs through the decoder's MoE layers only)."""
    return replace(r, gate=v.moe_gate, top_k=v.moe_top_k, renormalize=v.moe_renormalize,
                   aux_loss_coef=v.moe_aux_loss_coef, routed_scaling=1.0,
                   recurrent=False)
