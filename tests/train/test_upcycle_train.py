"""Upcycling through the training entry points: ``upcycle.*`` in ``moe-vlm train`` and the
``moe-vlm upcycle`` command's checkpoint directory, trained with ``train.init_from`` or
``--config-path``. The upcycled model starts exactly where the dense run ended."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moe_vlm.checkpoints_cli import upcycle_main
from moe_vlm.config import ConfigError
from moe_vlm.train.loop import train

MOE = ["moe.n_experts=2", "moe.d_expert=256", "moe.granularity=4", "routing.top_k=1",
       "routing.renormalize=true", "moe.n_shared=0", "model.moe_every=1"]


@pytest.fixture
def dense_run(tiny_config, tmp_path):
    cfg = tiny_config("experiment=dense_baseline", "train.max_steps=6", "train.eval_every=6",
                      f"run.dir={tmp_path / 'dense'}")
    summary = train(cfg, tmp_path / "dense")
    return tmp_path / "dense", summary


def test_train_with_upcycle_starts_at_the_dense_loss(tiny_config, dense_run, tmp_path):
    dense_dir, dense_summary = dense_run
    cfg = tiny_config(*MOE, "upcycle.method=split", f"upcycle.source={dense_dir}",
                      "train.max_steps=3", "train.eval_every=3", f"run.dir={tmp_path / 'moe'}")
    s = train(cfg, tmp_path / "moe")
    assert s["status"] == "completed"
    assert s["initial_eval_loss"] == pytest.approx(dense_summary["final_eval_loss"], rel=1e-5)
    up = s["upcycle"]
    assert up["method"] == "split" and up["shards"] == 4 and up["function_preserving"]
    assert up["source_kind"] == "run"


def test_upcycle_config_errors(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="upcycle.source"):
        tiny_config("upcycle.method=copy")
    with pytest.raises(ConfigError, match="train.init_from"):
        tiny_config("upcycle.method=copy", "upcycle.source=x", "train.init_from=y")
    with pytest.raises(ConfigError, match="model.moe_every"):
        tiny_config("upcycle.method=copy", "upcycle.source=x", "model.moe_every=0")
    with pytest.raises(ConfigError, match="upcycle.method"):
        tiny_config("upcycle.method=sparse")


def test_upcycle_command_writes_a_trainable_checkpoint_dir(dense_run, tmp_path, capsys):
    dense_dir, dense_summary = dense_run
    out = tmp_path / "up"
    upcycle_main(["--from", str(dense_dir), "--method", "split", "--out", str(out),
                  "upcycle.permute=true", *MOE])
    printed = capsys.readouterr().out
    assert "function preserving: True" in printed
    rec = json.loads((out / "upcycle.json").read_text())
    assert rec["function_preserving"] and rec["max_abs_logit_diff_vs_dense"] < 1e-4
    assert (out / "checkpoints" / "step_00000000.pt").is_file()
    # train from it with Hydra reading the directory's config
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "moe_vlm.cli", "train", "--config-path", str(out),
                    "--config-name", "config", "train.max_steps=2", "train.eval_every=2",
                    "train.progress=false", f"run.dir={run}"], check=True, timeout=300,
                   capture_output=True)
    s = json.loads((run / "summary.json").read_text())
    assert s["init_from"] == str(out.resolve())
    assert s["initial_eval_loss"] == pytest.approx(dense_summary["final_eval_loss"], rel=1e-5)
    # a non-empty --out is refused, and so is an impossible shape
    with pytest.raises(SystemExit):
        upcycle_main(["--from", str(dense_dir), "--method", "copy", "--out", str(out)])
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        upcycle_main(["--from", str(dense_dir), "--method", "copy", "--out", str(tmp_path / "x"),
                      *MOE])
    assert "copy needs routed experts as wide" in capsys.readouterr().err
