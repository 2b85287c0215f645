"""One optimiser step's forward/backward over its micro-batches, and the step's metrics.

Legend: B micro-batch size, S sequence, T real tokens of a micro-batch, E experts.

The step's token totals are counted before any forward (``step_loss_norm``: one
all-reduce), so each micro-batch's loss is its share of the global-batch mean
(``moe_vlm.routing.loss_norm``) and the engines sum the shares' gradients. The loss, the
gradients and the routing metrics therefore do not depend on ``train.micro_batch_size``
or on the (dp, ep) layout, to float rounding (the micro-batch and global-batch balance
losses aside, whose scope is the micro-batch by design).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from moe_vlm.data.sample import IGNORE_INDEX
from moe_vlm.parallel.runtime import Layout
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.router import RouterOutput
from moe_vlm.train.evaluate import autocast, model_inputs

Modality = Optional[tuple[Tensor, Tensor]]  # (is_image, is_text) [T] of one micro-batch


@dataclass
class StepForward:
    """What one step's forward/backward produced (losses reduced over ranks)."""

    lm_loss: Tensor  # scalar: sum of target-token losses / target tokens of the global batch
    routing_loss: Tensor  # scalar: the step's weighted aux + z losses
    routing: list[list[RouterOutput]]  # [micro-batch][MoE layer], this rank's
    modality: list[Modality]  # per micro-batch, None for text-only data
    norm: LossNorm  # the step's totals


def step_loss_norm(batches: list[dict[str, Tensor]], layout: Layout) -> LossNorm:
    """The step's totals over this rank's micro-batches ``batches`` and every rank (one
    all-reduce): target tokens, real tokens and sequences of the global batch."""
    n_tgt = n_tok = n_seq = 0
    for b in batches:  # CPU tensors: no device sync
        mask = b.get("token_mask")
        mask = torch.ones_like(b["input_ids"], dtype=torch.bool) if mask is None else mask
        n_tgt += int((b["labels"] != IGNORE_INDEX).sum())
        n_tok += int(mask.sum())
        n_seq += int(mask.any(1).sum())
    totals = torch.tensor([n_tgt, n_tok, n_seq], dtype=torch.float64, device=layout.device)
    n_tgt, n_tok, n_seq = layout.all_sum(totals).tolist()  # host sync
    return LossNorm(n_targets=n_tgt, n_tokens=n_tok, n_seqs=n_seq, n_micro=len(batches),
                    n_ranks=layout.world)


def modality_masks(inputs: dict[str, Tensor], image_id: int) -> tuple[Tensor, Tensor]:
    """(is_image, is_text) [T] over the real tokens of a batch, in the order the MoE layers
    route them (row-major ``input_ids[token_mask]``), so ``RouterOutput.token_idx`` indexes
    them."""
    ids = inputs["input_ids"]
    mask = inputs.get("token_mask")
    ids = ids.flatten() if mask is None else ids[mask]  # [T]
    is_img = ids == image_id
    return is_img, ~is_img


def forward_backward_step(engine: Any, batches: list[dict[str, Tensor]], layout: Layout,
                          amp: Optional[torch.dtype], image_id: Optional[int] = None) -> StepForward:
    """Forward and backward every micro-batch of this rank's share of one step through
    ``engine`` (gradients accumulate; no optimiser step), and reduce the losses."""
    device = layout.device
    norm = step_loss_norm(batches, layout)
    lm = torch.zeros((), device=device)
    rt = torch.zeros((), device=device)
    routing, modality = [], []
    for m, batch in enumerate(batches):
        inputs = model_inputs(batch, device)
        out = engine.forward_backward({**inputs, "loss_norm": norm}, m == len(batches) - 1,
                                      lambda: autocast(device, amp))
        modality.append(None if image_id is None else modality_masks(inputs, image_id))
        lm += out.lm_loss.detach()  # shares: they add up to the step's means
        rt += out.routing_loss.detach()
        routing.append(out.routing)
    if layout.distributed:  # the step's losses: the shares of every rank
        lm, rt = layout.all_sum(torch.stack([lm, rt]).double()).float().unbind()
    return StepForward(lm, rt, routing, modality, norm)


def layer_metrics(model: torch.nn.Module, fb: StepForward, layout: Layout) -> dict[str, dict]:
    """Aggregate one step's router outputs (per micro-batch, summed over ranks) into
    per-layer metrics over the step's real tokens: loads summed, entropy the mean over all
    routed tokens, drop fraction over all requested assignments, aux/z losses the step's
    values (the sum of the shares). So the metrics do not depend on micro-batching.

    With image-text data each layer also reports its load split by modality
    (``tokens_per_expert_image`` / ``_text``)."""
    decoder = getattr(model, "decoder", model)
    moe_ids = [i for i, is_moe in enumerate(decoder.schedule) if is_moe]
    sums = ("entropy_sum", "n_tokens", "n_requested", "n_kept", "aux_loss", "z_loss")
    has_modality = fb.modality[0] is not None
    out = {}
    for j, layer in enumerate(moe_ids):
        rs = [micro[j] for micro in fb.routing]
        counts = torch.stack([r.counts for r in rs]).sum(0).float()  # [E]
        n_exp = counts.numel()
        stats = torch.stack([torch.stack([r.stats[k].detach().float() for r in rs]).sum()
                             for k in sums]).to(counts.device)  # [6]
        parts = [counts, stats]
        if has_modality:
            img = torch.zeros(n_exp, device=counts.device)
            txt = torch.zeros(n_exp, device=counts.device)
            for r, (is_img, is_txt) in zip(rs, fb.modality):
                img += torch.bincount(r.expert_idx[is_img[r.token_idx]], minlength=n_exp)
                txt += torch.bincount(r.expert_idx[is_txt[r.token_idx]], minlength=n_exp)
            parts += [img, txt]
        flat = layout.all_sum(torch.cat(parts).double())  # one reduction per layer
        counts = flat[:n_exp]
        ent, n_tok, n_req, n_kept, aux, z = flat[n_exp:n_exp + 6].tolist()  # host sync
        mean = counts.mean().clamp_min(1e-9)
        row = {"tokens_per_expert": counts.tolist(),
               "max_violation": (counts.max() / mean - 1).item(),
               "drop_frac": 1.0 - n_kept / n_req if n_req else 0.0,
               "entropy": ent / max(1.0, n_tok), "aux_loss": aux, "z_loss": z}
        if has_modality:
            row["tokens_per_expert_image"] = flat[n_exp + 6:2 * n_exp + 6].tolist()
            row["tokens_per_expert_text"] = flat[2 * n_exp + 6:].tolist()
        out[f"layer_{layer}"] = row
    return out
