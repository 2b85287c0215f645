"""Pick the training engine for ``parallel.engine`` (``moe_vlm.parallel.engines``)."""

from __future__ import annotations

from moe_vlm.config.schema import Config
from moe_vlm.parallel.engines import Engine, TorchEngine
from moe_vlm.parallel.parallelize import Parallelized
from moe_vlm.parallel.runtime import Layout
from moe_vlm.train.optim import build_optimizer, param_groups


def build_engine(cfg: Config, par: Parallelized, layout: Layout, micro_bs: int, n_micro: int) -> Engine:
    """The engine that trains a model ``moe_vlm.parallel.parallelize`` made ready."""
    t = cfg.train
    if cfg.parallel.engine == "deepspeed":
        from moe_vlm.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(par, layout, param_groups(par.model, t.weight_decay, t.vision_lr_scale), lr=t.lr,
                               betas=(t.beta1, t.beta2), eps=t.eps, grad_clip=t.grad_clip,
                               micro_batch_size=micro_bs, grad_accum=n_micro,
                               zero_stage=cfg.parallel.zero_stage)
    return TorchEngine(par, lambda m: build_optimizer(m, t), layout, t.grad_clip)
