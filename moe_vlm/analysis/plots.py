"""Sweep plots (matplotlib, PNG): loss curves, final loss vs a swept key, expert load,
IsoFLOP profiles. Each reads run directories or a results table (``results.py``), so the
same figures come from ``moe-vlm plot`` and from notebooks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from moe_vlm.analysis.modality import routing_counts
from moe_vlm.analysis.results import collect_results, varying_keys
from moe_vlm.train.rundir import read_jsonl


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: str | Path) -> Path:
    from moe_vlm.atomic import atomic_write

    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), mode="wb")
    _plt().close(fig)
    return out


def drop_invalid(table: pd.DataFrame) -> pd.DataFrame:
    """The table without ``invalid`` rows (run directories whose files have the wrong
    shape; their ``error`` says why); how many were skipped goes to stderr."""
    if "status" not in table.columns:
        return table
    bad = table["status"] == "invalid"
    if bad.any():
        first = table[bad].iloc[0]
        print(f"skipped {int(bad.sum())} invalid run director{'y' if bad.sum() == 1 else 'ies'} "
              f"(first: {first['run']}: {first.get('error')}); `moe-vlm results` lists them",
              file=sys.stderr)
    return table[~bad]


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _label(row: pd.Series, keys: Sequence[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={row[k]}" for k in keys) if keys else str(row["run"])


def plot_loss_curves(root: str | Path, out: str | Path, metric: str = "eval_loss",
                     keys: Optional[Sequence[str]] = None) -> Path:
    """One line per run under ``root``: ``metric`` (``eval_loss``, ``loss``, ...) against
    step, labelled by the swept config keys (or ``keys``)."""
    root = Path(root)
    df = collect_results(root)
    if df.empty:
        raise ValueError(f"{root}: no run directories found")
    df = drop_invalid(df)
    keys = list(keys) if keys is not None else varying_keys(df)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for _, row in df.iterrows():
        path = root / row["run"] / "metrics.jsonl"
        rows = read_jsonl(path) if path.is_file() else []
        pts = [(r["step"], r[metric]) for r in rows  # rows of the wrong shape are not drawn
               if isinstance(r, dict) and _is_number(r.get("step")) and _is_number(r.get(metric))]
        if not pts:
            continue
        steps, vals = zip(*pts)
        style = "-" if row["status"] == "completed" else ":"
        ax.plot(steps, vals, style, label=f"{_label(row, keys)} [{row['status']}]"
                if row["status"] != "completed" else _label(row, keys))
        drawn += 1
    if not drawn:
        raise ValueError(f"{root}: no run logged {metric!r}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    ax.set_title(f"{root.name}: {metric}")
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_final_vs_key(table: pd.DataFrame, key: str, out: str | Path,
                      metric: str = "final_eval_loss") -> Path:
    """``metric`` of completed runs against ``key``; one line per combination of the other
    swept keys. Failed runs are marked on the x axis with an x; invalid rows are skipped."""
    table = drop_invalid(table)
    for c in (key, metric, "status"):
        if c not in table.columns:
            raise ValueError(f"the table has no column {c!r}; columns are e.g. "
                             f"{', '.join(list(table.columns)[:12])}")
    others = [k for k in varying_keys(table) if k != key]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ok = table[table["status"] == "completed"]
    groups = ok.groupby(others, dropna=False) if others else [((), ok)]
    numeric = pd.api.types.is_numeric_dtype(table[key])
    for name, g in groups:
        g = g.sort_values(key) if numeric else g.sort_values(key, key=lambda v: v.astype(str))
        x = g[key] if numeric else g[key].astype(str)
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in
                          zip(others, name if isinstance(name, tuple) else (name,))) or None
        ax.plot(x, g[metric], "o-", label=label)
    bad = table[table["status"] != "completed"]
    if len(bad):
        ax.plot(bad[key] if numeric else bad[key].astype(str),
                [ok[metric].min() if len(ok) else 0] * len(bad), "rx", label="not completed")
    if numeric and ok[key].min() > 0 and ok[key].max() / max(ok[key].min(), 1e-12) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    if any(ax.get_legend_handles_labels()[1]):
        ax.legend(fontsize=7)
    return _save(fig, out)


def expert_load(run_dir: str | Path, last: Optional[int] = None) -> dict[str, np.ndarray]:
    """``{layer: fraction of assignments per expert [E]}`` summed over the logged steps;
    malformed routing rows are skipped and counted on stderr (``modality.routing_counts``)."""
    counts = routing_counts(run_dir, ("tokens_per_expert",), last, hint=" (a dense run?)")
    return {k: v[0] / max(v[0].sum(), 1e-12) for k, v in counts.items()}


def plot_expert_load(run_dir: str | Path, out: str | Path, last: Optional[int] = None) -> Path:
    """Heatmap, layers x experts, of each expert's share of the layer's assignments
    (uniform = 1/E); the title gives the worst layer's max/mean violation. Layers with
    fewer experts (a vision tower's MoE layers) are padded blank on the right."""
    load = expert_load(run_dir, last)
    width = max(len(v) for v in load.values())
    mat = np.full((len(load), width), np.nan)  # [L, E]
    for i, v in enumerate(load.values()):
        mat[i, :len(v)] = v
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, mat.shape[1] * 0.3 + 2), 0.5 * mat.shape[0] + 1.5))
    im = ax.imshow(mat, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(load)), list(load))
    ax.set_xlabel("expert")
    viol = max(float(v.max() * len(v) - 1) for v in load.values())
    ax.set_title(f"{Path(run_dir).name}: expert load share (max violation {viol:.2f})")
    fig.colorbar(im, ax=ax)
    return _save(fig, out)


