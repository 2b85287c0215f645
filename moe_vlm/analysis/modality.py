"""Expert load by modality: which experts image tokens and text tokens go to, per layer.

Reads ``metrics.jsonl`` of a VLM run (rows carry ``routing.layer_<i>.tokens_per_expert_image``
and ``..._text``), sums the logged steps (all, or the last N), and draws one heatmap row
pair per MoE layer: for each modality, the fraction of its tokens each expert received.
A vision tower's MoE layers (``routing.vision_layer_<i>``, image tokens only) come after
the decoder's where all loads are read (``analysis.plots.expert_load``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from moe_vlm.errors import DataError


def _is_count(x: Any) -> bool:
    """A finite number >= 0 (bools, NaN and inf are not counts)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < float("inf")


_PREFIXES = ("layer_", "vision_layer_")  # decoder layers, then vision blocks (V-MoE)


def layer_order(name: str) -> tuple[int, int] | None:
    """Where a ``routing`` key sorts: (0, i) for ``layer_<i>``, (1, i) for
    ``vision_layer_<i>``; None for anything else."""
    for rank, prefix in enumerate(_PREFIXES):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return rank, int(name[len(prefix):])
    return None


def _layer_counts(routing: Any, fields: Sequence[str]) -> dict[str, np.ndarray] | None:
    """``{layer: counts [len(fields), E]}`` of one row's ``routing`` object; None if a row
    has no layer with ``fields`` at all (e.g. a text-only row for the modality fields).
    Raises ValueError saying what is malformed."""
    if not isinstance(routing, dict) or not routing:
        raise ValueError(f"'routing' should be a non-empty object, got {type(routing).__name__}")
    out: dict[str, np.ndarray] = {}
    for layer, v in routing.items():
        if not (isinstance(layer, str) and layer_order(layer) is not None):
            raise ValueError(f"routing key {layer!r} is not layer_<index> or vision_layer_<index>")
        if not isinstance(v, dict):
            raise ValueError(f"routing.{layer} should be an object, got {type(v).__name__}")
        if not any(f in v for f in fields):
            continue
        counts = []
        for f in fields:
            c = v.get(f)
            if not (isinstance(c, list) and c and all(_is_count(x) for x in c)):
                raise ValueError(f"routing.{layer}.{f} should be a non-empty list of "
                                 f"non-negative counts, got {json.dumps(c)[:60]}")
            counts.append(c)
        if len({len(c) for c in counts}) > 1:
            raise ValueError(f"routing.{layer}: {', '.join(fields)} differ in length")
        out[layer] = np.asarray(counts, dtype=float)
    return out or None


def routing_counts(run_dir: str | Path, fields: Sequence[str], last: Optional[int] = None,
                   what: str = "routing", hint: str = "") -> dict[str, np.ndarray]:
    """``{layer: counts [len(fields), E]}`` summed over the usable ``metrics.jsonl`` rows
    of ``run_dir`` (the last ``last`` of them if given; 0 or None: all), layers in order.

    Rows without ``routing`` (eval rows) or without ``fields`` are not rows of this plot.
    Malformed rows (not an object, ``routing`` of the wrong shape, missing or non-numeric
    counts, an expert count that changes between rows) are skipped and counted on stderr,
    so one bad line does not hide a whole run; a torn last line (a killed run) is ignored
    silently. DataError when no usable row remains."""
    if last is not None and last < 0:
        raise ValueError(f"--last must be >= 0, got {last}")
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory?)")
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    rows: list[dict[str, np.ndarray]] = []
    experts: dict[str, int] = {}  # layer -> expert count of the first usable row
    bad: list[str] = []
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except ValueError:
            if n < len(lines):  # the last line may be torn by a kill; any other is corrupt
                bad.append(f"line {n}: not valid JSON")
            continue
        if not isinstance(r, dict):
            bad.append(f"line {n}: expected a JSON object, got {type(r).__name__}")
            continue
        if "routing" not in r:
            continue
        try:
            counts = _layer_counts(r["routing"], fields)
            for layer, c in (counts or {}).items():
                if experts.get(layer, c.shape[1]) != c.shape[1]:
                    raise ValueError(f"routing.{layer} has {c.shape[1]} experts, earlier "
                                     f"rows {experts[layer]}")
        except ValueError as e:
            bad.append(f"line {n}: {e}")
            continue
        if counts:
            experts.update({layer: c.shape[1] for layer, c in counts.items()})
            rows.append(counts)
    if not rows:
        raise DataError(f"{path}: has no {what} rows{hint}" if not bad else
                        f"{path}: has no usable {what} rows ({len(bad)} malformed, first: "
                        f"{bad[0]}){hint}")
    if bad:
        print(f"{path}: skipped {len(bad)} malformed row(s) (first: {bad[0]})", file=sys.stderr)
    out: dict[str, np.ndarray] = {}
    for r in rows[-last:] if last else rows:
        for layer, c in r.items():
            out[layer] = out.get(layer, 0) + c
    return dict(sorted(out.items(), key=lambda kv: layer_order(kv[0])))


def modality_load(run_dir: str | Path, last: Optional[int] = None) -> dict[str, np.ndarray]:
    """``{layer: array [2, E]}`` of image (row 0) and text (row 1) assignment counts,
    summed over the logged steps (the last ``last`` of them if given); malformed rows
    are skipped (see ``routing_counts``)."""
    return routing_counts(run_dir, ("tokens_per_expert_image", "tokens_per_expert_text"), last,
                          what="per-modality routing",
                          hint="; is this a vision-language MoE run?")


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
