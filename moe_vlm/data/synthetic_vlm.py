"""Embedded synthetic image-text set: rendered scenes of coloured shapes, with captions
and question/answer pairs about them. Generated on the fly, deterministic per
(seed, split, index); nothing is downloaded.

A scene puts 1-3 shapes into distinct quadrants of an image: each has a kind (circle,
square, triangle), a colour (6), a size (small, big) and a position (the quadrant).
30% of the samples are captions ("a big red circle at the top left and ..."), the rest
ask 2-3 questions whose answers can only be read off the image: how many shapes, the colour
or kind at a position, the colour of a named kind, whether a coloured shape is present.
Chance accuracy per question is 1/(number of possible answers of its type), which is
what ``chance_accuracy`` averages over the eval questions.

Legend: H, W image height/width, P placeholder tokens per image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ["circle", "square", "triangle"]
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
          "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.2, 0.8), "white": (0.95, 0.95, 0.95)}
SIZES = ["small", "big"]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
COUNTS = ["one", "two", "three"]
CAPTION_FRAC = 0.3  # share of caption samples; the rest ask 2-3 questions
# Number of possible answers per question type, for the chance level.
N_OPTIONS = {"count": len(COUNTS), "color_at": len(COLORS), "kind_at": len(KINDS),
             "color_of": len(COLORS), "exists": 2}
QUESTION_TYPES = list(N_OPTIONS)  # ``answer_types`` codes: index into this list
# Overrides that give back the default job on this set as it was before issue 19 (one
# learning rate, no count curriculum, byte tokens, no tower pre-training), with which the
# recorded ablation tables of experiments/ were made; their scripts pin it (README "The
# default job").
OLD_DEFAULT_JOB = ["train.vision_lr_scale=1.0", "data.count_questions_after=0", "data.tokenizer=byte",
                   "data.vision_pretrain_steps=0"]


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    quadrant: int  # index into QUADRANTS


def random_scene(rng: random.Random) -> list[Shape]:
    n = rng.randint(1, 3)
    quads = rng.sample(range(4), n)
    return [Shape(rng.choice(KINDS), rng.choice(list(COLORS)), rng.choice(SIZES), q) for q in quads]


def render(scene: list[Shape], size: int, rng: random.Random) -> np.ndarray:
    """Float image [H, W, 3] in [0, 1]: dark noisy background, shapes filled in colour."""
    noise = np.random.default_rng(rng.getrandbits(32))
    img = 0.08 + 0.04 * noise.random((size, size, 3))  # [H, W, 3]
    half = size / 2
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # [H, W] pixel centres
    for s in scene:
        cy = half * (s.quadrant // 2) + half / 2 + rng.uniform(-0.08, 0.08) * half
        cx = half * (s.quadrant % 2) + half / 2 + rng.uniform(-0.08, 0.08) * half
        r = half * (0.42 if s.size == "big" else 0.22)
        dy, dx = yy - cy, xx - cx
        if s.kind == "circle":
            mask = dy ** 2 + dx ** 2 <= r ** 2
        elif s.kind == "square":
            mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
        else:  # upward triangle: apex at top, base at bottom
            mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        img[mask] = COLORS[s.color]
    return img.astype(np.float32)


def caption(scene: list[Shape]) -> str:
    parts = [f"a {s.size} {s.color} {s.kind} at the {QUADRANTS[s.quadrant]}"
             for s in sorted(scene, key=lambda s: s.quadrant)]
    return " and ".join(parts) + "."


def questions(scene: list[Shape], rng: random.Random, n: int,
              count: bool = True) -> list[tuple[str, str, str]]:
    """``n`` distinct (question type, question, answer) triples about the scene; without
    the "how many" question when ``count`` is false."""
    by_quad = {s.quadrant: s for s in scene}
    kinds = [s.kind for s in scene]
    pool: list[tuple[str, str, str]] = [("count", "how many shapes are there?", COUNTS[len(scene) - 1])]
    q = rng.choice(list(by_quad))
    pool.append(("color_at", f"what color is the shape at the {QUADRANTS[q]}?", by_quad[q].color))
    q = rng.choice(list(by_quad))
    pool.append(("kind_at", f"what shape is at the {QUADRANTS[q]}?", by_quad[q].kind))
    unique = [s for s in scene if kinds.count(s.kind) == 1]
    if unique:
        s = rng.choice(unique)
        pool.append(("color_of", f"what color is the {s.kind}?", s.color))
    color, kind = rng.choice(list(COLORS)), rng.choice(KINDS)
    if rng.random() < 0.5:  # ask about a present shape half the time
        s = rng.choice(scene)
        color, kind = s.color, s.kind
    present = any(s.color == color and s.kind == kind for s in scene)
    pool.append(("exists", f"is there a {color} {kind}?", "yes" if present else "no"))
    if not count:
        pool = [q for q in pool if q[0] != "count"]
    return rng.sample(pool, min(n, len(pool)))


def synthetic_vlm_row(seed: int, split: str, index: int,
                      count: bool = True) -> tuple[list[Shape], list[dict], list[str]]:
    """One LLaVA-style row: (scene, conversation turns, question types of the answers).

    ``split`` salts the generator, so train and eval scenes differ. ``count=False`` leaves
    the "how many" question out (the same scene; the other questions are drawn anew)."""
    rng = random.Random(f"vlm/{seed}/{split}/{index}")
    scene = random_scene(rng)
    if rng.random() < CAPTION_FRAC:
        turns = [{"from": "human", "value": "<image>\ndescribe the image."},
                 {"from": "gpt", "value": caption(scene)}]
        return scene, turns, []
    qs = questions(scene, rng, rng.randint(2, 3), count)
    turns = []
    for i, (_, q, a) in enumerate(qs):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        turns.append({"from": "gpt", "value": a})
    return scene, turns, [t for t, _, _ in qs]


def synthetic_vlm_corpus(seed: int, n_rows: int = 2000):
    """The training rows' conversation texts (template words included), for fitting a
    BPE tokenizer to the embedded image-text set."""
    for i in range(n_rows):
        for turn in synthetic_vlm_row(seed, "train", i)[1]:
            prefix = "USER: " if turn["from"] == "human" else "\nASSISTANT: "
            yield prefix + turn["value"].replace("<image>", "")


class SyntheticVLM:
    """Map-style source of image-text samples in the format of ``moe_vlm.data.sample``.

    ``render_turns(turns, n_images)`` is the chat template (token ids, labels, answer ids);
    samples longer than ``seq_len`` cannot occur with the default sizes and raise.
    ``count_after``: samples with a smaller index ask no "how many" questions
    (``data.count_questions_after``; the index is the global training sample, so the
    curriculum does not depend on micro-batching, the process layout or a resume)."""

    def __init__(self, seq_len: int, seed: int, split: str, image_size: int,
                 mean: list[float], std: list[float], render_turns, n_samples: int | None = None,
                 count_after: int = 0):
        self.seq_len, self.seed, self.split, self.n_samples = seq_len, seed, split, n_samples
        self.count_after = count_after
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.render_turns = render_turns

    def __len__(self) -> int:
        if self.n_samples is None:
            raise TypeError("the synthetic training stream is unbounded")
        return self.n_samples

    def _row(self, index: int) -> tuple[list[Shape], list[dict], list[str]]:
        return synthetic_vlm_row(self.seed, self.split, index, count=index >= self.count_after)

    def question_types(self, index: int) -> list[str]:
        return self._row(index)[2]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        scene, turns, qtypes = self._row(index)
        rng = random.Random(f"vlm-img/{self.seed}/{self.split}/{index}")
        img = torch.from_numpy(render(scene, self.image_size, rng)).permute(2, 0, 1)  # [3, H, W]
        pixels = ((img - self.mean) / self.std).unsqueeze(0)  # [1, 3, H, W]
        ids, labels, answer_ids = self.render_turns(turns, n_images=1)
        if not qtypes:  # a caption: scored by caption loss, not exact match
            answer_ids = [-1] * len(answer_ids)
        if len(ids) > self.seq_len:
            raise ValueError(f"synthetic sample {index} has {len(ids)} tokens > data.seq_len="
                             f"{self.seq_len}; raise data.seq_len")
        types = [QUESTION_TYPES.index(qtypes[a]) if a >= 0 else -1 for a in answer_ids]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "answer_ids": torch.tensor(answer_ids), "answer_types": torch.tensor(types),
                "pixel_values": pixels}


def chance_accuracy(question_types: list[str]) -> float:
    """Expected exact-match accuracy of uniform guessing among each type's answers."""
    if not question_types:
        return float("nan")
    return sum(1.0 / N_OPTIONS[t] for t in question_types) / len(question_types)
