"""The Chinchilla data points Besiroglu et al. (2024) extracted from Hoffmann et al.'s Fig. 4."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CHINCHILLA_CSV = Path(__file__).parent / "data" / "chinchilla_svg_extracted_data.csv"
"""The packaged copy (see ``data/README.md`` for its source and columns)."""


def load_chinchilla_data(drop_highest_loss: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N, D, loss)``, each ``[n]``: parameters, tokens ``D = FLOP / (6 N)``, final loss.

    245 points. ``drop_highest_loss=5`` leaves out the five highest-loss runs, as Besiroglu
    et al. do for their main fit (240 points remain). Needs only numpy (no pandas).
    """
    with open(CHINCHILLA_CSV, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))                                   # 245 rows
    N = np.array([float(r["Model Size"]) for r in rows])
    flop = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    D = flop / (6.0 * N)
    if not 0 <= drop_highest_loss < loss.size:
        raise ValueError(f"drop_highest_loss must be in [0, {loss.size}), got {drop_highest_loss}")
    if drop_highest_loss:
        keep = np.sort(np.argsort(loss, kind="stable")[: loss.size - drop_highest_loss])
        N, D, loss = N[keep], D[keep], loss[keep]
    return N, D, loss
