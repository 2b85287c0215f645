"""Greedy sequence packing: several samples per ``seq_len`` sequence, in order.

Shapes: S = ``seq_len`` tokens per pack, N images in a pack (<= ``max_images``), H x W.

Short conversations waste most of a padded sequence; packing fills it. Samples are
appended to the current pack while its tokens stay <= ``seq_len`` and its images
<= ``max_images`` (the image budget bounds vision-tower memory per sequence); when the
next sample does not fit, the pack is emitted, padded to exactly ``seq_len`` (ids
``pad_id``, labels -100, answer ids -1), and a new pack starts with that sample. Order
is kept, so packing a deterministic sample stream gives deterministic packs. Each pack
carries its ``token_mask`` (False on the padded tail), so padding is never routed. A sample
that alone exceeds a budget can never fit: it is dropped and counted in
``Packer.stats``.

Labels are per sample and already shifted, so no position is trained to predict the
first token of the next sample from the previous one's last token (unless the source's
own labels say so). ``answer_ids`` of each sample are offset by the number of answer ids
used earlier in the pack, so they stay unique within the pack.

Attention caveat: packed samples attend to the earlier samples in their pack (plain
causal mask, no per-document mask), and positions continue across sample boundaries.
This is the usual cheap trade-off; it leaks context between unrelated samples, which
matters little for training but means packed eval is not identical to unpacked eval.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from moe_vlm.data.sample import IGNORE_INDEX


class Packer:
    """Stateful packer; ``stats`` counts packs, packed samples and dropped samples.

    ``stats`` keys: ``packs``, ``samples``, ``dropped_too_long`` (more than ``seq_len``
    tokens), ``dropped_too_many_images`` (more than ``max_images`` images)."""

    def __init__(self, seq_len: int, max_images: int, pad_id: int):
        if seq_len < 1 or max_images < 0:
            raise ValueError(f"need seq_len >= 1 and max_images >= 0, got {seq_len}, {max_images}")
        self.seq_len, self.max_images, self.pad_id = seq_len, max_images, pad_id
        self.stats = {"packs": 0, "samples": 0, "dropped_too_long": 0,
                      "dropped_too_many_images": 0}

    def _emit(self, pack: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        s = self.seq_len
        out = {"input_ids": torch.full((s,), self.pad_id, dtype=torch.long),  # [S]
               "labels": torch.full((s,), IGNORE_INDEX, dtype=torch.long),  # [S]
               "answer_ids": torch.full((s,), -1, dtype=torch.long),  # [S]
               "token_mask": torch.zeros(s, dtype=torch.bool)}  # [S], False = padding
        pos, offset = 0, 0
        for sample in pack:
            n = sample["input_ids"].numel()
            out["input_ids"][pos:pos + n] = sample["input_ids"]
            out["labels"][pos:pos + n] = sample["labels"]
            own = sample.get("token_mask")
            out["token_mask"][pos:pos + n] = True if own is None else own.bool()
            if "answer_ids" in sample:
                a = sample["answer_ids"]  # [S_i]
                out["answer_ids"][pos:pos + n] = torch.where(a >= 0, a + offset, a)
                if bool((a >= 0).any()):
                    offset += int(a.max()) + 1
            pos += n
        pixels = [x["pixel_values"] for x in pack if "pixel_values" in x]
        if pixels:
            out["pixel_values"] = torch.cat(pixels)  # [N, 3, H, W]
        self.stats["packs"] += 1
        self.stats["samples"] += len(pack)
        return out

    def pack(self, samples: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """Yield packs of exactly ``seq_len`` tokens; the last partial pack is emitted too."""
        pack: list[dict[str, torch.Tensor]] = []
        tokens = images = 0
        for sample in samples:
            n = sample["input_ids"].numel()
            m = sample["pixel_values"].shape[0] if "pixel_values" in sample else 0
            if n > self.seq_len:
                self.stats["dropped_too_long"] += 1
                continue
            if m > self.max_images:
                self.stats["dropped_too_many_images"] += 1
                continue
            if pack and (tokens + n > self.seq_len or images + m > self.max_images):
                yield self._emit(pack)
                pack, tokens, images = [], 0, 0
            pack.append(sample)
            tokens, images = tokens + n, images + m
        if pack:
            yield self._emit(pack)


def pack_samples(samples: Iterable[dict[str, torch.Tensor]], seq_len: int, max_images: int,
                 pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Packs of ``samples`` (see the module docstring); use ``Packer`` for the counts."""
    return Packer(seq_len, max_images, pad_id).pack(samples)


class PackedSource:
    """Iterable training source that packs the samples of ``source`` (one pass, in order,
    repeated per epoch by ``DataBundle``) into sequences of ``seq_len`` tokens holding at
    most ``max_images`` images each."""

    def __init__(self, source: Any, seq_len: int, max_images: int, pad_id: int):
        self.source = source
        self.packer = Packer(seq_len, max_images, pad_id)

    @property
    def stats(self) -> dict[str, int]:
        return {**getattr(self.source, "stats", {}), **self.packer.stats}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.packer.pack(iter(self.source))


__all__ = ["PackedSource", "Packer", "pack_samples"]
