"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p.

Legend: B batch, V vocabulary.

Order as in Hugging Face's samplers: divide by the temperature, keep the ``top_k``
largest logits, then the smallest set of the most likely tokens whose probability reaches
``top_p`` (nucleus sampling, Holtzman et al. 2020), renormalise and draw. The draw uses
the caller's ``torch.Generator``, so a seed fixes the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """``temperature=0``: greedy (argmax; ``top_k``/``top_p`` then do nothing).
    ``top_k=0`` and ``top_p=1``: no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def filtered_logits(logits: Tensor, s: Sampling) -> Tensor:
    """logits [B, V] -> fp32 logits [B, V] divided by the temperature, with every token
    outside the top-k and the top-p nucleus set to -inf (at least one token is kept)."""
    x = logits.float() / s.temperature  # [B, V]
    if s.top_k and s.top_k < x.shape[-1]:
        kth = x.topk(s.top_k, dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1:
        sorted_x, order = x.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= s.top_p  # the first token has before = 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V]
        x = x.masked_fill(drop, float("-inf"))
    return x


def next_tokens(logits: Tensor, s: Sampling, generator: Optional[torch.Generator] = None) -> Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = filtered_logits(logits, s).softmax(-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
