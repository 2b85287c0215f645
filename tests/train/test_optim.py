"""Learning-rate schedules and parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from moe_vlm.config import TrainConfig
from moe_vlm.config import load_config
from moe_vlm.model import build_model
from moe_vlm.train.optim import build_optimizer, lr_at, param_groups


def test_warmup_cosine():
    c = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, c) == pytest.approx(0.1)
    lrs = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd():
    c = TrainConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=5, max_steps=100, schedule="wsd",
                    wsd_decay_frac=0.2)
    assert lr_at(2, c) == pytest.approx(2.0 * 3 / 5)
    assert all(lr_at(s, c) == 2.0 for s in range(5, 80))
    assert lr_at(89, c) == pytest.approx(2.0 * (1 - 10 / 20))
    assert lr_at(99, c) == pytest.approx(0.0)


def test_constant():
    c = TrainConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, c) for s in range(50)} == {0.5}


def test_param_groups_no_decay_on_norms_and_router_bias_not_optimised():
    cfg = load_config(["model.tie_embeddings=false"])
    model = build_model(cfg.model, cfg.moe, cfg.routing)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert nd and all("norm" in n for n in nd)
    assert any("router.weight" in n for n in d) and any("experts.w_in" in n for n in d)
    assert "embed.weight" in d and "head.weight" in d
    assert len(d) + len(nd) == len(list(model.parameters()))
    opt = build_optimizer(model, cfg.train)
    assert all(p is not model.layers[0].ffn.router.bias for g in opt.param_groups for p in g["params"])


def test_vision_lr_scale_scales_only_the_image_path():
    """train.vision_lr_scale: the tower's and projector's steps are that fraction of the
    decoder's (the same schedule); at 1 the groups are the usual two."""
    from moe_vlm.model.vlm import build_vlm
    from moe_vlm.parallel.engines import set_lr

    cfg = load_config(["vision.n_layers=1", "model.n_layers=1"])
    model = build_vlm(cfg, image_token_id=3)
    assert len(param_groups(model, 0.1)) == 2
    groups = param_groups(model, 0.1, vision_lr_scale=0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 0.25, 0.25]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]
    image_path = {names[id(p)] for g in groups[2:] for p in g["params"]}
    assert image_path == {n for n in names.values() if n.startswith(("vision.", "projector."))}
    assert not any(n.startswith(("vision.", "projector.")) for g in groups[:2]
                   for n in (names[id(p)] for p in g["params"]))
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.02, 0.005, 0.005])
    # one step: a vision weight moves a quarter as far as with the full rate (Adam's first
    # step moves every weight by lr * sign(grad), here without weight decay)
    w = model.projector.fc1.weight
    before = w.detach().clone()
    for g in opt.param_groups:
        g["weight_decay"] = 0.0
    w.grad = torch.ones_like(w)
    opt.step()
    assert torch.allclose(before - w.detach(), torch.full_like(w, 0.005), rtol=1e-4)
    with pytest.raises(Exception, match="train.vision_lr_scale"):
        load_config(["train.vision_lr_scale=0"])


def test_adamw_is_fused_only_on_cuda(tiny_config):
    """CPU runs keep the default AdamW (the one their checkpoints were made with)."""
    cfg = tiny_config()
    model = build_model(cfg.model, cfg.moe, cfg.routing, device=torch.device("cpu"), seed=0)
    assert not build_optimizer(model, cfg.train).defaults.get("fused")


@pytest.mark.gpu
def test_adamw_is_fused_and_inputs_arrive_intact_on_cuda(tiny_config):
    from moe_vlm.train.inputs import model_inputs

    cfg = tiny_config()
    model = build_model(cfg.model, cfg.moe, cfg.routing, device=torch.device("cuda"), seed=0)
    fused = build_optimizer(model, cfg.train)
    assert fused.defaults["fused"]
    # One step of the fused AdamW against the plain one from the same gradients.
    ref = {p: p.detach().clone().requires_grad_() for p in model.parameters()}
    t = cfg.train
    plain = torch.optim.AdamW([{"params": [ref[p] for p in g["params"]],
                                "weight_decay": g["weight_decay"]} for g in fused.param_groups],
                              lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False)
    for p, r in ref.items():
        p.grad = torch.randn_like(p)
        r.grad = p.grad.clone()
    fused.step()
    plain.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref[p], atol=1e-6, rtol=1e-5, msg=name)
    batch = {"input_ids": torch.arange(12).reshape(2, 6), "labels": torch.ones(2, 6, dtype=torch.long),
             "token_mask": torch.arange(12).reshape(2, 6) < 10}
    got = model_inputs(batch, torch.device("cuda"))  # pinned, non-blocking copies
    assert all(torch.equal(got[k].cpu(), v) for k, v in batch.items())
    assert torch.equal(got["token_rows"].cpu(), torch.arange(10))
