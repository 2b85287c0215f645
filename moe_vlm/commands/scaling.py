"""``moe-vlm fit TABLE.csv --law {chinchilla,krajewski,clark,steplaw} [--out DIR] ...``

Reads a results table (one row per run, as ``moe-vlm results`` writes it), keeps the
completed runs, fits the law, prints parameters with bootstrap CIs and the fit quality,
and with ``--out`` writes ``fit_<law>.json`` and ``fit_<law>.png`` (observed against
predicted loss; for ``steplaw`` the near-optimal runs' lr and batch size against the
law's). Bad input (missing file or column, too few or degenerate points) exits with
status 2 and a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from moe_vlm.atomic import atomic_write

LAW_COLUMNS: dict[str, tuple[str, ...]] = {
    "chinchilla": ("n", "d"),
    "krajewski": ("n", "d", "g"),
    "clark": ("n", "e"),
    "steplaw": ("n", "d", "lr", "bs"),
}
"""Which of the ``--*-col`` inputs each law reads (besides the loss)."""


class FitCliError(ValueError):
    """A problem with the user's table or arguments (reported with exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-vlm fit",
                                 description="fit a scaling law to a results table (one row per run)")
    ap.add_argument("table", help="CSV table, e.g. from `moe-vlm results ROOT --out TABLE.csv`")
    ap.add_argument("--law", required=True, choices=sorted(LAW_COLUMNS))
    ap.add_argument("--out", default=None, help="directory for fit_<law>.json and fit_<law>.png")
    ap.add_argument("--n-col", default="params_active", help="parameters N (default params_active)")
    ap.add_argument("--d-col", default="tokens_seen", help="training tokens D")
    ap.add_argument("--loss-col", default="final_eval_loss", help="loss to fit")
    ap.add_argument("--g-col", default="moe.granularity", help="granularity G (krajewski)")
    ap.add_argument("--e-col", default="moe.n_experts", help="number of experts E (clark)")
    ap.add_argument("--lr-col", default="train.lr", help="peak learning rate (steplaw)")
    ap.add_argument("--bs-col", default=None,
                    help="batch size in tokens (steplaw; default train.batch_size x data.seq_len)")
    ap.add_argument("--threshold", type=float, default=0.0025,
                    help="steplaw: keep runs within this relative loss of their (N, D) best")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (0: no CIs)")
    ap.add_argument("--holdout", type=float, default=None, help="fraction of runs held out and scored")
    ap.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def load_table(path: str | Path, columns: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The completed rows' numeric ``columns`` (input name -> CSV column) as arrays ``[n]``,
    and row counts. Raises FitCliError naming what is missing or not numeric."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FitCliError(f"{path}: no such file")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FitCliError(f"{path}: not a readable CSV table ({e})") from None
    missing = [c for c in columns.values() if c not in df.columns]
    if missing:
        raise FitCliError(f"{path}: missing column(s) {missing}; the table has {list(df.columns)}")
    counts = {"rows": len(df)}
    if "status" in df.columns:
        df = df[df["status"].astype(str) == "completed"]
    counts["completed"] = len(df)
    if df.empty:
        raise FitCliError(f"{path}: no completed runs (status == 'completed') to fit")
    out = {}
    for name, col in columns.items():
        v = pd.to_numeric(df[col], errors="coerce")
        bad = v.index[v.isna() | ~np.isfinite(v.astype(float))]
        if len(bad):
            raise FitCliError(f"{path}: column {col!r} has {len(bad)} missing or non-numeric value(s) "
                              f"among completed runs (first at data row {bad[0]}, counting from 0)")
        out[name] = v.to_numpy(dtype=float)
    return out, counts


def run_fit(a: argparse.Namespace) -> dict[str, Any]:
    """Fit as the parsed arguments say; print the summary, write outputs; return the JSON dict."""
    from moe_vlm.scaling import fit_chinchilla, fit_clark, fit_krajewski

    flags = {"n": a.n_col, "d": a.d_col, "g": a.g_col, "e": a.e_col, "lr": a.lr_col, "bs": a.bs_col}
    columns = {k: flags[k] for k in LAW_COLUMNS[a.law]} | {"loss": a.loss_col}
    if a.law == "steplaw":
        return _run_step_law(a, columns)
    data, counts = load_table(a.table, columns)
    kw = dict(n_bootstrap=a.bootstrap, ci=a.ci, holdout=a.holdout, seed=a.seed)
    if a.law == "chinchilla":
        res = fit_chinchilla(data["n"], data["d"], data["loss"], **kw)
    elif a.law == "krajewski":
        res = fit_krajewski(data["n"], data["d"], data["g"], data["loss"], **kw)
    else:
        res = fit_clark(data["n"], data["e"], data["loss"], **kw)
    print(f"{a.table}: {counts['completed']} completed of {counts['rows']} rows")
    print(res.summary())
    report = {**res.to_dict(), "table": str(a.table), "columns": columns,
              "n_rows": counts["rows"], "n_completed": counts["completed"]}
    if a.out is not None:
        _write_outputs(a, report, lambda fh: _plot(res, data, fh))
    return report


def _write_outputs(a: argparse.Namespace, report: dict[str, Any], plot: Callable[[Any], None]) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"fit_{a.law}.json", out / f"fit_{a.law}.png"

    def dump(fh: Any) -> None:
        json.dump(report, fh, indent=2, allow_nan=False)
        fh.write("\n")

    atomic_write(json_path, dump)
    atomic_write(png_path, plot, mode="wb")
    print(f"wrote {json_path} and {png_path}")


def _run_step_law(a: argparse.Namespace, columns: dict[str, Any]) -> dict[str, Any]:
    """``--law steplaw``: the table's (N, D, lr, bs in tokens, loss) -> ``fit_step_law``.
    Without ``--bs-col`` the batch in tokens is ``train.batch_size x data.seq_len``."""
    import pandas as pd

    from moe_vlm.scaling.step_law import fit_step_law

    if a.holdout is not None:
        raise FitCliError("--holdout is not used by --law steplaw (its fit is a linear "
                          "regression on the near-optimal runs)")
    if a.bs_col is None:
        columns = {k: v for k, v in columns.items() if k != "bs"} | {
            "batch": "train.batch_size", "seq": "data.seq_len"}
    data, counts = load_table(a.table, columns)
    bs = data["bs"] if "bs" in data else data["batch"] * data["seq"]
    table = pd.DataFrame({"N": data["n"], "D": data["d"], "lr": data["lr"], "bs": bs,
                          "loss": data["loss"]})
    res = fit_step_law(table, threshold=a.threshold, n_bootstrap=a.bootstrap, ci=a.ci, seed=a.seed)
    print(f"{a.table}: {counts['completed']} completed of {counts['rows']} rows")
    print(res.summary())
    report = {**res.to_dict(), "table": str(a.table), "columns": columns,
              "n_rows": counts["rows"], "n_completed": counts["completed"]}
    if a.out is not None:
        _write_outputs(a, report, lambda fh: _plot_step_law(res, fh))
    return report


def _plot_step_law(res: Any, fh: Any) -> None:
    """Near-optimal runs' lr and batch size (observed) against the fitted law's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = res.kept
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, obs, pred, name in ((axes[0], k["lr"], res.lr(k["N"], k["D"]), "learning rate"),
                                (axes[1], k["bs"], res.bs(k["D"]), "batch size (tokens)")):
        ax.scatter(pred, obs, s=12, alpha=0.6)
        lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xscale="log", yscale="log", xlabel=f"law's optimal {name}",
               ylabel=f"near-optimal runs' {name}")
    fig.suptitle(f"Step Law fit on {res.n_kept} near-optimal runs of {res.n_runs}")
    fig.tight_layout()
    fig.savefig(fh, dpi=120, format="png")
    plt.close(fig)


def _plot(res: Any, data: dict[str, np.ndarray], fh: Any) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_vlm.scaling.plots import plot_observed_vs_predicted

    inputs = [data[k.lower()] for k in res.inputs]
    fig = plot_observed_vs_predicted(data["loss"], res.predict(*inputs), held_out=res.holdout_mask,
                                     title=f"{res.law}: rmse(log L) {res.rmse:.3g}")
    fig.savefig(fh, dpi=120, format="png")
    plt.close(fig)


def fit_main(args: Sequence[str]) -> None:
    """``moe-vlm fit TABLE.csv --law {chinchilla,krajewski,clark,steplaw} [--out DIR] ...``."""
    a = _parser().parse_args(list(args))
    try:
        run_fit(a)
    except (FitCliError, ValueError, OSError) as e:
        print(f"moe-vlm fit: {e}", file=sys.stderr)
        raise SystemExit(2) from None
