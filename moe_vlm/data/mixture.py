"""Weighted data mixtures (``data=mixture``): several sources, one training stream.

Global training samples are cut into blocks of ``BLOCK`` samples. Each block holds a fixed
count of every source (the weights times ``BLOCK``, rounded by largest remainder so the
counts add up), in an order drawn from a generator seeded by (data seed, block): sample
``g`` maps to one source and to that source's own sample index without any state, so a
resume and every process layout read the same samples, and the realised proportions over
any run of whole blocks are the weights exactly. Each source keeps its own addressing
(epochs, shuffling) through its ``DataBundle``. The held-out set is every source's, in
turn. ``realised(n)`` counts each source's samples among the first ``n`` global samples
(``mixture_<source>`` in ``metrics.jsonl``'s ``data``): computed, not tallied, so it is the
same after a resume and at every process layout.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

BLOCK = 256


def block_counts(weights: Sequence[float], block: int = BLOCK) -> list[int]:
    """Samples of each source per block: ``block * w / sum(w)`` by largest remainder."""
    total = float(sum(weights))
    exact = [block * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[:block - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureTrain:
    """The training side: ``_sample(g)`` -> ``(source index, that source's sample index)``."""

    streaming = False

    def __init__(self, names: Sequence[str], bundles: Sequence[Any], weights: Sequence[float], seed: int):
        self.names, self.bundles, self.seed = list(names), list(bundles), seed
        self.counts = block_counts(weights)
        self._block: tuple[int, list[tuple[int, int]]] = (-1, [])

    def _layout(self, block: int) -> list[tuple[int, int]]:
        """(source, rank within this block's samples of that source) per slot of ``block``."""
        if self._block[0] != block:
            labels = torch.tensor([k for k, c in enumerate(self.counts) for _ in range(c)])
            gen = torch.Generator().manual_seed(self.seed * 7_919 + block)
            labels = labels[torch.randperm(len(labels), generator=gen)].tolist()
            seen = [0] * len(self.counts)
            slots = []
            for k in labels:
                slots.append((k, seen[k]))
                seen[k] += 1
            self._block = (block, slots)
        return self._block[1]

    def locate(self, g: int) -> tuple[int, int]:
        block, pos = divmod(g, BLOCK)
        k, rank = self._layout(block)[pos]
        return k, block * self.counts[k] + rank

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        k, j = self.locate(g)
        return self.bundles[k]._sample(j)

    def realised(self, n: int) -> dict[str, int]:
        """Samples of each source among global samples ``[0, n)``."""
        full, part = divmod(n, BLOCK)
        out = [full * c for c in self.counts]
        for k, _ in self._layout(full)[:part] if part else []:
            out[k] += 1
        return {f"mixture_{name}": c for name, c in zip(self.names, out)}


class ConcatEval:
    """The sources' held-out sets one after another."""

    def __init__(self, sets: Sequence[Any]):
        self.sets = list(sets)
        self.sizes = [len(s) for s in self.sets]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        for s, n in zip(self.sets, self.sizes):
            if i < n:
                return s[i]
            i -= n
        raise IndexError(i)
