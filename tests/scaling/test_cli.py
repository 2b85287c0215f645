"""``moe-vlm fit`` through ``fit_main``: tables in, summary out, JSON + PNG written
atomically, status 2 with a message for bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moe_vlm.scaling import BESIROGLU_2024, chinchilla_loss, clark_loss, krajewski_loss
from moe_vlm.commands.scaling import fit_main


def _table(path, law="chinchilla", failed=True, seed=0):
    rng = np.random.default_rng(seed)
    N, D, G = (a.ravel() for a in np.meshgrid(np.geomspace(2e7, 2e9, 4), np.geomspace(1e9, 1e11, 3),
                                              [1.0, 2.0, 4.0], indexing="ij"))
    E = 8 * G
    if law == "krajewski":
        loss = krajewski_loss(N, D, G, c=1.6, a=300.0, b=900.0, g=250.0, alpha=0.33, beta=0.3, gamma=0.55)
    elif law == "clark":
        loss = clark_loss(N, E, a=-0.08, b=-0.1, c=0.008, d=1.1, e_start=1.85, e_max=300.0)
    else:
        loss = chinchilla_loss(N, D, **BESIROGLU_2024.params)
    loss = loss * np.exp(rng.normal(0, 0.002, N.size))
    df = pd.DataFrame({"run": [f"r{i}" for i in range(N.size)], "status": "completed", "params_active": N,
                       "params_total": N * 3, "tokens_seen": D, "final_eval_loss": loss,
                       "moe.granularity": G, "moe.n_experts": E})
    if failed:  # a crashed run: no loss; must be filtered out, not fitted
        df.loc[len(df)] = {"run": "bad", "status": "failed", "params_active": 1e8, "params_total": 3e8,
                           "tokens_seen": 1e9, "final_eval_loss": np.nan, "moe.granularity": 1.0, "moe.n_experts": 8.0}
    df.to_csv(path, index=False)
    return df


@pytest.mark.parametrize("law", ["chinchilla", "krajewski", "clark"])
def test_fit_writes_json_and_png(tmp_path, capsys, law):
    _table(tmp_path / "t.csv", law)
    out = tmp_path / "out"
    fit_main([str(tmp_path / "t.csv"), "--law", law, "--out", str(out), "--bootstrap", "20"])
    text = capsys.readouterr().out
    assert "36 completed of 37 rows" in text and "ci low" in text and f"{law} fit on 36 points" in text
    report = json.loads((out / f"fit_{law}.json").read_text())
    assert report["law"] == law and report["n_points"] == 36 and report["n_bootstrap"] == 20
    assert report["n_rows"] == 37 and report["n_completed"] == 36
    for k, (lo, hi) in report["ci"].items():
        assert lo <= report["params"][k] <= hi
    assert (out / f"fit_{law}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [f"fit_{law}.json", f"fit_{law}.png"]  # no temp files left


def test_fit_options_columns_and_holdout(tmp_path, capsys):
    _table(tmp_path / "t.csv", "krajewski")
    fit_main([str(tmp_path / "t.csv"), "--law", "krajewski", "--n-col", "params_total", "--bootstrap", "0",
              "--holdout", "0.25", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "fit_krajewski.json").read_text())
    assert report["columns"]["n"] == "params_total" and report["n_points"] == 27 and report["n_held_out"] == 9
    assert report["held_out_error"] > 0 and report["ci"]["c"] == [None, None]
    assert "held-out rmse" in capsys.readouterr().out


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--law", "chinchilla"], "no such file"),
    ("ok", ["--law", "chinchilla", "--d-col", "tokens"], "missing column(s) ['tokens']"),
    ("all_failed", ["--law", "chinchilla"], "no completed runs"),
    ("gap", ["--law", "chinchilla"], "column 'final_eval_loss' has 1 missing or non-numeric value(s)"),
    ("ok", ["--law", "krajewski", "--g-col", "moe.n_experts", "--e-col", "x"], None),  # G = 8,16,32: fine
    ("one_g", ["--law", "krajewski"], "all G are identical"),
    ("tiny", ["--law", "chinchilla"], "at least 6 points; got 3"),
])
def test_bad_input_exits_2_with_message(tmp_path, capsys, setup, args, message):
    path = tmp_path / "t.csv"
    if setup is not None:
        df = _table(path, failed=False)
        if setup == "all_failed":
            df.assign(status="failed").to_csv(path, index=False)
        elif setup == "gap":
            df.loc[4, "final_eval_loss"] = np.nan
            df.to_csv(path, index=False)
        elif setup == "one_g":
            df.assign(**{"moe.granularity": 2.0}).to_csv(path, index=False)
        elif setup == "tiny":
            df.head(3).to_csv(path, index=False)
    if message is None:
        fit_main([str(path), *args, "--bootstrap", "0"])
        return
    with pytest.raises(SystemExit) as e:
        fit_main([str(path), *args, "--bootstrap", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-vlm fit: ") and message in err, err


def test_unknown_law_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        fit_main([str(tmp_path / "t.csv"), "--law", "kaplan"])
    assert e.value.code == 2
