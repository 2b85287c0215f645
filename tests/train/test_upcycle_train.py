"""Upcycling through the training entry points: ``upcycle.*`` in ``moe-vlm train`` and the
``moe-vlm upcycle`` command's checkpoint directory, trained with ``train.init_from`` or
``--config-path``. The upcycled model starts exactly where the dense run ended."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moe_vlm.commands.checkpoints import upcycle_main, write_checkpoint_dir
from moe_vlm.config import ConfigError
from moe_vlm.config.loader import config_from_file
from moe_vlm.train.loop import train
from moe_vlm.upcycling.source import load_checkpoint

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
    subprocess.run([sys.executable, "-m", "moe_vlm.commands", "train", "--config-path", str(out),
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


def test_upcycle_command_from_a_checkpoint_dir_derives_the_width(dense_run, tmp_path, capsys):
    """A checkpoint directory (as import-hf and upcycle write it) points train.init_from at
    itself; upcycling from it must not trip the "init_from or upcycle" rule. Without
    moe.d_expert, split takes the width that cuts the pool into moe.granularity shards,
    after the shared slice (the source's deepseekmoe routing: 1 shared, granularity 4)."""
    dense_dir, dense_summary = dense_run
    src = load_checkpoint(dense_dir)
    moe, d_ff = src.config.moe, src.config.model.d_ff
    assert (moe.n_shared, moe.granularity, d_ff) == (1, 4, 256)
    ckpt = tmp_path / "ckpt"
    write_checkpoint_dir(ckpt, src.config, src.state_dict, "import.json", {})
    assert load_checkpoint(ckpt).config.train.init_from == str(ckpt.resolve())
    out = tmp_path / "up"
    upcycle_main(["--from", str(ckpt), "--method", "split", "--out", str(out), "moe.n_experts=2",
                  "routing.renormalize=true", "routing.top_k=1"])
    printed = capsys.readouterr().out
    # d = 256 / (1 + 1) = 128: shared 128 units, routed 2 x 4 shards of 32 from the other 128
    assert "moe.d_expert=128 (not set: derived" in printed and "m=4" in printed
    assert "function preserving: True" in printed
    assert json.loads((out / "upcycle.json").read_text())["derived"] == {"moe.d_expert": 128}
    run = tmp_path / "run"
    s = train(config_from_file(out / "config.yaml", ["train.max_steps=1", "train.eval_every=1",
                                                      f"run.dir={run}"]), run)
    assert s["initial_eval_loss"] == pytest.approx(dense_summary["final_eval_loss"], rel=1e-5)


def test_train_path_size_error_names_the_fitting_width(tiny_config, dense_run, tmp_path):
    """``moe-vlm train`` cannot tell a preset's moe.d_expert from the user's, so it does not
    derive the width; the error says which one fits."""
    dense_dir, _ = dense_run
    cfg = tiny_config("moe.n_experts=4", "moe.d_expert=128", "moe.granularity=1", "moe.n_shared=0",
                      "routing.top_k=2", "upcycle.method=copy", f"upcycle.source={dense_dir}",
                      "train.max_steps=1", f"run.dir={tmp_path / 'moe'}")
    with pytest.raises(ValueError, match=r"moe.d_expert=256 fits, with moe.granularity=1"):
        train(cfg, tmp_path / "moe")
