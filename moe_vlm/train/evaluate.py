"""Held-out evaluation: LM loss, and for question/answer data exact-match accuracy and
caption loss.

Exact match is computed teacher-forced in the same forward pass: an answer counts as
correct when the argmax prediction is right at every one of its label positions
(terminator included). That is exactly "greedy decoding reproduces the answer", without
a decoding loop. Legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_vlm.data.sample import IGNORE_INDEX


def model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The keyword arguments a model's forward takes from a batch."""
    out = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"].to(device)
    return out


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def answer_correct(logits: Tensor, labels: Tensor, answer_ids: Tensor) -> tuple[int, int]:
    """(correct, total) answers: logits [B, S, V], labels/answer_ids [B, S]."""
    ok = (logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)  # [B, S]
    has = answer_ids >= 0
    if not bool(has.any()):
        return 0, 0
    n_ans = int(answer_ids.max()) + 1
    key = (torch.arange(labels.shape[0], device=labels.device)[:, None] * n_ans + answer_ids)[has]
    wrong = torch.zeros(labels.shape[0] * n_ans, device=labels.device)
    wrong.index_add_(0, key, (~ok[has]).float())
    present = torch.zeros_like(wrong).index_add_(0, key, torch.ones_like(key, dtype=torch.float))
    total = int((present > 0).sum())
    return int(((present > 0) & (wrong == 0)).sum()), total


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, batch_size: int, device: torch.device,
             amp: Optional[torch.dtype]) -> dict[str, float]:
    """``eval_loss`` (token-weighted LM loss over the held-out split); with answers also
    ``eval_accuracy`` (exact match) and ``caption_loss`` (loss on labelled non-answer
    tokens, e.g. captions)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    cap_sum = torch.zeros((), device=device, dtype=torch.float64)
    n_tok = n_cap = correct = total = 0
    for batch in data.eval_batches(batch_size):
        inputs = model_inputs(batch, device)
        labels = inputs["labels"]
        with autocast(device, amp):
            out = model(**inputs)
        tok_loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="none")  # [B*S]
        valid = labels.flatten() != IGNORE_INDEX
        loss_sum += tok_loss.sum().double()
        n_tok += int(valid.sum())
        if "answer_ids" in batch:
            ans = batch["answer_ids"].to(device)
            cap = valid & (ans.flatten() < 0)
            cap_sum += tok_loss[cap].sum().double()
            n_cap += int(cap.sum())
            c, t = answer_correct(out.logits, labels, ans)
            correct, total = correct + c, total + t
    model.train(was_training)
    res = {"eval_loss": (loss_sum / max(1, n_tok)).item()}  # host sync
    if total:
        res["eval_accuracy"] = correct / total
    if n_cap:
        res["caption_loss"] = (cap_sum / n_cap).item()
    return res
