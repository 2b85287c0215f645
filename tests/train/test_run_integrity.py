"""Nothing lost, nothing run from a shared file: checksummed checkpoints, quarantine,
rotation, the run-directory lock, resume config checks, torn metrics rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_vlm.errors import CheckpointError, ConfigError, RunDirError
from moe_vlm.train import train
from moe_vlm.train.checkpoint import (checksum_path, list_checkpoints, load_latest, load_weights,
                                      quarantined, read_checkpoint, save_checkpoint)
from moe_vlm.train.rundir import MetricsLog, RunDirLock, clean_stale_temporaries, read_jsonl


class Payload:
    """Unpickling this runs code: it writes the file named in ``MARK``."""

    def __reduce__(self):
        return (Path(os.environ["MARK"]).write_text, ("ran",))


def plant(path: Path, mark: Path, monkeypatch) -> None:
    """A checkpoint-shaped file whose unpickling would create ``mark``."""
    monkeypatch.setenv("MARK", str(mark))
    torch.save({"model": {}, "step": 99, "x": Payload()}, path)


def garble(path: Path, frac: float, n: int = 4096) -> None:
    b = bytearray(path.read_bytes())
    at = int(len(b) * frac)
    b[at:at + n] = os.urandom(min(n, len(b) - at))
    path.write_bytes(bytes(b))


def ckpt(step: int) -> dict:
    return {"model": {"w": torch.full((8,), float(step))}, "step": step}


def test_save_is_verified_and_weights_only(tmp_path):
    p = save_checkpoint(tmp_path, 3, ckpt(3), keep=2)
    import hashlib
    assert checksum_path(p).read_text() == f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
    torch.load(p, weights_only=True)  # loadable without unpickling code
    assert read_checkpoint(p)["step"] == 3
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "step_00000009.pt")


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9, "truncate"])
def test_damaged_newest_is_quarantined_and_older_used(tmp_path, frac):
    for s in (1, 2):
        save_checkpoint(tmp_path, s, ckpt(s), keep=3)
    newest = tmp_path / "step_00000002.pt"
    if frac == "truncate":
        newest.write_bytes(newest.read_bytes()[:100])
    else:
        garble(newest, frac)
    with pytest.warns(UserWarning, match="step_00000002.pt: (checksum mismatch|unreadable)"):
        path, state = load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "step_00000001.pt"
    assert [p.name for p in quarantined(tmp_path)][0] == "step_00000002.pt.bad"  # renamed, kept


def test_planted_checkpoint_never_runs(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, ckpt(1), keep=3)
    mark = tmp_path / "ran"
    plant(tmp_path / "step_00000005.pt", mark, monkeypatch)
    with pytest.warns(UserWarning, match="trust_checkpoint"):
        path, _ = load_latest(tmp_path)
    assert path.name == "step_00000001.pt" and not mark.exists()
    assert (tmp_path / "step_00000005.pt").exists()  # untrusted is skipped, not moved
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="train.init_from: no usable"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "step_00000005.pt")
    assert not mark.exists()
    # Only an explicit trust unpickles it (the legacy path).
    with pytest.warns(UserWarning, match="trusted by the user"):
        read_checkpoint(tmp_path / "step_00000005.pt", trust=True)
    assert mark.exists()


def test_rotation_keeps_newest_and_never_the_file_just_written(tmp_path):
    for s in (10, 20, 30):
        save_checkpoint(tmp_path, s, ckpt(s), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    # A save at an older step (a resume from an older checkpoint) deletes nothing newer.
    save_checkpoint(tmp_path, 5, ckpt(5), keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 20, 30]
    save_checkpoint(tmp_path, 40, ckpt(40), keep=None)  # a failure's save: no rotation
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 20, 30, 40]
    sums = sorted(p.name for p in tmp_path.glob("*.sha256"))  # deleted with their checkpoints
    assert sums == [f"step_{s:08d}.pt.sha256" for s in (5, 20, 30, 40)]


def test_torn_metrics_line_keeps_later_rows(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2, "lo\n[3]\n{"step": 3}\n\xff\n{"step": 4}\n')
    assert [r["step"] for r in read_jsonl(p)] == [1, 3, 4]
    MetricsLog(p, resume_step=3)
    assert [r["step"] for r in read_jsonl(p)] == [1, 3]


def test_lock_names_the_holder_and_stale_temporaries_go(tmp_path):
    held = RunDirLock(tmp_path)
    held.acquire()
    try:
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    finally:
        held.release()
    RunDirLock(tmp_path).acquire()  # released (a killed holder releases too)
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".summary.json.abc.tmp", tmp_path / "checkpoints" / ".step_00000001.pt.x.tmp"]
    for p in stale:
        p.write_text("x")
    assert sorted(clean_stale_temporaries(tmp_path)) == sorted(stale)


def test_second_process_on_a_run_dir_stops(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=2")
    run = Path(cfg.run.dir)
    run.mkdir(parents=True)
    code = ("import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT); "
            "fcntl.flock(fd,fcntl.LOCK_EX); os.write(fd,b'pid 4242 on other'); print('held',flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(RunDirError, match="in use by pid 4242 on other"):
            train(cfg, run)
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_resume_refuses_changed_config_unless_allowed(tiny_config):
    base = ["train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2"]
    cfg = tiny_config(*base, "train.stop_after_steps=2")
    run = Path(cfg.run.dir)
    train(cfg, run)
    before = {p: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")}
    for change, key in [("train.lr=1e-3", "train.lr"), ("model.d_model=32", "model.d_model"),
                        ("routing.gate=sigmoid_topk", "routing.gate"),
                        ("data.seed=7", "data.seed"), ("train.trainable=[moe]", "train.trainable")]:
        with pytest.raises(ConfigError, match=f"{key}: .* -> .*train.allow_changes=\\[{key}"):
            train(tiny_config(*base, change), run)
        assert {p: p.read_bytes() for p in before} == before  # nothing rewritten
    # Cadence and stopping point are free; an allowed change is applied and recorded.
    s = train(tiny_config(*base, "train.weight_decay=0.05", "train.beta2=0.9",
                          "train.allow_changes=[train.weight_decay,train.beta2]",
                          "train.log_every=1"), run)
    assert s["status"] == "completed"
    changed = {c["key"]: (c["from"], c["to"], c["at_step"]) for c in s["changed_on_resume"]}
    assert changed == {"train.weight_decay": (0.1, 0.05, 2), "train.beta2": (0.95, 0.9, 2)}
    opt = torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=True)["optimizer"]
    assert opt["param_groups"][0]["weight_decay"] == 0.05  # really applied, not the saved 0.1
    assert opt["param_groups"][0]["betas"][1] == 0.9


def test_completed_run_with_another_config_is_refused_not_skipped(tiny_config):
    cfg = tiny_config("train.max_steps=2")
    train(cfg, cfg.run.dir)
    with pytest.raises(ConfigError, match="routing.gate"):
        train(tiny_config("train.max_steps=2", "routing.gate=sigmoid_topk"), cfg.run.dir)
    assert train(tiny_config("train.max_steps=2", "train.log_every=1"), cfg.run.dir)["steps"] == 2


def test_run_with_only_damaged_checkpoints_refuses_to_start_over(tiny_config):
    cfg = tiny_config("train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2",
                      "train.stop_after_steps=4")
    run = Path(cfg.run.dir)
    train(tiny_config("train.max_steps=6", "train.ckpt_every=2", "train.eval_every=2",
                      "train.stop_after_steps=4", "train.keep_checkpoints=1"), run)
    rows = read_jsonl(run / "metrics.jsonl")
    for _, p in list_checkpoints(run / "checkpoints"):
        garble(p, 0.5)
    with pytest.warns(UserWarning, match="moved to step_00000004.pt.bad"):
        with pytest.raises(RunDirError, match="none usable"):
            train(tiny_config("train.max_steps=6", "train.ckpt_every=2", "train.eval_every=2",
                              "train.keep_checkpoints=1"), run)
    with pytest.raises(RunDirError, match="none usable"):  # and again: the .bad files stay
        train(tiny_config("train.max_steps=6", "train.ckpt_every=2", "train.eval_every=2",
                          "train.keep_checkpoints=1"), run)
    assert read_jsonl(run / "metrics.jsonl") == rows  # no row lost
    assert (run / "checkpoints" / "step_00000004.pt.bad").exists()


def test_planted_checkpoint_in_a_run_dir_does_not_run(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2",
                      "train.stop_after_steps=2")
    run = Path(cfg.run.dir)
    train(cfg, run)
    mark = tmp_path / "ran"
    plant(run / "checkpoints" / "step_00000003.pt", mark, monkeypatch)
    with pytest.warns(UserWarning, match="step_00000003.pt: holds Python objects"):
        s = train(tiny_config("train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2"), run)
    assert s["resumed_from"] == 2 and s["status"] == "completed" and not mark.exists()


def test_full_disk_during_a_save_says_so_and_resumes(tiny_config, monkeypatch):
    import errno

    import moe_vlm.train.loop as loop

    cfg = tiny_config("train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2")
    run = Path(cfg.run.dir)
    real = loop.save_checkpoint

    def full_at_4(ckpt_dir, step, state, keep):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(ckpt_dir / "x.tmp"))
        return real(ckpt_dir, step, state, keep)

    monkeypatch.setattr(loop, "save_checkpoint", full_at_4)
    with pytest.raises(RunDirError, match="No space left on device.*re-run the same command"):
        train(cfg, run)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(loop, "save_checkpoint", real)
    s = train(cfg, run)
    assert s["status"] == "completed" and s["resumed_from"] == 2


def test_tools_read_the_newest_good_checkpoint_of_a_run(tiny_config):
    from moe_vlm.upcycling.source import load_checkpoint

    cfg = tiny_config("train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2",
                      "train.keep_checkpoints=2")
    run = Path(cfg.run.dir)
    train(cfg, run)
    garble(run / "checkpoints" / "step_00000004.pt", 0.5)
    with pytest.warns(UserWarning, match="step_00000004.pt: checksum mismatch"):
        src = load_checkpoint(run)
    assert src.path.name == "step_00000002.pt"
    assert (run / "checkpoints" / "step_00000004.pt").exists()  # someone else's run: not moved


def test_a_refused_fresh_run_leaves_no_directory(tiny_config, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = tiny_config("train.max_steps=2", f"train.init_from={tmp_path / 'empty'}")
    with pytest.raises(CheckpointError, match="train.init_from: no usable"):
        train(cfg, cfg.run.dir)
    assert not Path(cfg.run.dir).exists()


def test_a_refused_run_in_an_empty_job_dir_leaves_nothing(tiny_config, tmp_path):
    (tmp_path / "notackpt.pt").write_text("hello")
    cfg = tiny_config("train.max_steps=2", f"train.init_from={tmp_path / 'notackpt.pt'}")
    Path(cfg.run.dir).mkdir()  # as Hydra makes its job directory before the job runs
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        train(cfg, cfg.run.dir)
    assert not Path(cfg.run.dir).exists()


def test_keys_added_since_a_run_was_made_resume_at_their_default():
    """A run directory from before a config key existed resumes when the key is at its
    default (what the old code did); a non-default value is still a change."""
    from dataclasses import asdict

    from moe_vlm.config import load_config
    from moe_vlm.train.resume import config_changes

    new = asdict(load_config([]))
    old = {**new, "data": {k: v for k, v in new["data"].items() if not k.startswith("v2pe")}}
    assert config_changes(old, new) == {}
    changed = asdict(load_config(["data.v2pe_delta=0.5"]))
    assert config_changes(old, changed) == {"data.v2pe_delta": (None, 0.5)}
