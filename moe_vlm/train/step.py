"""One optimiser step's forward/backward over its micro-batches, and its routing metrics.

Legend: B micro-batch size, S sequence, T real tokens of a micro-batch, E experts.

The step's token totals are counted before any forward (``step_loss_norm``: one
all-reduce), so each micro-batch's loss is its share of the global-batch mean
(``moe_vlm.routing.loss_norm``) and the engines sum the shares' gradients. The loss, the
gradients and the routing metrics therefore do not depend on ``train.micro_batch_size``
or on the (dp, ep) layout, to float rounding (the micro-batch and global-batch balance
losses aside, whose scope is the micro-batch by design).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from moe_vlm.data.sample import IGNORE_INDEX
from moe_vlm.model.vision_moe import vision_moe_layers
from moe_vlm.parallel.runtime import Layout
from moe_vlm.parallel.engines import Engine
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.metrics import Modality, modality_masks, step_routing_metrics
from moe_vlm.routing.router import RouterOutput
from moe_vlm.train.inputs import autocast, model_inputs


@dataclass
class StepForward:
    """What one step's forward/backward produced (losses reduced over ranks)."""

    lm_loss: Tensor  # scalar: sum of target-token losses / target tokens of the global batch
    routing_loss: Tensor  # scalar: the step's weighted aux + z losses
    routing: list[list[RouterOutput]]  # [micro-batch][MoE layer], this rank's
    modality: list[Modality]  # per micro-batch, None for text-only data (or not collected)
    norm: LossNorm  # the step's totals
    collected: bool = True  # the routers made their logging metrics (RouterOutput.stats)
    # [micro-batch][vision MoE layer], this rank's (V-MoE; [] per micro-batch without them)
    vision_routing: list[list[RouterOutput]] = field(default_factory=list)


def step_loss_norm(batches: list[dict[str, Tensor]], layout: Layout) -> LossNorm:
    """The step's totals over this rank's micro-batches ``batches`` and every rank (one
    all-reduce): target tokens, real tokens, sequences and images of the global batch."""
    n_tgt = n_tok = n_seq = n_img = 0
    for b in batches:  # CPU tensors: no device sync
        mask = b.get("token_mask")
        mask = torch.ones_like(b["input_ids"], dtype=torch.bool) if mask is None else mask
        n_tgt += int((b["labels"] != IGNORE_INDEX).sum())
        n_tok += int(mask.sum())
        n_seq += int(mask.any(1).sum())
        n_img += int(b["pixel_values"].shape[0]) if "pixel_values" in b else 0
    totals = torch.tensor([n_tgt, n_tok, n_seq, n_img], dtype=torch.float64, device=layout.device)
    n_tgt, n_tok, n_seq, n_img = layout.all_sum(totals).tolist()  # host sync
    return LossNorm(n_targets=n_tgt, n_tokens=n_tok, n_seqs=n_seq, n_micro=len(batches),
                    n_ranks=layout.world, n_images=n_img)


def forward_backward_step(engine: Engine, batches: list[dict[str, Tensor]], layout: Layout,
                          amp: Optional[torch.dtype], image_id: Optional[int] = None,
                          collect: bool = True) -> StepForward:
    """Forward and backward every micro-batch of this rank's share of one step through
    ``engine`` (gradients accumulate; no optimiser step), and reduce the losses.
    ``collect``: whether the routers were asked for their logging metrics this step
    (``routing.metrics.collect_routing_stats``); the modality masks are made only then."""
    device = layout.device
    norm = step_loss_norm(batches, layout)
    lm = torch.zeros((), device=device)
    rt = torch.zeros((), device=device)
    routing, modality, vision_routing = [], [], []
    for m, batch in enumerate(batches):
        inputs = model_inputs(batch, device)
        out = engine.forward_backward({**inputs, "loss_norm": norm}, m == len(batches) - 1,
                                      lambda: autocast(device, amp))
        modality.append(None if image_id is None or not collect else
                        modality_masks(inputs["input_ids"], inputs.get("token_mask"), image_id))
        lm += out.lm_loss.detach()  # shares: they add up to the step's means
        rt += out.routing_loss.detach()
        routing.append(out.routing)
        vision_routing.append(out.vision_routing)
    if layout.distributed:  # the step's losses: the shares of every rank
        lm, rt = layout.all_sum(torch.stack([lm, rt]).double()).float().unbind()
    return StepForward(lm, rt, routing, modality, norm, collect, vision_routing)


def layer_metrics(model: torch.nn.Module, fb: StepForward, layout: Layout) -> dict[str, dict]:
    """The step's per-layer routing metrics (``routing.metrics.step_routing_metrics``),
    summed over the processes: ``layer_<i>`` for decoder layer i, and
    ``vision_layer_<i>`` for vision block i of a tower with MoE layers (image tokens only,
    so no split by modality)."""
    decoder = getattr(model, "decoder", model)
    moe_ids = [i for i, is_moe in enumerate(decoder.schedule) if is_moe]
    rows = step_routing_metrics(moe_ids, fb.routing, fb.modality, layout.all_sum)
    if vision_moe_layers(model):
        rows.update(step_routing_metrics(model.vision.moe_block_ids, fb.vision_routing,
                                         [None] * len(fb.vision_routing), layout.all_sum,
                                         prefix="vision_layer_"))
    return rows


def update_balance_biases(model: torch.nn.Module, fb: StepForward, layout: Layout,
                          rate: float) -> None:
    """Aux-loss-free balancing after a step: every MoE layer's (decoder's, then the vision
    tower's) selection bias moves by the step's loads, summed over the processes."""
    layers = [(model.moe_layers(), fb.routing), (vision_moe_layers(model), fb.vision_routing)]
    for moes, routing in layers:
        for j, moe in enumerate(moes):
            counts = torch.stack([r[j].counts for r in routing]).sum(0)  # [E] this rank's
            moe.update_bias(layout.all_sum(counts), rate)
