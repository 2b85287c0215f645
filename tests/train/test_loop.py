"""Training runs: run directory contents, loss falls, accumulation, NaN handling, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_vlm.model.decoder import DecoderLM
from moe_vlm.train import NonFiniteLossError, train
from moe_vlm.train.checkpoint import list_checkpoints
from moe_vlm.train.rundir import read_jsonl

SUMMARY_KEYS = {"status", "initial_eval_loss", "final_eval_loss", "final_train_loss",
                "params_total", "params_active", "flops_per_token", "tokens_seen", "steps",
                "wall_time_s"}


def _losses(run_dir):
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("grad_norm"))
            for r in read_jsonl(run_dir / "metrics.jsonl")]


def assert_same_losses(a, b, rel=1e-4):
    """Same steps and values. CPU GEMMs are not bitwise reproducible between two runs in
    one process (results depend on buffer alignment), so values match to ~1e-6."""
    assert [r[0] for r in a] == [r[0] for r in b]
    for ra, rb in zip(a, b):
        for u, v in zip(ra[1:], rb[1:]):
            assert (u is None) == (v is None), (ra, rb)
            if u is not None:
                assert u == pytest.approx(v, rel=rel, abs=1e-6), (ra, rb)


def test_run_directory_and_loss_falls(tiny_config):
    cfg = tiny_config("train.max_steps=30", "train.eval_every=15", "train.ckpt_every=10",
                      "train.log_every=5", "train.keep_checkpoints=2")
    run = cfg.run.dir
    s = train(cfg, run)
    from pathlib import Path
    run = Path(run)
    assert (run / "config.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert summary["tokens_seen"] == 30 * 4 * 32
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.0
    assert summary["params_active"] < summary["params_total"]
    assert [st for st, _ in list_checkpoints(run / "checkpoints")] == [20, 30]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 15, 30]
    row = rows[-1]
    assert {"lr", "grad_norm", "tokens_per_s", "routing_loss"} <= set(row)
    layer = row["routing"]["layer_0"]
    assert len(layer["tokens_per_expert"]) == 32  # 8 experts x granularity 4
    assert sum(layer["tokens_per_expert"]) == 4 * 32 * 4  # tokens x top_k(1 x 4)
    assert {"max_violation", "drop_frac", "entropy", "aux_loss", "z_loss"} <= set(layer)
    assert s["final_eval_loss"] == summary["final_eval_loss"]


def test_gradient_accumulation_matches_full_batch(tiny_config, tmp_path):
    # Token-weighted means are equal here because every sample has the same length and
    # the micro-batch scope aux loss is off (it is per micro-batch by definition).
    a = tiny_config("train.max_steps=3", "routing.aux_loss_coef=0", f"run.dir={tmp_path}/a",
                    "train.log_every=1")
    b = tiny_config("train.max_steps=3", "routing.aux_loss_coef=0", f"run.dir={tmp_path}/b",
                    "train.log_every=1", "train.micro_batch_size=2")
    train(a, a.run.dir)
    train(b, b.run.dir)
    assert_same_losses(_losses(tmp_path / "a"), _losses(tmp_path / "b"))


def test_stop_after_steps_then_resume_reproduces_losses(tiny_config, tmp_path):
    common = ["train.max_steps=12", "train.ckpt_every=4", "train.eval_every=6", "train.log_every=1",
              "routing=deepseek_v3"]  # includes the aux-free bias buffer in the resumed state
    full = tiny_config(*common, f"run.dir={tmp_path}/full")
    train(full, full.run.dir)
    part = tiny_config(*common, f"run.dir={tmp_path}/part", "train.stop_after_steps=5")
    s1 = train(part, part.run.dir)
    assert s1["status"] == "running" and s1["steps"] == 5
    rest = tiny_config(*common, f"run.dir={tmp_path}/part")
    s2 = train(rest, rest.run.dir)
    assert s2["status"] == "completed" and s2["resumed_from"] == 5
    assert_same_losses(_losses(tmp_path / "part"), _losses(tmp_path / "full"))
    full_sum = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert s2["final_eval_loss"] == pytest.approx(full_sum["final_eval_loss"], rel=1e-5)
    assert s2["tokens_seen"] == full_sum["tokens_seen"]
    end_full = torch.load(tmp_path / "full/checkpoints/step_00000012.pt", weights_only=False)
    end_part = torch.load(tmp_path / "part/checkpoints/step_00000012.pt", weights_only=False)
    assert end_part["model"]["layers.0.ffn.router.bias"].abs().sum() > 0
    for k, v in end_full["model"].items():
        torch.testing.assert_close(end_part["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_resume_ignores_metrics_written_after_the_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=6", "train.ckpt_every=3", "train.log_every=1",
                      "train.keep_checkpoints=5")
    train(cfg, cfg.run.dir)
    from pathlib import Path
    run = Path(cfg.run.dir)
    before = _losses(run)
    (run / "checkpoints" / "step_00000006.pt").unlink()  # as if killed between 3 and 6
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 123.0}\n{"step": 8, "lo')  # plus a torn line
    s = train(cfg, cfg.run.dir)
    assert s["resumed_from"] == 3
    assert_same_losses(_losses(run), before)


def _nan_after(monkeypatch, bad_steps):
    calls = {"n": 0}
    orig = DecoderLM.forward

    def forward(self, *a, **kw):
        out = orig(self, *a, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_steps:
                out.lm_loss = out.lm_loss * float("nan")
                out.loss = out.lm_loss + out.routing_loss
        return out

    monkeypatch.setattr(DecoderLM, "forward", forward)


def test_nan_stop_saves_state_and_fails_clearly(tiny_config, monkeypatch):
    cfg = tiny_config("train.max_steps=8", "train.ckpt_every=100")
    _nan_after(monkeypatch, {4})
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3.*nan_policy=skip"):
        train(cfg, cfg.run.dir)
    from pathlib import Path
    run = Path(cfg.run.dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3]
    state = torch.load(run / "checkpoints" / "step_00000003.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_skip_policy_skips_the_step(tiny_config, monkeypatch):
    cfg = tiny_config("train.max_steps=6", "train.nan_policy=skip", "train.log_every=1")
    _nan_after(monkeypatch, {2})
    s = train(cfg, cfg.run.dir)
    assert s["status"] == "completed" and s["skipped_steps"] == 1
    rows = [r for r in read_jsonl(__import__("pathlib").Path(cfg.run.dir) / "metrics.jsonl") if "loss" in r]
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, False]
    assert math.isfinite(s["final_eval_loss"])


def test_nan_skip_policy_gives_up(tiny_config, monkeypatch):
    cfg = tiny_config("train.max_steps=6", "train.nan_policy=skip", "train.max_skipped_steps=1")
    _nan_after(monkeypatch, {1, 2, 3})
    with pytest.raises(NonFiniteLossError, match="max_skipped_steps"):
        train(cfg, cfg.run.dir)


def test_completed_run_is_skipped_unless_more_steps_or_its_checkpoint_is_gone(tiny_config, tmp_path):
    from pathlib import Path

    from moe_vlm.train.loop import finished_summary
    cfg = tiny_config("train.max_steps=3", "train.eval_every=3")
    s = train(cfg, cfg.run.dir)
    run = Path(cfg.run.dir)
    assert finished_summary(run, 3) == s and finished_summary(run, 4) is None
    mtime = (run / "summary.json").stat().st_mtime_ns
    assert train(cfg, run) == s and (run / "summary.json").stat().st_mtime_ns == mtime
    (run / "checkpoints" / "step_00000003.pt").unlink()
    assert finished_summary(run, 3) is None


def test_deterministic_cuda_switches_and_restores(monkeypatch):
    """``train.deterministic`` (CUDA): the cuBLAS workspace, deterministic algorithms and
    no cuDNN autotuning, all restored afterwards (a multirun trains jobs in one process)."""
    from moe_vlm.train.loop import deterministic_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    deterministic_cuda(False)()
    assert not torch.are_deterministic_algorithms_enabled()
    restore = deterministic_cuda(True)
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        restore()
    assert not torch.are_deterministic_algorithms_enabled()


def test_tf32_sets_and_restores_the_matmul_precision():
    """``train.tf32`` (CUDA only) sets PyTorch's fp32 matmul precision, which cuBLAS and
    our Triton kernels read, for the run, and puts the previous one back."""
    from moe_vlm.train.loop import tf32_matmuls

    prev = torch.get_float32_matmul_precision()
    tf32_matmuls(False)()
    assert torch.get_float32_matmul_precision() == prev
    restore = tf32_matmuls(True)
    assert torch.get_float32_matmul_precision() == "high"
    restore()
    assert torch.get_float32_matmul_precision() == prev
