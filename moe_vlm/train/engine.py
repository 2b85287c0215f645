"""Pick the training engine for ``parallel.engine`` (``moe_vlm.parallel.engines``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_vlm.config.schema import Config
from moe_vlm.parallel.runtime import Layout
from moe_vlm.train.optim import build_optimizer, param_groups


def build_engine(cfg: Config, model: nn.Module, layout: Layout, micro_bs: int, n_micro: int) -> Any:
    """The engine that trains ``model`` (already expert-parallel if ``parallel.ep > 1``)."""
    if cfg.parallel.engine == "deepspeed":
        from moe_vlm.parallel.deepspeed_engine import DeepSpeedEngine

        t = cfg.train
        return DeepSpeedEngine(model, layout, param_groups(model, t.weight_decay), lr=t.lr,
                               betas=(t.beta1, t.beta2), eps=t.eps, grad_clip=t.grad_clip,
                               micro_batch_size=micro_bs, grad_accum=n_micro,
                               zero_stage=cfg.parallel.zero_stage)
    from moe_vlm.parallel.engines import TorchEngine

    # A VLM batch may hold no image, leaving the vision path without gradients.
    return TorchEngine(model, lambda m: build_optimizer(m, cfg.train), layout,
                       find_unused=cfg.vision.name != "none")
