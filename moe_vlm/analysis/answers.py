"""Held-out answers you can look at: scenes, each question, the model's greedy answer and
the truth, as text and as a PNG grid (``moe-vlm show``).

The answers come from ``moe_vlm.train.evaluate_generated.generated_answers`` (KV-cached
greedy decoding), so a ✓ here is exactly a correct answer in the run's ``eval_accuracy``.

Legend: H, W image height/width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from moe_vlm.atomic import atomic_write
from moe_vlm.train.evaluate_generated import GeneratedAnswer

ASSISTANT = "\nASSISTANT:"


@dataclass(frozen=True)
class Shown:
    """One held-out sample: its image (None for text) and its answered questions."""

    sample: int
    image: Optional[np.ndarray]  # [H, W, 3] float in [0, 1]
    qa: list[tuple[str, str, str, bool]]  # (question, answer, truth, correct)


def last_question(prompt_text: str) -> str:
    """The question of a chat prompt: the text of its last user turn (``USER: q
    \\nASSISTANT:``), without image markers."""
    text = prompt_text
    if text.rstrip().endswith(ASSISTANT.strip()):
        text = text[:text.rstrip().rfind(ASSISTANT.strip())]
    user = text.rfind("USER:")
    q = text[user + len("USER:"):] if user >= 0 else text
    return " ".join(q.replace("<image>", " ").split())


def to_rgb(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised image [3, H, W] back to RGB [H, W, 3] in [0, 1]."""
    m = torch.tensor(list(mean), dtype=torch.float32)[:, None, None]
    s = torch.tensor(list(std), dtype=torch.float32)[:, None, None]
    return (pixels.float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def group_answers(answers: Sequence[GeneratedAnswer], samples: Sequence[dict],
                  decode, mean: Sequence[float] = (), std: Sequence[float] = ()) -> list[Shown]:
    """The answers grouped by sample, in order, with each sample's first image."""
    out: list[Shown] = []
    by_sample: dict[int, list[GeneratedAnswer]] = {}
    for a in answers:
        by_sample.setdefault(a.sample, []).append(a)
    for s, mine in by_sample.items():
        pix = samples[s].get("pixel_values")
        image = to_rgb(pix[0], mean, std) if pix is not None and len(pix) else None
        qa = [(last_question(decode(a.prompt)), a.generated_text, a.truth_text, a.correct)
              for a in sorted(mine, key=lambda a: a.answer)]
        out.append(Shown(s, image, qa))
    return out


def as_text(shown: Sequence[Shown]) -> str:
    """One block per sample: ``[ok]`` / ``[--]``, the question, the answer and the truth."""
    lines = []
    for sh in shown:
        lines.append(f"sample {sh.sample}")
        for q, ans, truth, ok in sh.qa:
            lines.append(f"  [{'ok' if ok else '--'}] {q}  ->  {ans!r}" + ("" if ok else f"  (truth {truth!r})"))
    return "\n".join(lines) + "\n"


def plot_grid(shown: Sequence[Shown], out: str | Path, cols: int = 4, title: str = "") -> Path:
    """A PNG grid: each cell a scene (enlarged) above its questions, the answer in green
    when right, red with the truth when wrong. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(shown)
    if n == 0:
        raise ValueError("nothing to show: no held-out sample with a question")
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sh in zip(axes.flat, shown):
        if sh.image is not None:  # square, in the cell's upper half
            img_ax = ax.inset_axes((0.2, 0.47, 0.6, 0.53))
            img_ax.imshow(sh.image, interpolation="nearest")
            img_ax.axis("off")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        y = 0.43
        for q, ans, truth, ok in sh.qa:
            q_text = _wrap(q, 44)
            ax.text(0, y, q_text, fontsize=7, va="top", family="monospace")
            y -= 0.06 * len(q_text.splitlines())
            a_text = _wrap(f"→ {ans}" if ok else f"→ {ans}  (truth: {truth})", 44)
            ax.text(0, y, a_text, fontsize=7.5, va="top", family="monospace",
                    color="tab:green" if ok else "tab:red", weight="bold")
            y -= 0.075 * len(a_text.splitlines())
        ax.set_title(f"sample {sh.sample}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return out


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))
