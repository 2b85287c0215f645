"""V2PE: variable visual position encoding (InternVL3; Ge et al., "V2PE: Improving
Multimodal Long-Context Capability of Vision-Language Models with Variable Visual Position
Encoding", 2024).

A text token advances the rotary position by 1, an image token by ``delta <= 1``::

    p_0 = 0,   p_i = p_{i-1} + (delta_j if token i belongs to image j else 1)

so an image of ``n`` tokens takes ``n * delta`` positions instead of ``n`` and long
multimodal contexts stay within the positions the model was trained on. In training each
image's delta is drawn from a set (the paper's {1, 1/2, 1/4, ..., 1/256}); in evaluation
and inference one delta is fixed. ``delta = 1`` everywhere gives the plain positions
0, 1, 2, ... exactly (the decoder then computes the same rotary angles, bit for bit).

Positions are made per sample (the draw seeded by the global sample index, so they do not
depend on micro-batching or on the process layout) and padded by ``collate``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


def v2pe_positions(input_ids: Tensor, image_id: int, n_image_tokens: int,
                   deltas: Sequence[float]) -> Tensor:
    """position_ids [S] float32 of one sample ``input_ids`` [S]: image ``j`` (the j-th run of
    ``n_image_tokens`` placeholder ids) advances by ``deltas[j]`` per token, text by 1.
    Summed in float64, so integer positions stay exact."""
    is_img = input_ids == image_id  # [S]
    n_img_tok = int(is_img.sum())
    if n_img_tok != len(deltas) * n_image_tokens:
        raise ValueError(f"V2PE: the sample has {n_img_tok} image placeholder tokens, not "
                         f"{len(deltas)} images x {n_image_tokens}")
    inc = torch.ones(input_ids.shape[0], dtype=torch.float64)  # [S]
    if n_img_tok:
        image_of = (torch.cumsum(is_img.long(), 0) - 1) // n_image_tokens  # [S] image index
        per_image = torch.tensor(list(deltas), dtype=torch.float64)  # [N]
        inc[is_img] = per_image[image_of[is_img]]
    if inc.numel():
        inc[0] = 0.0
    return torch.cumsum(inc, 0).float()


@dataclass(frozen=True)
class V2PE:
    """A run's V2PE settings (``data.v2pe_delta``, ``data.v2pe_train_deltas``)."""

    image_id: int
    n_image_tokens: int
    delta: float = 1.0  # evaluation / inference
    train_deltas: tuple[float, ...] = ()  # drawn per training image; empty: ``delta``
    seed: int = 0

    def positions(self, input_ids: Tensor, sample: Optional[int] = None) -> Tensor:
        """position_ids [S] of a sample; ``sample``: its global training index (the draw's
        seed), None for a held-out sample (the fixed delta)."""
        n_img = int((input_ids == self.image_id).sum()) // max(1, self.n_image_tokens)
        if sample is None or not self.train_deltas:
            deltas = [self.delta] * n_img
        else:
            rng = random.Random(f"v2pe/{self.seed}/{sample}")
            deltas = [rng.choice(self.train_deltas) for _ in range(n_img)]
        return v2pe_positions(input_ids, self.image_id, self.n_image_tokens, deltas)
