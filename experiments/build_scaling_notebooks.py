"""Write the scaling-law notebooks (outputs cleared) from the cell sources below.

    python experiments/build_scaling_notebooks.py

Edit here, rebuild, commit both this file and the .ipynb files. The notebooks only call
``moe_vlm.scaling`` (no law math inline) and read their settings from the environment:
``MOE_VLM_NB_OUT`` (where PNGs go; default a temp dir), ``MOE_VLM_NB_BOOTSTRAP``
(bootstrap replicates; default 200) and, for ``scaling_fit.ipynb``, ``MOE_VLM_TABLE``
(a results CSV; without it a clearly labelled synthetic table is used).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

OUT = Path(os.environ.get("MOE_VLM_NB_OUT") or Path(tempfile.gettempdir()) / "moe_vlm_notebooks")
OUT.mkdir(parents=True, exist_ok=True)
N_BOOTSTRAP = int(os.environ.get("MOE_VLM_NB_BOOTSTRAP", "200"))
SEED = 0
print(f"figures -> {OUT}; {N_BOOTSTRAP} bootstrap replicates")'''

REFIT = [
    new_markdown_cell("""\
# Chinchilla Approach 3, refit as Besiroglu et al. (2024)

Hoffmann et al. (2022) fit $L(N, D) = E + A/N^\\alpha + B/D^\\beta$ to their training runs.
Besiroglu, Erdil, Barnett and You (2024, *Chinchilla Scaling: A replication attempt*,
arXiv:2404.10102) reconstructed 245 of those runs from the SVG of the paper's Figure 4,
dropped the five highest-loss ones and refit: Huber loss ($\\delta = 10^{-3}$) on
$\\log L$, L-BFGS from a 4,500-point grid, bootstrap standard errors. This notebook
repeats that fit with `moe_vlm.scaling.fit_chinchilla` and sets our estimates beside theirs.

Settings (environment): `MOE_VLM_NB_OUT` (figures), `MOE_VLM_NB_BOOTSTRAP` (replicates;
they used 4,000)."""),
    new_code_cell(SETUP + '''

from moe_vlm.scaling import (BESIROGLU_2024, HOFFMANN_2022, compute_optimal, fit_chinchilla,
                             load_chinchilla_data)
from moe_vlm.scaling.plots import plot_loss_vs_compute'''),
    new_markdown_cell("## Data: 245 runs, the five highest-loss left out (240 remain)"),
    new_code_cell('''\
N_all, D_all, L_all = load_chinchilla_data()
N, D, L = load_chinchilla_data(drop_highest_loss=5)
left_out = np.zeros(L_all.size, dtype=bool)
left_out[np.argsort(L_all)[-5:]] = True                 # the same five load_chinchilla_data drops
print(f"{L_all.size} runs; fitting {L.size}; left out (highest loss):")
pd.DataFrame({"N": N_all[left_out], "D": D_all[left_out], "loss": L_all[left_out]})'''),
    new_markdown_cell("## Fit"),
    new_code_cell('''\
fit = fit_chinchilla(N, D, L, n_bootstrap=N_BOOTSTRAP, seed=SEED)
print(fit.summary())'''),
    new_markdown_cell("""\
## Ours beside theirs

Their paper gives standard errors (from 4,000 bootstrap replicates); the `±1.96 SE`
columns turn them into symmetric normal intervals for a like-for-like look at our
percentile intervals."""),
    new_code_cell('''\
theirs = BESIROGLU_2024
their_ci = theirs.ci(fit.ci_level)
table = pd.DataFrame({
    "ours": fit.params,
    "ours ci low": {k: v[0] for k, v in fit.ci.items()},
    "ours ci high": {k: v[1] for k, v in fit.ci.items()},
    "Besiroglu 2024": dict(theirs.params),
    "their SE": dict(theirs.se),
    "their -1.96 SE": {k: v[0] for k, v in their_ci.items()},
    "their +1.96 SE": {k: v[1] for k, v in their_ci.items()},
    "Hoffmann 2022": dict(HOFFMANN_2022.params),
})
table["ours / theirs - 1"] = table["ours"] / table["Besiroglu 2024"] - 1
table.to_csv(OUT / "chinchilla_refit_params.csv")
with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 200):
    print(table)'''),
    new_markdown_cell("## Loss against compute, the fitted law and its compute-optimal frontier"),
    new_code_cell('''\
fig = plot_loss_vs_compute(N, D, L, fit, title="Chinchilla data (Besiroglu et al. extraction), our refit",
                           fit_label="our fit")
ax = fig.axes[0]
C = np.geomspace((6 * N * D).min() / 1.5, (6 * N * D).max() * 1.5, 200)
ax.plot(C, compute_optimal(theirs, C).loss, ":", color="C3", lw=1.5, label="Besiroglu 2024 frontier")
ax.scatter(6 * N_all[left_out] * D_all[left_out], L_all[left_out], marker="x", color="C3", label="left out")
ax.set_ylim(top=min(4.0, L_all.max() * 1.05))
ax.legend(loc="upper right", fontsize=8)
fig.savefig(OUT / "chinchilla_loss_vs_compute.png", dpi=120, bbox_inches="tight")
plt.show()'''),
    new_markdown_cell("""\
