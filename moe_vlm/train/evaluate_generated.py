"""Held-out answers by actually generating them (greedy, KV-cached), for free-form scoring
and for looking at what the model says.

``evaluate`` scores answers teacher-forced: an answer is right when the argmax is right at
every answer position, its terminator included. Greedy decoding from the same prompt
reproduces the answer exactly then, and only then: it emits the answer's tokens and stops
at the eos. This module runs that decoding, so the two must agree answer by answer (a
test checks it), and it returns the generated text next to the truth. It costs one
decoding loop per batch of questions, so the training loop does not call it; a user or a
command calls it on a finished model.

Legend: N images, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from moe_vlm.generate.decode import generate_ids


@dataclass(frozen=True)
class GeneratedAnswer:
    """One held-out question: which sample and answer, its type code (-1: none), the
    prompt (conversation so far, earlier answers teacher-forced), the true and the
    generated answer ids (without the eos) and texts."""

    sample: int
    answer: int
    answer_type: int
    prompt: list[int]
    truth: list[int]
    generated: list[int]
    truth_text: str
    generated_text: str

    @property
    def correct(self) -> bool:
        """Exact match of the token sequence (so of the text), terminated by the eos."""
        return self.generated == self.truth


def answer_questions(sample: dict[str, Tensor], eos_id: int
                     ) -> list[tuple[int, list[int], list[int], int]]:
    """(answer index, prompt ids, true answer ids without the eos, type code) of each
    answer of a chat sample (``moe_vlm.data.chat``: ``labels``/``answer_ids`` mark the
    positions that predict answer k; its prompt is the input up to the first of them)."""
    ids, labels, ans = sample["input_ids"], sample["labels"], sample["answer_ids"]
    types = sample.get("answer_types")
    out = []
    for k in sorted(set(ans[ans >= 0].tolist())):
        where = (ans == k).nonzero().squeeze(1)  # [n] positions predicting answer k
        truth = labels[where].tolist()
        if truth[-1] != eos_id:
            raise ValueError(f"answer {k} does not end with the eos id {eos_id}; generated "
                             "answers need a terminator to compare")
        kind = int(types[where[0]]) if types is not None else -1
        out.append((k, ids[:int(where[0]) + 1].tolist(), truth[:-1], kind))
    return out


@torch.no_grad()
def generated_answers(model: nn.Module, samples: Sequence[dict[str, Tensor]], eos_id: int,
                      decode: Callable[[list[int]], str], pad_id: int = 0,
                      batch_size: int = 16, v2pe_delta: float = 1.0) -> list[GeneratedAnswer]:
    """Greedy answers of ``model`` to every question of ``samples`` (e.g. ``data.eval``
    items), ``batch_size`` questions per decoding batch (left-padded: each is answered as
    if alone)."""
    vlm = hasattr(model, "image_token_id")
    todo: list[tuple[int, int, list[int], list[int], int, Optional[Tensor]]] = []
    for s, sample in enumerate(samples):
        for k, prompt, truth, kind in answer_questions(sample, eos_id):
            pixels = None
            if vlm:
                n = sum(t == model.image_token_id for t in prompt) // model.n_image_tokens
                pixels = sample["pixel_values"][:n] if n else None  # [n, 3, H, W]
            todo.append((s, k, prompt, truth, kind, pixels))
    out: list[GeneratedAnswer] = []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        ims = [p for *_, p in chunk if p is not None]
        pixel_values = torch.cat(ims) if ims else None  # [N, 3, H, W]
        budget = max(len(truth) for _, _, _, truth, _, _ in chunk) + 1
        gen = generate_ids(model, [p for _, _, p, *_ in chunk], pixel_values, budget,
                           stop_ids=[eos_id], pad_id=pad_id, v2pe_delta=v2pe_delta)
        for (s, k, prompt, truth, kind, _), g in zip(chunk, gen):
            out.append(GeneratedAnswer(s, k, kind, prompt, truth, g, decode(truth), decode(g)))
    return out


def generated_accuracy(answers: Sequence[GeneratedAnswer],
                       type_names: Sequence[str] = ()) -> dict[str, float]:
    """``gen_accuracy`` over all answers and ``gen_accuracy_<type>`` per question type
    (``type_names[code]``), the names ``evaluate`` uses with ``gen_`` in front."""
    res: dict[str, float] = {}
    if answers:
        res["gen_accuracy"] = sum(a.correct for a in answers) / len(answers)
    for code, name in enumerate(type_names):
        mine = [a for a in answers if a.answer_type == code]
        if mine:
            res[f"gen_accuracy_{name}"] = sum(a.correct for a in mine) / len(mine)
    return res


def evaluate_generated(model: nn.Module, data: Any, tokenizer: Any, n_samples: Optional[int] = None,
                       batch_size: int = 16, v2pe_delta: float = 1.0) -> dict[str, float]:
    """``generated_accuracy`` of the first ``n_samples`` held-out samples of a data bundle
    (all by default)."""
    n = len(data.eval) if n_samples is None else min(n_samples, len(data.eval))
    answers = generated_answers(model, [data.eval[i] for i in range(n)], tokenizer.eos_id,
                                tokenizer.decode, tokenizer.pad_id, batch_size, v2pe_delta)
    return generated_accuracy(answers, getattr(data, "answer_types", None) or ())
