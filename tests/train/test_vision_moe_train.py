"""The two vision presets train end to end and resume exactly: ``experiment=vit_moe``
(MoE layers in the ViT: their loads logged as ``vision_layer_<i>``, their balance biases
moved; expert parallelism: tests/parallel/test_vision_moe_ep.py) and
``experiment=encoder_free`` (patches straight into the decoder); a Hugging Face tower
upcycled into MoE blocks trains too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_vlm.analysis.modality import modality_load
from moe_vlm.analysis.plots import expert_load, plot_expert_load
from moe_vlm.config import load_config
from moe_vlm.train import train
from moe_vlm.train.checkpoint import checkpoint_path
from moe_vlm.train.rundir import read_jsonl
from test_kill_resume import assert_same_run  # noqa: E402

SMALL = ["train.max_steps=3", "train.batch_size=4", "data.n_eval_samples=4", "train.progress=false",
         "data.vision_pretrain_steps=0",
         "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3", "train.ckpt_every=1"]


def _run(run_dir: Path, *overrides: str) -> dict:
    cfg = load_config([*SMALL, f"run.dir={run_dir}", *overrides])
    return train(cfg, run_dir)


def _stopped_then_resumed_equals_uninterrupted(tmp_path: Path, *overrides: str) -> dict:
    full = _run(tmp_path / "full", *overrides)
    assert full["status"] == "completed"
    first = _run(tmp_path / "resumed", *overrides, "train.stop_after_steps=2")
    assert first["status"] == "running" and first["steps"] == 2
    resumed = _run(tmp_path / "resumed", *overrides)
    assert resumed["resumed_from"] == 2
    assert_same_run(tmp_path / "resumed", tmp_path / "full")
    return full


def test_vit_moe_trains_logs_vision_loads_and_resumes_exactly(tmp_path):
    s = _stopped_then_resumed_equals_uninterrupted(tmp_path, "experiment=vit_moe")
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    per_expert = 2 * 64 * 256 + 256 + 64  # a vision expert: the ViT MLP's weights and biases
    assert s["params_total"] - s["params_active"] > 6 * per_expert  # 6 of 8 vision experts idle
    rows = [r for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "routing" in r]
    assert len(rows) == 3
    for r in rows:
        assert set(r["routing"]) == {"layer_0", "layer_1", "vision_layer_1"}
        vis = r["routing"]["vision_layer_1"]
        assert len(vis["tokens_per_expert"]) == 8
        assert sum(vis["tokens_per_expert"]) == 4 * 16 * 2  # 4 images x 16 patches x top-2
        assert "tokens_per_expert_image" not in vis and vis["aux_loss"] > 0
    # The run analyses read the vision rows: loads after the decoder's, no modality split.
    load = expert_load(tmp_path / "full")
    assert list(load) == ["layer_0", "layer_1", "vision_layer_1"] and len(load["vision_layer_1"]) == 8
    assert plot_expert_load(tmp_path / "full", tmp_path / "load.png").is_file()
    assert list(modality_load(tmp_path / "full")) == ["layer_0", "layer_1"]
    w = torch.load(checkpoint_path(tmp_path / "full" / "checkpoints", 3), weights_only=False)["model"]
    assert w["vision.blocks.1.mlp.experts.w_in"].shape == (8, 64, 256)
    assert w["vision.blocks.1.mlp.experts.b_out"].shape == (8, 64)
    assert "vision.blocks.0.mlp.fc1.weight" in w


def test_encoder_free_trains_and_resumes_exactly(tmp_path):
    s = _stopped_then_resumed_equals_uninterrupted(tmp_path, "experiment=encoder_free")
    assert s["final_eval_loss"] < s["initial_eval_loss"] and "eval_accuracy" in s
    w = torch.load(checkpoint_path(tmp_path / "full" / "checkpoints", 3), weights_only=False)["model"]
    vision = sorted(k for k in w if not k.startswith("decoder."))
    assert vision == ["vision.patch_embed.bias", "vision.patch_embed.weight", "vision.pos_embed.weight"]
    assert w["vision.patch_embed.weight"].shape == (64, 8 * 8 * 3)
    assert w["vision.pos_embed.weight"].shape == (16, 64)  # (32 / 8)^2 image tokens
    assert s["params_total"] == sum(v.numel() for v in w.values() if v.is_floating_point()) - \
        sum(w[k].numel() for k in w if k.endswith("router.bias"))


def test_balance_bias_moves_the_vision_routers_too(tmp_path):
    _run(tmp_path, "experiment=vit_moe", "routing.bias_update_rate=0.01", "train.max_steps=2")
    w = torch.load(checkpoint_path(tmp_path / "checkpoints", 2), weights_only=False)["model"]
    bias = w["vision.blocks.1.mlp.router.bias"]
    assert bias.abs().max() == pytest.approx(0.02)  # two steps of +-0.01 on some expert


def test_hf_tower_upcycled_into_moe_blocks_trains(tmp_path):
    import transformers as hf

    torch.manual_seed(0)
    tower = hf.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64)
    hf.SiglipVisionModel(tower).save_pretrained(tmp_path / "siglip")
    s = _run(tmp_path / "run", "experiment=vit_moe", "vision=hf", f"vision.hf_path={tmp_path / 'siglip'}",
             "vision.select_layer=-1", "train.max_steps=2")
    assert s["status"] == "completed"
    row = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "routing" in r][-1]
    assert sum(row["routing"]["vision_layer_1"]["tokens_per_expert"]) == 4 * 16 * 2


def test_dense_vlm_run_upcycles_into_decoder_and_vision_experts(tmp_path):
    """upcycle.source = a dense VLM run: the decoder's FFNs split into experts and every
    vision expert a copy of its block's MLP; with renormalised top-2 vision weights the
    upcycled model starts at the dense run's eval loss (function preserving)."""
    dense = _run(tmp_path / "dense", "model.moe_every=0", "train.max_steps=2")
    s = _run(tmp_path / "moe", "experiment=vit_moe", "vision.moe_renormalize=true",
             "moe.n_experts=2", "moe.d_expert=256", "moe.granularity=4", "routing.top_k=1",
             "routing.renormalize=true", "moe.n_shared=0", "upcycle.method=split",
             f"upcycle.source={tmp_path / 'dense'}", "train.max_steps=1", "train.eval_every=1")
    assert s["upcycle"]["copied_vision"] and s["upcycle"]["function_preserving"]
    assert s["initial_eval_loss"] == pytest.approx(dense["final_eval_loss"], rel=1e-5)