## Compute-optimal allocation

$N^*(C) = G (C/6)^{\\beta/(\\alpha+\\beta)}$, $D^* = C / (6 N^*)$ with
$G = (\\alpha A / (\\beta B))^{1/(\\alpha+\\beta)}$. The band is the bootstrap range of our
$N^*$ (same CI level), from the refit replicates."""),
    new_code_cell('''\
C = np.geomspace(1e18, 1e26, 60)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
laws = [("ours", fit, "-"), ("Besiroglu 2024", theirs, ":"), ("Hoffmann 2022", HOFFMANN_2022, "--")]
for name, params, style in laws:
    opt = compute_optimal(params, C)
    ax1.loglog(C, opt.N, style, label=name)
    ax2.semilogx(C, opt.D / opt.N, style, label=name)
if fit.bootstrap:
    boot = np.array([compute_optimal({k: v[i] for k, v in fit.bootstrap.items()}, C).N
                     for i in range(len(fit.bootstrap["E"]))])          # [replicates, len(C)]
    q = 50 * np.array([1 - fit.ci_level, 1 + fit.ci_level])
    lo, hi = np.percentile(boot, q, axis=0)
    ax1.fill_between(C, lo, hi, alpha=0.2, label=f"ours, {fit.ci_level:.0%} bootstrap band")
ax1.set(xlabel="compute C (FLOPs)", ylabel="compute-optimal parameters N*")
ax2.set(xlabel="compute C (FLOPs)", ylabel="tokens per parameter D*/N*")
ax1.legend(fontsize=8); ax2.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "chinchilla_compute_optimal.png", dpi=120, bbox_inches="tight")
plt.show()

C_chinchilla = 5.76e23   # Chinchilla's training budget (Hoffmann et al.)
for name, params, _ in laws:
    opt = compute_optimal(params, C_chinchilla)
    print(f"{name:15s} N* {float(opt.N):.3g}  D* {float(opt.D):.3g}  D*/N* {float(opt.D / opt.N):.1f}")'''),
    new_code_cell('''\
written = sorted(p.name for p in OUT.glob("chinchilla_*"))
print("wrote", written)'''),
]

FIT = [
    new_markdown_cell("""\
# Scaling-law fits for a sweep

Reads a results table (`moe-vlm results ROOT --out TABLE.csv`; path in `MOE_VLM_TABLE`),
keeps the completed runs and fits what the data supports with `moe_vlm.scaling`:

