"""``experiment=vit_moe`` under expert parallelism through the real launcher (torchrun, 2
gloo processes, ``parallel.ep=2``): the decoder's and the vision tower's experts sharded
(4 of each vision layer's 8 per rank, biases too), the same curve, vision loads and final
single-process checkpoint and optimizer state as one process. ~30 s on 2 cores."""

from __future__ import annotations

import json

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.train import train
from moe_vlm.train.checkpoint import checkpoint_path
from moe_vlm.train.rundir import read_jsonl
from test_launch import BASE, assert_same_curve, curve, torchrun  # noqa: E402


@pytest.mark.timeout(400)
def test_vit_moe_under_expert_parallelism_matches_single_process(tmp_path):
    overrides = ["experiment=vit_moe", "train.micro_batch_size=2",
                 "data.vision_pretrain_steps=0"]  # pre-training rounds differ by thread count
    res = torchrun(2, [*overrides, "parallel.ep=2", f"run.dir={tmp_path / 'ep2'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    ref = tmp_path / "ref"
    train(load_config([*BASE, *overrides, f"run.dir={ref}"]), ref)
    assert_same_curve(curve(tmp_path / "ep2"), curve(ref))
    summary = json.loads((tmp_path / "ep2" / "summary.json").read_text())
    assert summary["parallel"]["ep"] == 2
    got_rows, ref_rows = read_jsonl(tmp_path / "ep2" / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    for g, r in zip(got_rows, ref_rows):
        if "routing" in r:
            assert g["routing"]["vision_layer_1"]["tokens_per_expert"] == \
                r["routing"]["vision_layer_1"]["tokens_per_expert"]
    got = torch.load(checkpoint_path(tmp_path / "ep2" / "checkpoints", 6), weights_only=False)
    want = torch.load(checkpoint_path(ref / "checkpoints", 6), weights_only=False)
    assert got["model"].keys() == want["model"].keys()
    assert got["model"]["vision.blocks.1.mlp.experts.b_in"].shape == (8, 256)
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, atol=2e-4, rtol=1e-3, msg=key)
    for i, st in want["optimizer"]["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][key], value, atol=1e-4,
                                       rtol=1e-2, msg=f"optimizer {i} {key}")
