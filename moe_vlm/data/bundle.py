"""``DataBundle``: a run's training and held-out sets behind one interface, so the training
loop does not care whether it reads embedded text, embedded image-text scenes, text
corpora or LLaVA-format data from disk.

Training batches are addressed by (step, micro-batch): resuming needs no iterator state
for map-style sources, and a multi-process run can take its slice of the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from moe_vlm.data.sample import collate
from moe_vlm.data.v2pe import V2PE


@dataclass
class DataBundle:
    train: Any  # map-style (indexable; unbounded or with __len__) or iterable-only (streaming)
    eval: Any  # indexable, with __len__
    tokenizer: Any
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] = collate
    chance_accuracy: Optional[float] = None  # of the eval questions, if it has any
    seed: int = 0
    corpus_stats: dict[str, int] = field(default_factory=dict)  # text corpora: skipped at tokenisation
    eval_parts: dict[str, Any] = field(default_factory=dict)  # a mixture: each source's held-out set
    v2pe: Optional[V2PE] = None  # variable image-token positions (``data.v2pe_*``)
    answer_types: list[str] = field(default_factory=list)  # names of the ``answer_types`` codes
    _perm: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _stream: Optional[tuple[int, Iterator]] = field(default=None, repr=False)

    def _sample(self, g: int) -> dict[str, torch.Tensor]:
        """Global training sample ``g``: direct for unbounded sources, a fresh seeded
        permutation per epoch for finite ones, in order for streaming ones."""
        src = self.train
        if getattr(src, "streaming", False) or not hasattr(src, "__getitem__"):
            return self._stream_sample(g)
        try:
            n = len(src)
        except TypeError:  # unbounded synthetic stream
            return src[g]
        epoch, pos = divmod(g, n)
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(n, generator=gen)}
        return src[int(self._perm[epoch][pos])]

    def _stream_sample(self, g: int) -> dict[str, torch.Tensor]:
        # Streaming sources are read in order, epoch after epoch; jumping back (resume)
        # restarts the stream and skips ahead.
        if self._stream is None or self._stream[0] > g:
            self._stream = (0, iter(self.train))
        pos, it = self._stream
        while True:
            try:
                sample = next(it)
            except StopIteration:
                if pos == 0:
                    raise ValueError("the streaming training set yielded no usable sample") from None
                it = iter(self.train)
                continue
            if pos == g:
                self._stream = (pos + 1, it)
                return sample
            pos += 1

    def train_batch(self, step: int, micro: int, micro_batch_size: int,
                    batch_size: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``micro`` of global step ``step``: global samples
        ``step*batch_size + micro*micro_batch_size + [0, micro_batch_size)``."""
        start = step * batch_size + micro * micro_batch_size
        return self.collate([self._positioned(self._sample(start + i), start + i)
                             for i in range(micro_batch_size)])

    def _positioned(self, sample: dict[str, torch.Tensor], g: Optional[int]) -> dict[str, torch.Tensor]:
        """``sample`` with V2PE's ``position_ids`` when on (``g``: its global training index,
        None for a held-out one)."""
        if self.v2pe is None:
            return sample
        return {**sample, "position_ids": self.v2pe.positions(sample["input_ids"], g)}

    def stats(self, n_samples: Optional[int] = None) -> dict[str, int]:
        """Counters of skipped rows (missing/corrupt images, too long, malformed) and
        packing, summed over the train and eval sources that keep them; for a mixture
        also each source's samples among the first ``n_samples`` global samples."""
        out: dict[str, int] = dict(self.corpus_stats)
        if n_samples is not None and hasattr(self.train, "realised"):
            out.update(self.train.realised(n_samples))
        for src in (self.train, self.eval):
            for k, v in getattr(src, "stats", {}).items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1,
                     part: Optional[str] = None):
        """Held-out batches ``rank, rank + world, ...`` (all of them by default), so each of
        ``world`` processes reads and collates only its own share; of one source's held-out
        set with ``part`` (a mixture's ``eval_parts``)."""
        src = self.eval if part is None else self.eval_parts[part]
        n = len(src)
        for start in range(rank * batch_size, n, world * batch_size):
            yield self.collate([self._positioned(src[i], None)
                                for i in range(start, min(n, start + batch_size))])
