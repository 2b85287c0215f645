"""Step Law fit (optimal lr and batch size against N and D): recovers a known law from a
synthetic grid of runs, keeps exactly the near-optimal runs, refuses what it cannot fit,
and runs from a results table through ``moe-vlm fit --law steplaw``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moe_vlm.scaling import LI_2025, fit_step_law, near_optimal
from moe_vlm.commands.scaling import fit_main

TRUE = {"lr_scale": 3.0, "lr_N": -0.6, "lr_D": 0.25, "bs_scale": 0.8, "bs_D": 0.55}


def synthetic_runs(seed: int = 0, noise: float = 2e-4) -> pd.DataFrame:
    """A grid of runs per (N, D): loss is a bowl in (log lr, log bs) around the true law's
    optimum, scaled by a Chinchilla-like base loss, plus relative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for N in (1e7, 4e7, 1.6e8, 6.4e8):
        for D in (1e9, 4e9, 1.6e10, 6.4e10):
            lr_opt = TRUE["lr_scale"] * N ** TRUE["lr_N"] * D ** TRUE["lr_D"]
            bs_opt = TRUE["bs_scale"] * D ** TRUE["bs_D"]
            base = 1.7 + 400 / N ** 0.34 + 410 / D ** 0.28
            for dl in np.linspace(-1.5, 1.5, 31):
                for db in np.linspace(-1.5, 1.5, 31):
                    loss = base * (1 + 0.02 * dl ** 2 + 0.01 * db ** 2) * (1 + noise * rng.standard_normal())
                    rows.append((N, D, lr_opt * np.exp(dl), bs_opt * np.exp(db), loss))
    return pd.DataFrame(rows, columns=["N", "D", "lr", "bs", "loss"])


def test_recovers_a_known_law():
    fit = fit_step_law(synthetic_runs(), n_bootstrap=200, seed=1)
    for k in ("lr_N", "lr_D", "bs_D"):
        assert fit.params[k] == pytest.approx(TRUE[k], abs=0.02), (k, fit.params)
        lo, hi = fit.ci[k]
        assert lo <= TRUE[k] <= hi, (k, fit.ci[k])
    for k in ("lr_scale", "bs_scale"):
        assert fit.params[k] == pytest.approx(TRUE[k], rel=0.3), (k, fit.params)
    assert fit.n_groups == 16 and fit.n_bootstrap == 200
    N, D = 2e8, 3e10
    assert fit.lr(N, D) == pytest.approx(TRUE["lr_scale"] * N ** -0.6 * D ** 0.25, rel=0.1)
    assert fit.bs(D) == pytest.approx(TRUE["bs_scale"] * D ** 0.55, rel=0.1)
    d = fit.to_dict()
    assert d["published"] == LI_2025 and set(d["params"]) == set(TRUE)
    assert "lr_N" in fit.summary() and "Li 2025" in fit.summary()


def test_same_seed_same_fit():
    a = fit_step_law(synthetic_runs(), n_bootstrap=50, seed=3)
    b = fit_step_law(synthetic_runs(), n_bootstrap=50, seed=3)
    assert a.to_dict() == b.to_dict()


def test_near_optimal_keeps_runs_within_the_threshold_of_their_group():
    t = pd.DataFrame({"N": [1, 1, 1, 2, 2], "D": [5, 5, 5, 5, 5], "lr": [1, 2, 3, 1, 2],
                      "bs": [1, 1, 1, 1, 1], "loss": [2.0, 2.004, 2.006, 3.0, 3.0075]})
    kept = near_optimal(t, threshold=0.0025)
    assert kept[["N", "lr"]].values.tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert kept["rel_gap"].max() <= 0.0025


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.drop(columns="bs"), "missing ['bs']"),
    (lambda t: t.assign(lr=t["lr"].where(t.index != 3, 0.0)), "'lr' must be > 0"),
    (lambda t: t.assign(loss=t["loss"].where(t.index != 5, np.nan)), "'loss' has 1 missing"),
    (lambda t: t.assign(D=1e9), "too few (N, D) points"),
])
def test_refuses_what_it_cannot_fit(edit, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        fit_step_law(edit(synthetic_runs()), n_bootstrap=0)


def test_warns_when_a_size_barely_varies():
    t = synthetic_runs()
    t = t[t["N"] <= 1e7 * 1.01].assign(N=lambda x: x["N"] * (1 + 0.001 * (x["D"] > 2e9)))
    with pytest.warns(UserWarning, match="N spans only a factor"):
        fit_step_law(t, n_bootstrap=0)


def test_cli_on_a_results_table(tmp_path, capsys):
    runs = synthetic_runs()
    seq = 1024
    table = pd.DataFrame({"status": "completed", "params_active": runs["N"], "tokens_seen": runs["D"],
                          "train.lr": runs["lr"], "train.batch_size": runs["bs"] / seq,
                          "data.seq_len": seq, "final_eval_loss": runs["loss"]})
    table.loc[0, "status"] = "failed"
    path = tmp_path / "steplaw.csv"
    table.to_csv(path, index=False)
    fit_main([str(path), "--law", "steplaw", "--bootstrap", "50", "--out", str(tmp_path / "fit")])
    report = json.loads((tmp_path / "fit" / "fit_steplaw.json").read_text())
    assert report["params"]["lr_N"] == pytest.approx(TRUE["lr_N"], abs=0.02)
    assert report["n_completed"] == len(table) - 1
    assert (tmp_path / "fit" / "fit_steplaw.png").stat().st_size > 0
    assert "steplaw fit on" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        fit_main([str(path), "--law", "steplaw", "--holdout", "0.2"])
    assert e.value.code == 2 and "--holdout is not used" in capsys.readouterr().err
