"""Held-out evaluation: LM loss, and for question/answer data exact-match accuracy and
caption loss.

Exact match is computed teacher-forced in the same forward pass: an answer counts as
correct when the argmax prediction is right at every one of its label positions
(terminator included). That is exactly "greedy decoding reproduces the answer", without
a decoding loop. Legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_vlm.data.sample import IGNORE_INDEX
from moe_vlm.parallel.runtime import Layout
from moe_vlm.train.inputs import autocast, model_inputs


def _answers(logits: Tensor, labels: Tensor, answer_ids: Tensor, has: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Per (sample, answer) slot, ``answer_ids[has]``'s positions grouped: (key [P] the slot
    of each such position, wrong [slots] mispredicted positions, present [slots] positions).
    An answer is correct when all its positions are predicted (teacher-forced argmax)."""
    ok = (logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)  # [B, S]
    n_ans = int(answer_ids.max()) + 1
    key = (torch.arange(labels.shape[0], device=labels.device)[:, None] * n_ans + answer_ids)[has]
    wrong = torch.zeros(labels.shape[0] * n_ans, device=labels.device)
    wrong.index_add_(0, key, (~ok[has]).float())
    present = torch.zeros_like(wrong).index_add_(0, key, torch.ones_like(key, dtype=torch.float))
    return key, wrong, present


def answer_correct(logits: Tensor, labels: Tensor, answer_ids: Tensor) -> tuple[int, int]:
    """(correct, total) answers: logits [B, S, V], labels/answer_ids [B, S]."""
    has = answer_ids >= 0
    if not bool(has.any()):
        return 0, 0
    _, wrong, present = _answers(logits, labels, answer_ids, has)
    return int(((present > 0) & (wrong == 0)).sum()), int((present > 0).sum())


def correct_by_type(logits: Tensor, labels: Tensor, answer_ids: Tensor, answer_types: Tensor,
                    n_types: int) -> Tensor:
    """[2, n_types] float64: (correct, total) answers of each question type, from logits
    [B, S, V], labels, answer_ids and answer_types [B, S] (the type code of each answer's
    positions, ``-1`` elsewhere), by the same exact-match rule as ``answer_correct``."""
    out = torch.zeros(2, n_types, dtype=torch.float64, device=labels.device)
    has = (answer_ids >= 0) & (answer_types >= 0)
    if not bool(has.any()):
        return out
    key, wrong, present = _answers(logits, labels, answer_ids, has)
    kind = key.new_zeros(present.shape).scatter_(0, key, answer_types[has])  # [slots] type
    real = present > 0  # [slots] answers that occur
    out[1].index_add_(0, kind[real], torch.ones(int(real.sum()), dtype=torch.float64, device=labels.device))
    out[0].index_add_(0, kind[real], (wrong[real] == 0).double())
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, batch_size: int, device: torch.device,
             amp: Optional[torch.dtype], layout: Optional[Layout] = None) -> dict[str, float]:
    """``eval_loss`` (token-weighted LM loss over the held-out split); with answers also
    ``eval_accuracy`` (exact match), ``eval_accuracy_<type>`` per question type where the
    data names them (``DataBundle.answer_types``) and ``caption_loss`` (loss on labelled
    non-answer tokens, e.g. captions). A mixture (``data.eval_parts``) also gets each source's numbers
    (``eval_loss_<source>``, ...); the overall ones are over all sources' tokens.

    With several processes (``layout``), rank r evaluates batches r, r+world, ... and the
    sums are reduced, so the numbers equal a single-process evaluation's (same batches).
    Under expert parallelism or FSDP every rank must run the same number of forwards (they
    run collectives), so a rank out of batches runs a spare one and discards it."""
    was_training = model.training
    model.eval()
    types = list(getattr(data, "answer_types", None) or [])
    try:
        parts = getattr(data, "eval_parts", None) or {}
        if not parts:
            return _results(_eval_sums(model, data, batch_size, device, amp, layout, None), types)
        res: dict[str, float] = {}
        total = torch.zeros(_N_SUMS + 2 * len(types), device=device, dtype=torch.float64)
        for name in parts:
            sums = _eval_sums(model, data, batch_size, device, amp, layout, name)
            total += sums
            res.update(_results(sums, types, f"_{name}"))
        return {**_results(total, types), **res}
    finally:
        model.train(was_training)


def _eval_sums(model: torch.nn.Module, data: Any, batch_size: int, device: torch.device,
               amp: Optional[torch.dtype], layout: Optional[Layout], part: Optional[str]) -> Tensor:
    """[6 + 2 * types] float64, reduced over ranks: loss, labelled tokens, caption loss,
    caption tokens, correct answers, answers, then correct answers and answers of each
    question type (of the held-out set, or of source ``part``)."""
    world = layout.world if layout is not None else 1
    rank = layout.rank if layout is not None else 0
    spare = layout is not None and layout.lockstep
    n_eval = len(data.eval if part is None else data.eval_parts[part])
    n_batches = -(-n_eval // batch_size)
    rounds = -(-n_batches // world)
    n_types = len(getattr(data, "answer_types", None) or [])
    sums = torch.zeros(_N_SUMS + 2 * n_types, device=device, dtype=torch.float64)
    batch, done = None, 0
    for batch in data.eval_batches(batch_size, rank, world, part):
        _eval_batch(model, batch, device, amp, sums)
        done += 1
    if spare and done < rounds:  # keep the collectives in step with the other ranks
        batch = batch if batch is not None else next(iter(data.eval_batches(batch_size, part=part)))
        for _ in range(rounds - done):
            _eval_batch(model, batch, device, amp, torch.zeros_like(sums))
    if layout is not None:
        layout.all_sum(sums)
    return sums


_N_SUMS = 6  # the sums before the per-type ones


def _results(sums: Tensor, types: list[str], suffix: str = "") -> dict[str, float]:
    values = sums.tolist()  # host sync
    loss_sum, n_tok, cap_sum, n_cap, correct, total = values[:_N_SUMS]
    res = {f"eval_loss{suffix}": loss_sum / max(1.0, n_tok)}
    if total:
        res[f"eval_accuracy{suffix}"] = correct / total
    n = len(types)
    for i, name in enumerate(types):
        ok, count = values[_N_SUMS + i], values[_N_SUMS + n + i]
        if count:
            res[f"eval_accuracy_{name}{suffix}"] = ok / count
    if n_cap:
        res[f"caption_loss{suffix}"] = cap_sum / n_cap
    return res


def _eval_batch(model: torch.nn.Module, batch: dict[str, Tensor], device: torch.device,
                amp: Optional[torch.dtype], sums: Tensor) -> None:
    inputs = model_inputs(batch, device)
    labels = inputs["labels"]
    with autocast(device, amp):
        out = model(**inputs)
    tok_loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="none")  # [B*S]
    valid = labels.flatten() != IGNORE_INDEX
    sums[0] += tok_loss.sum().double()
    sums[1] += valid.sum()
    if "answer_ids" in batch:
        ans = batch["answer_ids"].to(device)
        cap = valid & (ans.flatten() < 0)
        sums[2] += tok_loss[cap].sum().double()
        sums[3] += cap.sum()
        c, t = answer_correct(out.logits, labels, ans)
        sums[4] += c
        sums[5] += t
        n_types = (sums.numel() - _N_SUMS) // 2
        if n_types and "answer_types" in batch:
            by_type = correct_by_type(out.logits, labels, ans, batch["answer_types"].to(device),
                                      n_types)  # [2, types]
            sums[_N_SUMS:] += by_type.flatten()
