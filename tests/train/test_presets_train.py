"""Every routing preset, the dense baseline and bf16 autocast train for a few steps."""

from __future__ import annotations

import math

import pytest

from moe_vlm.config.loader import config_dir
from moe_vlm.train import train

ROUTINGS = sorted(p.stem for p in (config_dir() / "routing").glob("*.yaml"))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_routing_preset_trains(tiny_config, routing):
    cfg = tiny_config(f"routing={routing}", "train.max_steps=4", "train.eval_every=4",
                      "train.log_every=2")
    s = train(cfg, cfg.run.dir)
    assert s["status"] == "completed"
    assert math.isfinite(s["final_eval_loss"]) and s["final_eval_loss"] < s["initial_eval_loss"]


def test_dense_baseline(tiny_config):
    cfg = tiny_config("experiment=dense_baseline", "train.max_steps=3")
    s = train(cfg, cfg.run.dir)
    assert s["params_total"] == s["params_active"] and s["expert_backend"] is None


def test_torch_backend_selected(tiny_config):
    cfg = tiny_config("moe.backend=torch", "train.max_steps=3")
    assert train(cfg, cfg.run.dir)["expert_backend"] == "torch"


def test_bf16_autocast_on_cpu(tiny_config):
    cfg = tiny_config("train.precision=bf16", "train.max_steps=4", "train.eval_every=4")
    s = train(cfg, cfg.run.dir)
    assert s["precision"] == "bfloat16" and s["expert_backend"] == "grouped_mm"
    assert math.isfinite(s["final_eval_loss"]) and s["final_eval_loss"] < s["initial_eval_loss"]