def plot_isoflop(table: pd.DataFrame, out: str | Path, n_col: str = "params_active_nonembedding",
                 d_col: str = "tokens_seen", loss_col: str = "final_eval_loss",
                 rel_tol: float = 0.05) -> Path:
    """Loss against N for each compute budget C = 6 N D (runs within ``rel_tol`` of each
    other share a budget), with each profile's parabola in log N and its minimum."""
    from moe_vlm.scaling import isoflop_fit

    ok = drop_invalid(table)
    ok = ok[ok["status"] == "completed"]
    for c in (n_col, d_col, loss_col):
        if c not in ok.columns:
            raise ValueError(f"the table has no column {c!r}")
    n, d, loss = (ok[c].to_numpy(float) for c in (n_col, d_col, loss_col))
    fit = isoflop_fit(n, d, loss, rtol=rel_tol, drop_invalid=True)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g, flops in enumerate(fit.budgets):
        sel = fit.group == g  # the points of this budget
        order = np.argsort(n[sel])
        line, = ax.plot(n[sel][order], loss[sel][order], "o", label=f"C={flops:.2g}")
        coef = np.polyfit(np.log(n[sel]), loss[sel], 2)  # the profile's parabola in ln N
        grid = np.exp(np.linspace(np.log(n[sel].min()), np.log(n[sel].max()), 50))
        ax.plot(grid, np.polyval(coef, np.log(grid)), "-", color=line.get_color(), alpha=0.6)
        ax.plot([fit.n_opt[g]], [fit.loss_opt[g]], "*", color=line.get_color(), ms=12)
    ax.set_xscale("log")
    ax.set_xlabel(n_col)
    ax.set_ylabel(loss_col)
    ax.set_title(f"IsoFLOP profiles: N* ~ C^{fit.a:.2f}, D* ~ C^{fit.b:.2f}" if len(fit.budgets) > 1
                 else "IsoFLOP profile")
    ax.legend(fontsize=7)
    return _save(fig, out)


__all__ = ["drop_invalid", "expert_load", "plot_expert_load", "plot_final_vs_key",
           "plot_isoflop", "plot_loss_curves"]
