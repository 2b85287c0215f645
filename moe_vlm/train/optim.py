"""AdamW with parameter groups and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_vlm.config.schema import TrainConfig


VISION_PREFIXES = ("vision.", "projector.")  # what makes the image tokens (VLM parameter names)


def param_groups(model: nn.Module, weight_decay: float, vision_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices (linear, expert, router and embedding weights); no decay on
    norms and biases. The router's balance bias is a buffer, so no optimiser sees it.

    ``vision_lr_scale != 1``: the vision tower's and projector's trainable parameters go
    into two more groups whose ``lr_scale`` the engines multiply the step's learning rate
    by. At 1, or for a model without them (text-only), the groups are the two they always
    were, so older checkpoints' optimiser states load."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim < 2 or "norm" in name or name.endswith(".bias"))
        vision = vision_lr_scale != 1.0 and name.startswith(VISION_PREFIXES)
        groups.setdefault((vision, decays), []).append(p)
    out = [{"params": groups.get((False, True), []), "weight_decay": weight_decay},
           {"params": groups.get((False, False), []), "weight_decay": 0.0}]
    if (True, True) in groups or (True, False) in groups:  # a model with an image path
        out += [{"params": groups.get((True, True), []), "weight_decay": weight_decay,
                 "lr_scale": vision_lr_scale},
                {"params": groups.get((True, False), []), "weight_decay": 0.0,
                 "lr_scale": vision_lr_scale}]
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``. On CUDA the fused implementation (one kernel for all
    parameters instead of a loop of small ones); on CPU the default one, whose results
    earlier runs and checkpoints were made with."""
    groups = param_groups(model, cfg.weight_decay, cfg.vision_lr_scale)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **({"fused": True} if fused else {}))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Linear warmup to ``lr``, then ``cosine`` decay to ``min_lr_ratio * lr`` at
    ``max_steps``; ``wsd`` holds ``lr`` and decays linearly over the last
    ``wsd_decay_frac`` of the steps (warmup-stable-decay); ``constant`` holds it."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))
    decay_start = cfg.max_steps - max(1, round(cfg.wsd_decay_frac * cfg.max_steps))
    if step < decay_start:
        return peak
    frac = min(1.0, (step - decay_start + 1) / (cfg.max_steps - decay_start))
    return peak + (floor - peak) * frac
