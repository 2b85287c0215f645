"""MoE layers in the vision tower (V-MoE, Riquelme et al. 2021): a ViT block's MLP replaced by
the decoder's ``MoELayer`` (same router, dispatcher, grouped experts and backends), its
experts GELU MLPs with biases so that they can hold the dense MLP exactly; and sparse
upcycling of a dense tower into one (Komatsuzaki et al. 2023: every expert a copy of its
block's MLP, routers new).

Legend: N images, T tokens per image in the tower, Dv vision width, F expert width,
E experts.

Which blocks, their sizes and their router's config come from ``moe_vlm.config.vision_moe``.
Image tokens have no padding: the layers route all N*T tokens, each image a sequence (the
``sequence`` balance-loss scope balances per image).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor, nn

from moe_vlm.config.schema import RoutingConfig, VisionConfig
from moe_vlm.config.vision_moe import vision_moe_sizes, vision_routing
from moe_vlm.model.moe import MoELayer
from moe_vlm.routing.loss_norm import LossNorm


def vision_moe_layer(cfg: VisionConfig, routing: RoutingConfig, backend: str) -> MoELayer:
    """The MoE layer of one vision block: ``vision.moe_*`` experts computing the tower's
    MLP function (``vision.act``, biases), routed as ``vision_routing`` says."""
    return MoELayer(cfg.d_model, vision_moe_sizes(cfg), vision_routing(cfg, routing), backend,
                    act=cfg.act, bias=True)


def vision_moe_layers(model: nn.Module) -> list[MoELayer]:
    """The vision tower's MoE layers that run, in block order: [] for a text-only model, a
    dense tower or ``vision=patch``. (``model.moe_layers()`` stays the decoder's: upcycling,
    export and the decoder's metrics index it by decoder layer.)"""
    layers = getattr(model, "vision_moe_layers", None)
    return layers() if layers is not None else []


def vision_loss_norm(loss_norm: Optional[LossNorm], tokens_per_image: int,
                     n_images: int) -> Optional[LossNorm]:
    """The step's totals as the vision routers count them: images are their sequences and
    image tokens their tokens, so a vision z-loss or per-image balance loss is a share of
    the step's mean over all its images, whatever the micro-batching. ``n_images``: this
    batch's, to refuse totals that did not count images (``LossNorm.n_images``)."""
    if loss_norm is None:
        return None
    if n_images and not loss_norm.n_images:
        raise ValueError("loss_norm.n_images is 0 but the batch has images: the step's totals "
                         "must count them for the vision MoE layers' losses "
                         "(moe_vlm.train.step.step_loss_norm does)")
    return replace(loss_norm, n_tokens=loss_norm.n_images * tokens_per_image,
                   n_seqs=loss_norm.n_images)


def mlp_names(block: int) -> dict[str, str]:
    """A dense block's MLP tensor -> the MoE layer's stacked expert tensor it fills."""
    p = f"blocks.{block}.mlp."
    return {p + "fc1.weight": p + "experts.w_in", p + "fc1.bias": p + "experts.b_in",
            p + "fc2.weight": p + "experts.w_out", p + "fc2.bias": p + "experts.b_out"}


@torch.no_grad()
def upcycle_tower_state(dense: dict[str, Tensor], target: dict[str, Tensor],
                        moe_blocks: list[int]) -> dict[str, Tensor]:
    """A state dict for a tower with MoE blocks ``moe_blocks`` (whose own state dict,
    initialised, is ``target``) from a dense tower's ``dense``: every tensor copied by name,
    each MoE block's experts all set to its dense MLP (``fc1.weight [F, Dv]`` ->
    ``w_in [E, Dv, F]``, ``fc2.weight [Dv, F]`` -> ``w_out [E, F, Dv]``, biases alike),
    the routers kept as ``target`` has them. Raises ``ValueError`` naming a tensor that does
    not fit."""
    out, used = {}, set()
    for i in moe_blocks:
        for src, dst in mlp_names(i).items():
            if src not in dense:
                raise ValueError(f"vision upcycling: the dense tower has no {src!r} for MoE block {i}")
            w = dense[src]
            w = w.t() if w.ndim == 2 else w  # [Dv, F] / [F, Dv] in the stacked layout
            if tuple(w.shape) != tuple(target[dst].shape[1:]):
                raise ValueError(f"vision upcycling: {src} has shape {tuple(dense[src].shape)}, "
                                 f"the experts {tuple(target[dst].shape)} (vision.moe_d_expert "
                                 "must be the MLP's width, vision.d_ff)")
            out[dst] = w.unsqueeze(0).expand_as(target[dst]).to(target[dst].dtype).clone()
            used.add(src)
    for k, v in target.items():
        if k in out:
            continue
        if ".mlp.router." in k:  # new: the dense tower has no router
            out[k] = v
            continue
        if k not in dense or dense[k].shape != v.shape:
            raise ValueError(f"vision upcycling: the dense tower has no tensor {k!r} of shape "
                             f"{tuple(v.shape)}; it must be the same tower but for its MLPs")
        out[k] = dense[k].to(v.dtype)
        used.add(k)
    unused = sorted(set(dense) - used)
    if unused:
        raise ValueError(f"vision upcycling: dense tensors with no place in the MoE tower: {unused[:5]}")
    return out
