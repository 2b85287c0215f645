"""Results table: every run directory becomes a row (failed, unfinished and crashed runs
included), config keys flattened, derived columns, CSV/Parquet output, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moe_vlm.commands.analysis import results_main
from moe_vlm.analysis.results import collect_results, flatten, varying_keys, write_table


def make_run(root: Path, name: str, status: str | None, g: int, loss: float = 1.0,
             metrics: list[dict] | None = None, torn: bool = False) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    cfg = {"seed": 0, "model": {"d_model": 64}, "moe": {"granularity": g, "n_experts": 4},
           "train": {"trainable": ["all"]}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"moe.granularity={g}"]))
    if status is not None:
        s = {"status": status, "steps": 10, "final_eval_loss": loss, "params_total": 1000,
             "params_active": 600, "params_embedding": 100, "flops_per_token": 3600,
             "tokens_seen": 5000, "config": cfg}
        if status == "failed":
            s["error"] = "RuntimeError: boom"
            del s["final_eval_loss"]
        (d / "summary.json").write_text(json.dumps(s))
    with open(d / "metrics.jsonl", "w") as f:
        for r in metrics or [{"step": 0, "eval_loss": 5.0}, {"step": 10, "loss": 2.0, "eval_loss": loss}]:
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write('{"step": 11, "lo')
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "g1", "completed", 1, 0.9)
    make_run(root, "g2", "completed", 2, 0.8)
    make_run(root, "g4", "failed", 4)
    make_run(root, "g8", None, 8, torn=True)  # killed before its first summary write
    (root / "g2" / "checkpoints").mkdir()
    return root


def test_every_run_is_a_row_with_its_status(sweep):
    df = collect_results(sweep)
    assert list(df["run"]) == ["g1", "g2", "g4", "g8"]
    assert list(df["status"]) == ["completed", "completed", "failed", "no_summary"]
    assert df.loc[df.run == "g4", "error"].item() == "RuntimeError: boom"
    assert df.loc[df.run == "g8", "last_logged_step"].item() == 10  # torn line skipped
    assert list(df["moe.granularity"]) == [1, 2, 4, 8]  # from config.yaml, even without summary
    row = df[df.run == "g1"].iloc[0]
    assert row["params_nonembedding"] == 900 and row["params_active_nonembedding"] == 500
    assert row["compute"] == 3600 * 5000
    assert row["overrides"] == "moe.granularity=1"
    assert row["train.trainable"] == '["all"]'
    assert varying_keys(df) == ["moe.granularity"]


def test_root_that_is_a_run_and_missing_root(tmp_path):
    d = make_run(tmp_path, "one", "completed", 1)
    assert list(collect_results(d)["run"]) == ["."]
    with pytest.raises(FileNotFoundError):
        collect_results(tmp_path / "nope")
    assert collect_results(tmp_path / "one" / ".hydra").empty


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_table_round_trip(sweep, tmp_path, suffix):
    df = collect_results(sweep)
    out = write_table(df, tmp_path / f"t{suffix}")
    back = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(back["status"]) == list(df["status"]) and len(back.columns) == len(df.columns)
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        write_table(df, tmp_path / "t.xlsx")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": "[1, 2]", "e": None}


def test_results_command(sweep, tmp_path, capsys):
    results_main([str(sweep), "--out", str(tmp_path / "t.csv")])
    out = capsys.readouterr().out
    assert "4 runs: 2 completed, 1 failed, 1 no_summary" in out and "moe.granularity" in out
    assert len(pd.read_csv(tmp_path / "t.csv")) == 4
    with pytest.raises(SystemExit):
        results_main([str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err
