"""Plots shared by the scaling notebooks and ``moe-vlm fit``: loss against compute with a
fitted law and its compute-optimal frontier, and observed against predicted loss.

matplotlib is imported inside the functions (the fits never need it); callers choose the
backend (the CLI uses Agg).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike

from moe_vlm.scaling.laws import chinchilla_loss
from moe_vlm.scaling.optimal import ParamsLike, chinchilla_form, compute_optimal


def plot_loss_vs_compute(N: ArrayLike, D: ArrayLike, loss: ArrayLike, fit: Optional[ParamsLike] = None, *,
                         G: Optional[float] = None, ax: Any = None, n_curves: int = 6,
                         frontier: bool = True, title: str = "", fit_label: str = "fit") -> Any:
    """Scatter of loss against compute ``C = 6 N D`` coloured by N; with ``fit`` (a
    Chinchilla-form law: FitResult, PublishedFit or dict; Krajewski with ``G``) also the
    law's loss-vs-compute curve for ``n_curves`` model sizes spanning the data and the
    compute-optimal frontier (:func:`compute_optimal`). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    N, D, loss = (np.asarray(x, dtype=float) for x in (N, D, loss))
    C = 6.0 * N * D                                              # [n]
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    else:
        fig = ax.figure
    norm = LogNorm(vmin=N.min(), vmax=max(N.max(), N.min() * 1.001))
    sc = ax.scatter(C, loss, c=N, cmap="viridis", norm=norm, s=18, edgecolors="k", linewidths=0.3,
                    label="runs", zorder=3)
    fig.colorbar(sc, ax=ax, label="parameters N")
    c_grid = np.geomspace(C.min() / 1.5, C.max() * 1.5, 200)    # [200]
    if fit is not None:
        p = chinchilla_form(fit, G)
        for n in np.geomspace(N.min(), N.max(), n_curves) if n_curves > 0 else []:
            ax.plot(c_grid, chinchilla_loss(n, c_grid / (6 * n), **p), color=plt.cm.viridis(norm(n)),
                    lw=1, alpha=0.8)
        if frontier:
            opt = compute_optimal(p, c_grid)
            ax.plot(c_grid, opt.loss, "k--", lw=1.5, label=f"{fit_label}: compute-optimal frontier")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6ND (FLOPs)")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_observed_vs_predicted(observed: ArrayLike, predicted: ArrayLike, *, ax: Any = None,
                               title: str = "", held_out: Optional[ArrayLike] = None) -> Any:
    """Observed against predicted loss with the y = x line; ``held_out`` (bool mask)
    marks points left out of the fit. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    obs, pred = np.asarray(observed, dtype=float), np.asarray(predicted, dtype=float)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
    else:
        fig = ax.figure
    held = np.zeros(obs.shape, dtype=bool) if held_out is None else np.asarray(held_out, dtype=bool)
    ax.scatter(pred[~held], obs[~held], s=16, label="fitted points")
    if held.any():
        ax.scatter(pred[held], obs[held], s=30, marker="x", color="C3", label="held out")
    lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("observed loss")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
