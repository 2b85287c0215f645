"""experiments/moe_methods.py's plumbing: placeholders, shared stages run once per seed,
finished stages skipped, and the per-study table's paired differences."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def mm(experiment_script):
    return experiment_script("moe_methods")


def _fake_run(calls: list, losses: dict):
    """A stage runner writing the files a finished run has, with a loss per stage."""
    def run(stage, d, dirs, seed, steps):
        calls.append((stage.name, seed, tuple(a for a in stage.args)))
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps({"status": "completed", "steps": steps,
                                                    "expert_bytes": 10.0 * seed}))
        loss = losses[stage.name] + 0.1 * seed
        (d / "metrics.jsonl").write_text(json.dumps({"step": steps, "eval_loss": loss}) + "\n")
    return run


def test_shared_stages_run_once_and_table_pairs_by_seed(mm, tmp_path, monkeypatch):
    study = mm.Study("t", "src", "base", {
        "base": (mm._train("dense", "a=1"), mm._train("moe", "init={dense}")),
        "x": (mm._train("dense", "a=1"), mm._train("moe_x", "init={dense}", "x=1")),
    }, steps=5, vlm=False, extra=("expert_bytes",))
    monkeypatch.setitem(mm.STUDIES, "t", study)
    calls: list = []
    monkeypatch.setattr(mm, "run_stage", _fake_run(calls, {"dense": 3.0, "moe": 2.0, "moe_x": 1.5}))
    rows = mm.run_study("t", [0, 1, 2], tmp_path)
    # the shared dense stage is handed to the runner per arm (it skips finished ones itself)
    assert [c[0] for c in calls if c[1] == 0] == ["dense", "moe", "dense", "moe_x"]
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, s) for a in ("base", "x") for s in range(3)}
    md = mm.table("t", rows)
    line = next(x for x in md.splitlines() if x.startswith("| x |"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[3] == "-0.500 ± 0.000 *"  # same-seed differences: no noise at all
    assert cells[4] == "10.000 ± 10.000"  # the summary key, per seed


def test_placeholders_and_finished_marks(mm, tmp_path):
    dirs = {"dense": tmp_path / "dense", "dense_big": tmp_path / "big"}
    assert mm._sub("--from {dense_big} s={seed} d={data_seed} {dense}", dirs, 2) == \
        f"--from {tmp_path / 'big'} s=2 d=1236 {tmp_path / 'dense'}"
    train, cmd = mm._train("x"), mm.Stage("g", "grow", ())
    d = tmp_path / "run"
    d.mkdir()
    assert not mm._finished(train, d) and not mm._finished(cmd, d)
    (d / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert not mm._finished(train, d)
    (d / "summary.json").write_text(json.dumps({"status": "completed"}))
    (d / ".done").write_text("")
    assert mm._finished(train, d) and mm._finished(cmd, d)
