"""Embedded synthetic text corpus: generated on the fly, deterministic per (seed, index).

Each sample is a stream of short "documents" drawn from a few templates that a small
model can learn: attribute facts about coloured shapes, question/answer pairs whose
answer must be copied from a fact earlier in the same sample, small additions, and
key=value recall. Held-out samples use a different salt, so eval measures
generalisation to unseen combinations rather than memorisation.
"""

from __future__ import annotations

import random

import torch

from moe_vlm.data.byte_tokenizer import ByteTokenizer

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["cube", "ball", "cone", "ring", "star", "box"]
SIZES = ["small", "big", "tiny", "huge"]
PLACES = ["left", "right", "top", "bottom", "middle"]
KEYS = "abcdefghjkmnpqrstuvwxyz"


def _scene(rng: random.Random) -> str:
    n = rng.randint(2, 3)
    objs = [(rng.choice(COLORS), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(PLACES))
            for _ in range(n)]
    facts = " ".join(f"the {c} {s} is {z} and at the {p}." for c, s, z, p in objs)
    c, s, z, p = rng.choice(objs)
    q = rng.choice([(f"what color is the {s}?", c), (f"where is the {c} {s}?", p),
                    (f"how big is the {c} {s}?", z)])
    return f"{facts} Q: {q[0]} A: {q[1]}.\n"


def _addition(rng: random.Random) -> str:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a} + {b} = {a + b}.\n"


def _recall(rng: random.Random) -> str:
    keys = rng.sample(KEYS, 4)
    vals = [rng.choice(COLORS) for _ in keys]
    k = rng.randrange(4)
    pairs = ", ".join(f"{a}={v}" for a, v in zip(keys, vals))
    return f"{pairs}; {keys[k]}? {vals[k]}.\n"


def synthetic_document(rng: random.Random) -> str:
    return rng.choices([_scene, _addition, _recall], weights=[3, 1, 2])[0](rng)


class SyntheticText:
    """Map-style source of ``(input_ids [S], labels [S])`` next-token samples."""

    def __init__(self, seq_len: int, seed: int, split: str, n_samples: int | None = None):
        self.seq_len, self.seed, self.split, self.n_samples = seq_len, seed, split, n_samples
        self.tokenizer = ByteTokenizer()

    def __len__(self) -> int:
        if self.n_samples is None:
            raise TypeError("the synthetic training stream is unbounded")
        return self.n_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        ids = [self.tokenizer.bos_id]
        while len(ids) < self.seq_len + 1:
            ids += self.tokenizer.encode(synthetic_document(rng))
        ids = torch.tensor(ids[: self.seq_len + 1], dtype=torch.long)  # [S+1]
        return {"input_ids": ids[:-1], "labels": ids[1:]}
