"""The CPU scaling study: tables, fitted laws and plots from the four scaling sweeps.

    moe-vlm train -m sweep=scaling_dense      # then scaling_moe, granularity, experts
    python experiments/scaling_study.py --root multirun --out experiments/results

For each sweep found under ``--root`` it writes, in ``--out`` (names start with the sweep's):

- ``<sweep>.csv``: one row per run (status, swept keys, N, D, compute, losses, wall time);
- ``scaling_dense`` / ``scaling_moe``: ``_chinchilla.json`` (Chinchilla fit of the final
  held-out loss on N = active non-embedding parameters and D = training tokens, 95%
  bootstrap CIs), ``_chinchilla.png`` (loss against compute with the fit), ``_isoflop.json``
  / ``.png`` (IsoFLOP parabolas on the grid's anti-diagonals);
- ``scaling_moe_vs_dense.json`` / ``.png``: the two grids point by point (equal active
  compute), the tokens the dense model of the same active size needs for the MoE's loss
  (from the dense fit), and the best loss of each family per compute budget;
- ``granularity``: ``_krajewski.json`` (Krajewski et al.'s law in N, D, G) and ``_loss.png``;
- ``experts``: ``_clark.json`` (Clark et al.'s law in N, E at fixed D) and ``_loss.png``;
- ``scaling_study.md``: every table above in markdown (what the README quotes).

Everything is computed from the run directories; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_vlm.analysis.plots import plot_final_vs_key, plot_isoflop  # noqa: E402
from moe_vlm.analysis.results import collect_results  # noqa: E402
from moe_vlm.scaling import fit_chinchilla, fit_clark, fit_krajewski, isoflop_fit  # noqa: E402
from moe_vlm.train.rundir import atomic_write, write_json  # noqa: E402

N_COL, D_COL, LOSS = "params_active_nonembedding", "tokens_seen", "final_eval_loss"
COLUMNS = ["status", "model.d_model", "model.n_layers", "train.max_steps", "moe.n_experts",
           "moe.granularity", "routing.top_k", N_COL, "params_nonembedding", "params_active",
           "params_total", D_COL, "compute", "initial_eval_loss", LOSS, "final_train_loss",
           "wall_time_s"]
STUDIES = ("scaling_dense", "scaling_moe", "granularity", "experts")


def table(root: Path, study: str, out: Path) -> Optional[pd.DataFrame]:
    """The study's completed runs (all runs go to the CSV, failed ones too)."""
    if not (root / study).is_dir():
        print(f"{study}: no runs under {root / study}, skipped")
        return None
    t = collect_results(root / study)
    cols = [c for c in COLUMNS if c in t.columns]
    t = t[cols].sort_values([c for c in ("model.d_model", "moe.n_experts", "moe.granularity",
                                         "train.max_steps") if c in cols]).reset_index(drop=True)
    atomic_write(out / f"{study}.csv", lambda f: t.to_csv(f, index=False))
    done = t[t["status"] == "completed"]
    print(f"{study}: {len(done)}/{len(t)} runs completed, "
          f"{done['wall_time_s'].sum() / 60:.1f} min of training")
    return done


def ci_text(fit: Any, k: str, fmt: str = "{:.3g}") -> str:
    lo, hi = fit.ci[k]
    return f"{fmt.format(fit.params[k])} ({fmt.format(lo)} to {fmt.format(hi)})"


def ci_width(fit: Any, k: str) -> float:
    lo, hi = fit.ci[k]
    return hi - lo


def chinchilla(study: str, t: pd.DataFrame, out: Path, n_boot: int) -> Any:
    import matplotlib
    matplotlib.use("Agg")
    from moe_vlm.scaling.plots import plot_loss_vs_compute

    fit = fit_chinchilla(t[N_COL], t[D_COL], t[LOSS], n_bootstrap=n_boot)
    iso = isoflop_fit(t[N_COL], t[D_COL], t[LOSS], drop_invalid=True)
    write_json(out / f"{study}_chinchilla.json", {"N": N_COL, "D": D_COL, "loss": LOSS, **fit.to_dict()})
    write_json(out / f"{study}_isoflop.json", iso.to_dict())
    fig = plot_loss_vs_compute(t[N_COL], t[D_COL], t[LOSS], fit,
                               title=f"{study}: Chinchilla fit (alpha {fit.params['alpha']:.2f}, "
                                     f"beta {fit.params['beta']:.2f})")
    fig.savefig(out / f"{study}_chinchilla.png", dpi=110)
    plot_isoflop(t, out / f"{study}_isoflop.png")
    print(fit.summary())
    return fit, iso


