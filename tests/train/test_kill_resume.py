"""A run SIGKILLed mid-training and restarted with the same command finishes with exactly
the losses, metrics and weights of an uninterrupted run, and two runs of the same command
are bit-identical (the contract in DESIGN.md: `moe-vlm train run.dir=...`). The job is the
image-text default at a smaller batch: variable-length samples, padding, MoE layers with
repeated token gathers (whose backward once summed in a thread-dependent order)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.train import train
from moe_vlm.train.checkpoint import list_checkpoints
from moe_vlm.train.rundir import read_jsonl

ARGS = ["train.max_steps=40", "train.ckpt_every=5", "train.log_every=1", "train.eval_every=20",
        "train.batch_size=8", "data.n_eval_samples=16", "train.progress=false",
        "train.warmup_steps=2", "data.vision_pretrain_steps=20"]  # a resume must not redo it
TIMING = {"tokens_per_s"}  # wall-clock fields: the only ones allowed to differ


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "moe_vlm.train", *ARGS, f"run.dir={run_dir}"]


THREADS = 2  # results are bit-identical at a given thread count (float sums split by thread)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1"}


def train_here(cfg) -> None:
    """Train in this process at the subprocesses' thread count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        train(cfg, cfg.run.dir)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.timeout(240)
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
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
    assert killed_at < 40, "the run finished before it could be killed"

    done = subprocess.run(_cmd(run), env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "status: completed" in done.stdout
    import json
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == killed_at

    train_here(load_config([*ARGS, f"run.dir={tmp_path / 'ref'}"]))
    assert_same_run(run, tmp_path / "ref")


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "metrics.jsonl")]


def assert_same_run(got: Path, want: Path) -> None:
    """Every logged number (losses, grad norms, eval, routing metrics) and every final
    weight bit-identical."""
    a, b = _rows(got), _rows(want)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra == rb, (ra["step"], ra, rb)
    last = list_checkpoints(want / "checkpoints")[-1][1]
    wa = torch.load(list_checkpoints(got / "checkpoints")[-1][1], weights_only=False)["model"]
    wb = torch.load(last, weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for key in wb:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.timeout(240)
def test_same_command_twice_is_bit_identical(tmp_path):
    for name in ("a", "b"):
        train_here(load_config([*ARGS, "train.max_steps=25", "train.eval_every=25",
                                f"run.dir={tmp_path / name}"]))
    assert_same_run(tmp_path / "a", tmp_path / "b")
