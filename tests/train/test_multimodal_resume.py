"""The multimodal MoE options (modality-aware routing, V2PE) resume exactly: a run stopped
and resumed ends with the metrics and weights of an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.train import train
from moe_vlm.train.checkpoint import list_checkpoints
from moe_vlm.train.rundir import read_jsonl

BASE = ["train.max_steps=6", "train.ckpt_every=2", "train.log_every=1", "train.eval_every=3",
        "train.batch_size=4", "data.n_eval_samples=8", "train.progress=false",
        "data.vision_pretrain_steps=3"]  # a resume must not redo it


@pytest.mark.parametrize("options", [
    ["routing.modality=groups", "data.v2pe_delta=0.5", "data.v2pe_train_deltas=[1.0,0.5,0.25]"],
    ["routing.modality=routers", "routing.aux_loss_scope=global_batch"],
], ids=["groups_v2pe", "routers_global"])
def test_stop_and_resume_equals_uninterrupted(options, tmp_path):
    part = load_config([*BASE, *options, "train.stop_after_steps=3", f"run.dir={tmp_path / 'a'}"])
    train(part, part.run.dir)
    rest = load_config([*BASE, *options, f"run.dir={tmp_path / 'a'}"])
    assert train(rest, rest.run.dir)["resumed_from"] == 3
    ref = load_config([*BASE, *options, f"run.dir={tmp_path / 'b'}"])
    train(ref, ref.run.dir)
    rows = [[{k: v for k, v in r.items() if k != "tokens_per_s"}
             for r in read_jsonl(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert rows[0] == rows[1]
    got, want = (torch.load(list_checkpoints(tmp_path / d / "checkpoints")[-1][1],
                            weights_only=False)["model"] for d in ("a", "b"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
