"""A run SIGKILLed mid-training and restarted with the same command finishes with the
losses of an uninterrupted run (the contract in DESIGN.md: `moe-vlm train run.dir=...`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_vlm.train import train
from moe_vlm.train.checkpoint import list_checkpoints
from moe_vlm.train.rundir import read_jsonl

ARGS = ["vision=none", "data=synthetic_text", "train.lr=3e-3", "train.max_steps=60", "train.ckpt_every=5", "train.log_every=1", "train.eval_every=30",
        "train.batch_size=4", "data.seq_len=32", "data.n_eval_samples=8",
        "train.progress=false", "train.warmup_steps=2"]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "moe_vlm.train", *ARGS, f"run.dir={run_dir}"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(240)
def test_sigkill_then_rerun_matches_uninterrupted(tiny_config, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    try:
        while not list_checkpoints(run / "checkpoints"):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    killed_at = list_checkpoints(run / "checkpoints")[-1][0]
    assert killed_at < 60, "the run finished before it could be killed"

    done = subprocess.run(_cmd(run), env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "status: completed" in done.stdout
    import json
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == killed_at

    ref = tiny_config(*ARGS, f"run.dir={tmp_path / 'ref'}")
    train(ref, ref.run.dir)
    got = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_jsonl(run / "metrics.jsonl")]
    want = [(r["step"], r.get("loss"), r.get("eval_loss"))
            for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")]
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        for u, v in zip(g[1:], w[1:]):
            assert (u is None) == (v is None)
            if u is not None:
                assert u == pytest.approx(v, rel=1e-4, abs=1e-6), (g, w)
