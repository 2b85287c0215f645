"""Refit the Step Law (optimal lr and batch size against N and D) on the runs the paper's
authors released, and compare with the published law.

    python experiments/steplaw_refit.py [STEPLAW_DATA_DIR] [--out experiments/results]

STEPLAW_DATA_DIR holds ``dense_lr_bs_loss.csv`` and ``moe_lr_bs_loss.csv`` from
``step-law/steplaw`` (default: ``../shared/data/steplaw`` beside the repo). As in the
paper: the loss is the smoothed final loss, the batch size is in tokens
(sequences x sequence length), runs within 0.25% of their (N, D) group's best are kept.
The released MoE runs share one total N (2.15e9; they vary the sparsity), so total N
cannot identify lr_N there: they are fitted with N = active parameters too.
Writes ``steplaw_released_refit.json`` (every fit's parameters, CIs and the paper's law).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pandas as pd

from moe_vlm.scaling.step_law import LI_2025, PARAMS, fit_step_law


def tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    dense = pd.read_csv(data_dir / "dense_lr_bs_loss.csv")
    moe = pd.read_csv(data_dir / "moe_lr_bs_loss.csv")

    def table(df: pd.DataFrame, n: str, seq: pd.Series | int) -> pd.DataFrame:
        return pd.DataFrame({"N": df[n], "D": df["D"], "lr": df["lr"], "bs": df["bs"] * seq,
                             "loss": df["smooth loss"]})

    return {"dense (N)": table(dense, "N", 2048),
            "moe (N = total)": table(moe, "N", moe["seq_len"]),
            "moe (N = active)": table(moe, "Na", moe["seq_len"])}


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", nargs="?", default=str(repo.parent / "shared" / "data" / "steplaw"))
    ap.add_argument("--out", default=str(repo / "experiments" / "results"))
    ap.add_argument("--bootstrap", type=int, default=1000)
    a = ap.parse_args()
    report = {"published": LI_2025, "source": "step-law/steplaw data/ (released subset)", "fits": {}}
    print(f"{'fit':>18}  " + "  ".join(f"{k:>22}" for k in PARAMS))
    print(f"{'Li 2025':>18}  " + "  ".join(f"{LI_2025[k]:>22.4g}" for k in PARAMS))
    for name, t in tables(Path(a.data_dir)).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = fit_step_law(t, n_bootstrap=a.bootstrap, seed=0)
        report["fits"][name] = {**fit.to_dict(), "warnings": [str(w.message) for w in caught]}
        cells = [f"{fit.params[k]:.4g} [{fit.ci[k][0]:.3g}, {fit.ci[k][1]:.3g}]" for k in PARAMS]
        print(f"{name:>18}  " + "  ".join(f"{c:>22}" for c in cells))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "steplaw_released_refit.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
