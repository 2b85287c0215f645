"""Expert load by modality: which experts image tokens and text tokens go to, per layer.

Reads ``metrics.jsonl`` of a VLM run (rows carry ``routing.layer_<i>.tokens_per_expert_image``
and ``..._text``), sums the logged steps (all, or the last N), and draws one heatmap row
pair per MoE layer: for each modality, the fraction of its tokens each expert received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from moe_vlm.train.rundir import read_jsonl


def modality_load(run_dir: str | Path, last: Optional[int] = None) -> dict[str, np.ndarray]:
    """``{layer: array [2, E]}`` of image (row 0) and text (row 1) assignment counts,
    summed over the logged steps (the last ``last`` of them if given)."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "routing" in r]
    rows = [r for r in rows if any("tokens_per_expert_image" in v for v in r["routing"].values())]
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl has no per-modality routing rows; "
                         "is this a vision-language MoE run?")
    if last is not None:
        rows = rows[-last:]
    out: dict[str, np.ndarray] = {}
    for r in rows:
        for layer, v in r["routing"].items():
            counts = np.array([v["tokens_per_expert_image"], v["tokens_per_expert_text"]])
            out[layer] = out.get(layer, 0) + counts
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("_")[-1])))


def plot_modality_heatmap(run_dir: str | Path, out: Optional[str | Path] = None,
                          last: Optional[int] = None) -> Path:
    """Write a per-layer expert x modality heatmap PNG (default ``RUN_DIR/modality_routing.png``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = modality_load(run_dir, last)
    layers = list(load)
    n_exp = max(v.shape[1] for v in load.values())
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, 0.25 * n_exp + 2), 1.1 * len(layers) + 1),
                             squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        c = load[layer].astype(float)
        frac = c / np.maximum(c.sum(1, keepdims=True), 1)  # share of each modality's tokens
        im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks([0, 1], ["image", "text"])
        ax.set_ylabel(layer, rotation=0, ha="right", va="center")
        ax.set_xticks(range(c.shape[1]) if c.shape[1] <= 32 else [])
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("expert")
    fig.suptitle("share of each modality's tokens routed to each expert")
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "modality_routing.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