- **Chinchilla** (Hoffmann et al. 2022) $L = E + A/N^\\alpha + B/D^\\beta$, whenever N and D vary;
- **Krajewski** et al. (2024) $L = c + (g/G^\\gamma + a)/N^\\alpha + b/D^\\beta$ when the granularity G varies;
- **Clark** et al. (2022) routed-model law in N and the expert count E when E varies;
- **IsoFLOP** profiles (Hoffmann et al.'s Approach 2) when a compute budget has at least 3 runs.

Without `MOE_VLM_TABLE` it runs on a small **synthetic** table drawn from the Chinchilla law.
Other settings: `MOE_VLM_NB_OUT` (figures), `MOE_VLM_NB_BOOTSTRAP` (replicates)."""),
    new_code_cell('''\
# Which columns hold N, D, the loss, G and E. Use params_active_nonembedding for N to match
# Chinchilla's convention (non-embedding parameters), params_total for total MoE parameters.
N_COL = "params_active"
D_COL = "tokens_seen"
LOSS_COL = "final_eval_loss"
G_COL = "moe.granularity"
E_COL = "moe.n_experts"
ISO_RTOL = 0.25   # runs whose compute 6ND agrees within this factor form one budget'''),
    new_code_cell(SETUP + '''

from moe_vlm.scaling import (BESIROGLU_2024, chinchilla_loss, compute_optimal, fit_chinchilla, fit_clark,
                             fit_krajewski, isoflop_fit)
from moe_vlm.scaling.plots import plot_loss_vs_compute, plot_observed_vs_predicted'''),
    new_markdown_cell("## The table"),
    new_code_cell('''\
TABLE = os.environ.get("MOE_VLM_TABLE")
SYNTHETIC = not TABLE
if SYNTHETIC:
    # IsoFLOP-style grid: 4 budgets x 5 model sizes around each budget's optimum, loss from
    # the Chinchilla law with Besiroglu et al.'s parameters times 0.5% log-normal noise.
    rng = np.random.default_rng(SEED)
    rows = []
    for C in [1e18, 4e18, 1.6e19, 6.4e19]:
        n_star = float(compute_optimal(BESIROGLU_2024, C).N)
        for n in n_star * np.array([0.25, 0.5, 1.0, 2.0, 4.0]):
            d = C / (6 * n)
            rows.append({N_COL: n, D_COL: d, LOSS_COL: float(chinchilla_loss(n, d, **BESIROGLU_2024.params))
                         * float(np.exp(rng.normal(0, 0.005))), G_COL: 1, E_COL: 1, "status": "completed"})
    rows.append({N_COL: 1e8, D_COL: 1e9, LOSS_COL: float("nan"), G_COL: 1, E_COL: 1, "status": "failed"})
    table = pd.DataFrame(rows)
    SOURCE = "SYNTHETIC table (Chinchilla law, Besiroglu et al. parameters, 0.5% noise)"
else:
    table = pd.read_csv(TABLE)
    SOURCE = f"{Path(TABLE).name}"
print(SOURCE, f"- {len(table)} rows")
if "status" in table.columns:
    print(table["status"].value_counts().to_string())
    table = table[table["status"] == "completed"].reset_index(drop=True)
print(f"{len(table)} completed runs")
table.head()'''),
    new_code_cell('''\
def column(name):
    """A numeric column of the completed runs, or None if the table lacks it or has gaps."""
    if name not in table.columns:
        return None
    v = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=float)
    return v if np.all(np.isfinite(v)) else None

N, D, L = column(N_COL), column(D_COL), column(LOSS_COL)
G, E = column(G_COL), column(E_COL)
assert N is not None and D is not None and L is not None, f"need numeric {N_COL}, {D_COL}, {LOSS_COL}"
print(f"distinct N: {np.unique(N).size}, D: {np.unique(D).size}, "
      f"G: {None if G is None else np.unique(G).tolist()}, E: {None if E is None else np.unique(E).tolist()}")'''),
    new_markdown_cell("## Fits (a law is skipped, with the reason, when the data cannot identify it)"),
    new_code_cell('''\
fits = {}

def try_fit(name, fn, *args):
    try:
        fits[name] = fn(*args, n_bootstrap=N_BOOTSTRAP, seed=SEED)
        print(fits[name].summary(), end="\\n\\n")
    except ValueError as e:
        print(f"{name}: skipped ({e})\\n")

try_fit("chinchilla", fit_chinchilla, N, D, L)
if G is not None and np.unique(G).size > 1:
    try_fit("krajewski", fit_krajewski, N, D, G, L)
else:
    print("krajewski: skipped (granularity does not vary)")
if E is not None and np.unique(E).size > 1:
    try_fit("clark", fit_clark, N, E, L)
else:
    print("clark: skipped (expert count does not vary)")'''),
    new_markdown_cell("## IsoFLOP profiles (Approach 2)"),
    new_code_cell('''\
try:
    iso = isoflop_fit(N, D, L, rtol=ISO_RTOL, drop_invalid=True)
except ValueError as e:
    iso = None
    print(f"isoflop: skipped ({e})")
if iso is not None:
    print(pd.DataFrame({"budget C": iso.budgets, "runs": iso.n_points, "N*": iso.n_opt, "D*": iso.d_opt,
                        "loss*": iso.loss_opt, "vertex inside sampled N": iso.in_range}).to_string(index=False))
    for budget, why in iso.dropped:
        print("dropped:", why)
    print(f"N* ~ C^{iso.a:.3f}, D* ~ C^{iso.b:.3f}")
    if "chinchilla" in fits:
        p = fits["chinchilla"].params
        print(f"Chinchilla fit implies N* ~ C^{p['beta'] / (p['alpha'] + p['beta']):.3f}, "
              f"D* ~ C^{p['alpha'] / (p['alpha'] + p['beta']):.3f}")'''),
    new_markdown_cell("## Loss against compute C = 6ND, with the fitted law and the compute-optimal frontier"),
    new_code_cell('''\
law = fits.get("chinchilla")
fig = plot_loss_vs_compute(N, D, L, law, title=SOURCE, fit_label="Chinchilla fit")
ax = fig.axes[0]
if iso is not None:
    ax.scatter(iso.budgets, iso.loss_opt, marker="*", s=120, color="C3", zorder=4, label="IsoFLOP minima")
    ax.legend(loc="upper right", fontsize=8)
fig.savefig(OUT / "scaling_loss_vs_compute.png", dpi=120, bbox_inches="tight")
plt.show()'''),
    new_code_cell('''\
inputs = {"N": N, "D": D, "G": G, "E": E}
if fits:
    fig, axes = plt.subplots(1, len(fits), figsize=(4.5 * len(fits), 4.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], fits.items()):
        pred = res.predict(*(inputs[k] for k in res.inputs))
        plot_observed_vs_predicted(L, pred, ax=ax, title=f"{name}: rmse(log L) {res.rmse:.3g}")
    fig.suptitle(SOURCE, fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "scaling_observed_vs_predicted.png", dpi=120, bbox_inches="tight")
    plt.show()'''),
    new_code_cell('''\
import json

report = {"source": SOURCE, "synthetic": SYNTHETIC, "fits": {k: v.to_dict() for k, v in fits.items()},
          "isoflop": None if iso is None else iso.to_dict()}
(OUT / "scaling_fits.json").write_text(json.dumps(report, indent=1))
print("wrote", sorted(p.name for p in OUT.glob("scaling_*")))'''),
]


def build(cells: list, path: Path) -> None:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    build(REFIT, HERE / "chinchilla_refit.ipynb")
    build(FIT, HERE / "scaling_fit.ipynb")