def dense_tokens_for(fit: Any, n: float, loss: float) -> float:
    """Tokens D' at which the dense Chinchilla fit reaches ``loss`` with ``n`` parameters
    (inf when the fit's N term alone is above it)."""
    p = fit.params
    rest = loss - p["E"] - p["A"] / n ** p["alpha"]
    return float("inf") if rest <= 0 else float((p["B"] / rest) ** (1.0 / p["beta"]))


def envelope(t: pd.DataFrame, budgets: np.ndarray) -> list[Optional[float]]:
    """Best final loss among runs whose training compute is at most each budget."""
    c, loss = t["compute"].to_numpy(float), t[LOSS].to_numpy(float)
    return [float(loss[c <= b].min()) if (c <= b).any() else None for b in budgets]


def moe_vs_dense(dense: pd.DataFrame, moe: pd.DataFrame, dense_fit: Any, out: Path) -> dict[str, Any]:
    """Point by point (same width and steps: the same active compute), the tokens the dense
    model of the same active size would need for the MoE's loss (from the dense fit), and
    per compute budget the best loss of each family (the IsoFLOP envelope)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["model.d_model", "train.max_steps"]
    m = dense.merge(moe, on=keys, suffixes=("_dense", "_moe"))
    m["compute_ratio"] = m["compute_moe"] / m["compute_dense"]
    m["delta_loss"] = m[f"{LOSS}_moe"] - m[f"{LOSS}_dense"]
    m["token_multiplier"] = [dense_tokens_for(dense_fit, n, l) / d for n, l, d in
                             zip(m[f"{N_COL}_dense"], m[f"{LOSS}_moe"], m[f"{D_COL}_dense"])]
    budgets = np.geomspace(min(dense["compute"].min(), moe["compute"].min()),
                           max(dense["compute"].max(), moe["compute"].max()), 8)
    env = [{"compute": float(b), "dense": ld, "moe": lm}
           for b, ld, lm in zip(budgets, envelope(dense, budgets), envelope(moe, budgets))]
    rows = m[keys + [f"{N_COL}_dense", "params_total_moe", "compute_dense", "compute_ratio",
                     f"{LOSS}_dense", f"{LOSS}_moe", "delta_loss", "token_multiplier"]]
    finite = m["token_multiplier"].replace(np.inf, np.nan)
    report = {"points": json.loads(rows.replace(np.inf, np.nan).to_json(orient="records")),
              "mean_delta_loss": float(m["delta_loss"].mean()),
              "moe_better": int((m["delta_loss"] < 0).sum()), "n_points": int(len(m)),
              "median_token_multiplier": float(np.nanmedian(finite)), "envelope": env}
    write_json(out / "scaling_moe_vs_dense.json", report)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, t, colour in (("dense", dense, "tab:blue"), ("MoE, 8 experts top-1", moe, "tab:red")):
        ax.scatter(t["compute"], t[LOSS], s=16, color=colour, label=name)
        env_t = t.sort_values("compute")  # the best loss reached at or below each compute
        ax.plot(env_t["compute"], np.minimum.accumulate(env_t[LOSS].to_numpy()), "-",
                color=colour, alpha=0.6, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (active FLOPs)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("MoE against dense at equal active compute (lines: best loss so far)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling_moe_vs_dense.png", dpi=110)
    return report


def granularity(t: pd.DataFrame, out: Path, n_boot: int) -> Any:
    fit = fit_krajewski(t[N_COL], t[D_COL], t["moe.granularity"], t[LOSS], n_bootstrap=n_boot)
    write_json(out / "granularity_krajewski.json", {"N": N_COL, "D": D_COL, "G": "moe.granularity",
                                                      **fit.to_dict()})
    plot_final_vs_key(t.assign(status="completed"), "moe.granularity", out / "granularity_loss.png")
    print(fit.summary())
    return fit


def experts(t: pd.DataFrame, out: Path, n_boot: int) -> Any:
    fit = fit_clark(t[N_COL], t["moe.n_experts"], t[LOSS], n_bootstrap=n_boot)
    write_json(out / "experts_clark.json", {"N": N_COL, "E": "moe.n_experts", **fit.to_dict()})
    plot_final_vs_key(t.assign(status="completed"), "moe.n_experts", out / "experts_loss.png")
    print(fit.summary())
    return fit


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def fit_rows(fits: dict[str, Any], names: list[str]) -> str:
    rows = []
    for study, fit in fits.items():
        rows.append([study, fit.n_points] + [ci_text(fit, k) for k in names]
                    + [f"{fit.rmse:.4f}"])
    return md_table(["sweep", "runs"] + [f"{k} (95% CI)" for k in names] + ["rmse log L"], rows)


def pivot(t: pd.DataFrame, row: str, col: str) -> str:
    p = t.pivot_table(index=row, columns=col, values=LOSS)
    return md_table([f"{row} \\ {col}"] + [str(c) for c in p.columns],
                    [[str(i)] + [float(v) for v in r] for i, r in zip(p.index, p.to_numpy())])


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="multirun", help="where the sweeps wrote their runs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tabs = {s: table(root, s, out) for s in STUDIES}
    md = ["# CPU scaling study (generated by experiments/scaling_study.py)", ""]
    fits: dict[str, Any] = {}
    for s in ("scaling_dense", "scaling_moe"):
        if tabs[s] is not None and len(tabs[s]):
            fits[s], iso = chinchilla(s, tabs[s], out, args.bootstrap)
            md += [f"## {s}: final held-out loss (rows d_model, columns steps)", "",
                   pivot(tabs[s], "model.d_model", "train.max_steps"), ""]
            md += [f"IsoFLOP ({s}): N* ~ C^{iso.a:.3f}, D* ~ C^{iso.b:.3f} from "
                   f"{len(iso.budgets)} budgets", ""]
    if fits:
        md += ["## Chinchilla fits", "", fit_rows(fits, ["E", "A", "B", "alpha", "beta"]), "",
               "CI widths: " + "; ".join(f"{s}: alpha {ci_width(f, 'alpha'):.3g}, beta "
                                         f"{ci_width(f, 'beta'):.3g}" for s, f in fits.items()), ""]
    if "scaling_dense" in fits and tabs["scaling_moe"] is not None:
        r = moe_vs_dense(tabs["scaling_dense"], tabs["scaling_moe"], fits["scaling_dense"], out)
        md += ["## MoE against dense at equal active compute", "",
               md_table(["d_model", "steps", "N active", "N total (MoE)", "C active (dense)",
                         "C MoE / C dense", "loss dense", "loss MoE", "MoE - dense",
                         "dense tokens for the MoE loss"],
                        [[p["model.d_model"], p["train.max_steps"], p[f"{N_COL}_dense"],
                          p["params_total_moe"], p["compute_dense"], p["compute_ratio"],
                          p[f"{LOSS}_dense"], p[f"{LOSS}_moe"], p["delta_loss"],
                          float("nan") if p["token_multiplier"] is None else p["token_multiplier"]]
                         for p in r["points"]]), "",
               f"MoE lower on {r['moe_better']}/{r['n_points']} points; mean difference "
               f"{r['mean_delta_loss']:+.4f}; median dense-token multiplier "
               f"{r['median_token_multiplier']:.2f}x", "",
               "Best loss within each compute budget (IsoFLOP envelope):", "",
               md_table(["compute (FLOPs)", "dense", "MoE"],
                        [[e["compute"], float("nan") if e["dense"] is None else e["dense"],
                          float("nan") if e["moe"] is None else e["moe"]] for e in r["envelope"]]), ""]
    if tabs["granularity"] is not None and len(tabs["granularity"]):
        f = granularity(tabs["granularity"], out, args.bootstrap)
        md += ["## Granularity (Krajewski et al. 2024)", "",
               fit_rows({"granularity": f}, ["c", "a", "g", "gamma", "alpha", "b", "beta"]), ""]
        g = tabs["granularity"]
        for steps in sorted(g["train.max_steps"].unique()):
            md += [f"final loss at {steps} steps (rows d_model, columns G)", "",
                   pivot(g[g["train.max_steps"] == steps], "model.d_model", "moe.granularity"), ""]
    if tabs["experts"] is not None and len(tabs["experts"]):
        f = experts(tabs["experts"], out, args.bootstrap)
        md += ["## Number of experts (Clark et al. 2022)", "",
               fit_rows({"experts": f}, ["a", "b", "c", "d", "e_start", "e_max"]), "",
               pivot(tabs["experts"], "model.d_model", "moe.n_experts"), ""]
    atomic_write(out / "scaling_study.md", lambda fh: fh.write("\n".join(md) + "\n"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
