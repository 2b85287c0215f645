"""data.vision_pretrain_steps: the tower and projector pre-trained on the synthetic scenes'
attributes before the first step (moe_vlm.train.vision_pretrain)."""

from __future__ import annotations

import random

import pytest
import torch

from moe_vlm.config import ConfigError, load_config
from moe_vlm.model.vlm import build_vlm
from moe_vlm.train import train
from moe_vlm.train.vision_pretrain import pretrain_steps, pretrain_vision, quadrant_pool, scene_batch


def test_quadrant_pool_averages_each_quadrants_tokens():
    side = 4
    tokens = torch.arange(side * side, dtype=torch.float32).view(1, side * side, 1)  # row-major
    pooled = quadrant_pool(tokens.expand(2, -1, 3))  # [2, 4, 3]
    grid = tokens.view(side, side)
    want = torch.stack([grid[:2, :2].mean(), grid[:2, 2:].mean(), grid[2:, :2].mean(),
                        grid[2:, 2:].mean()])
    assert torch.equal(pooled[0, :, 0], want) and torch.equal(pooled[1, :, 2], want)
    four = torch.randn(3, 4, 5)  # the default job: one token per quadrant
    assert torch.equal(quadrant_pool(four), four)
    with pytest.raises(ConfigError, match="data.vision_pretrain_steps"):
        quadrant_pool(torch.randn(1, 9, 2))  # a 3x3 grid has no quadrant blocks


def test_scene_labels_name_the_quadrant_the_shape_is_drawn_in():
    """Label slot q must be the image region quadrant_pool gives slot q (row-major), or
    the stage would teach the tower the wrong quadrant."""
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    x, y = scene_batch(random.Random(0), 64, 32, mean, std)  # [64, 3, 32, 32], {a: [64, 4]}
    assert x.shape == (64, 3, 32, 32) and set(y) == {"kind", "color", "size"}
    assert (y["kind"] == 0).eq(y["color"] == 0).all() and (y["kind"] == 0).eq(y["size"] == 0).all()
    blocks = x.unfold(2, 16, 16).unfold(3, 16, 16)  # [64, 3, 2, 2, 16, 16]
    # background <= 0.12 in every channel, a shape >= 0.8 in one; a big triangle may spill
    # a pixel column into the next quadrant, a small shape covers 20 or more pixels
    bright = (blocks.amax(dim=1) > 0.5).sum(dim=(3, 4)).flatten(1)  # [64, 4] row-major quadrants
    assert ((bright >= 16) == (y["kind"] > 0)).all()
    assert (y["kind"] > 0).sum(1).min() >= 1 and (y["kind"] > 0).sum(1).max() <= 3


def test_pretraining_teaches_the_image_path_only_and_is_deterministic():
    cfg = load_config([])
    models = [build_vlm(cfg, image_token_id=3, seed=0) for _ in range(2)]
    start = {k: v.detach().clone() for k, v in models[0].named_parameters()}
    models[0].vision.patch_embed.weight.requires_grad_(False)  # a frozen part stays put
    models[1].vision.patch_embed.weight.requires_grad_(False)
    reports = [pretrain_vision(m, 40, 8, 3e-3, seed=0, data_seed=1) for m in models]
    a, b = (dict(m.named_parameters()) for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seeds, same weights
    assert reports[0].as_dict() == reports[1].as_dict()
    for k, v in start.items():
        image_path = k.startswith(("vision.", "projector.")) and k != "vision.patch_embed.weight"
        assert torch.equal(v, a[k]) != image_path, k  # only the trainable image path moved
    r = reports[0]
    assert r.steps == 40 and r.final_loss < 3.0
    # 40 steps learn the colours and sizes and improve the kinds (measured: colour 0.06 ->
    # 0.97, size 0.26 -> 0.97, kind 0.54 -> 0.69; the default job's 300 reach kind 0.97).
    assert r.accuracy_after["color"] > 0.7 and r.accuracy_after["size"] > 0.8, r
    assert r.accuracy_after["kind"] > r.accuracy_before["kind"] + 0.05, r
    assert all(p.grad is None for m in models for p in m.parameters())


def test_a_fresh_run_reports_it_and_a_resume_does_not_redo_it(tmp_path):
    run = tmp_path / "run"
    base = ["train.batch_size=4", "data.n_eval_samples=8", "train.progress=false",
            "train.eval_every=100", "data.count_questions_after=0", "data.vision_pretrain_steps=5",
            f"run.dir={run}"]
    s = train(load_config([*base, "train.max_steps=1"]), run)
    assert s["vision_pretrain"]["steps"] == 5
    s = train(load_config([*base, "train.max_steps=2", "data.vision_pretrain_steps=7"]), run)
    assert s["steps"] == 2 and s["vision_pretrain"]["steps"] == 5  # kept, not redone
    assert s["resumed_from"] == 1


def test_only_the_synthetic_scenes_have_it():
    assert pretrain_steps(load_config([])) == 300  # the default job
    assert pretrain_steps(load_config(["data.vision_pretrain_steps=0"])) == 0
    # data.name=llava on top of the synthetic preset keeps the key; LLaVA rows have no
    # scene attributes, so it is ignored (as data.count_questions_after is)
    llava = load_config(["data.name=llava", "data.path=x.jsonl"])
    assert llava.data.vision_pretrain_steps == 300 and pretrain_steps(llava) == 0
    with pytest.raises(ConfigError, match="data.vision_pretrain_steps"):
        load_config(["data.vision_pretrain_steps=-1"])
