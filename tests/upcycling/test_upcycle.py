"""Upcycling whole models: function preservation at step 0 (logits equal the dense
model's), which layers become MoE, VLMs keep their vision tower, and clear errors.

Legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig, UpcycleConfig
from moe_vlm.model.decoder import build_model
from moe_vlm.model.vlm import build_vlm
from moe_vlm.upcycling import upcycle_into
from moe_vlm.upcycling.methods import fitting_d_expert

V = 50
BASE = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                   moe_every=0, max_seq_len=16, init_std=0.1)
IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))


def dense_model(cfg: ModelConfig = BASE):
    return build_model(cfg, MoEConfig(), RoutingConfig(), "cpu", seed=0).eval()


def moe_model(moe: MoEConfig, routing: RoutingConfig, **model_kw):
    cfg = replace(BASE, **{"moe_every": 1, **model_kw})
    return build_model(cfg, moe, routing, "cpu", seed=1).eval()


PRESERVING = {  # name: (method, moe, routing, upcycle options, model overrides)
    "copy_softmax_renorm": ("copy", MoEConfig(n_experts=4, d_expert=64),
                            RoutingConfig(gate="softmax_topk", top_k=2), {}, {}),
    "copy_sigmoid": ("copy", MoEConfig(n_experts=4, d_expert=64),
                     RoutingConfig(gate="sigmoid_topk", top_k=2), {}, {}),
    "split_granularity4_top1": ("split", MoEConfig(n_experts=2, d_expert=64, granularity=4),
                                RoutingConfig(gate="softmax_topk", top_k=1), {}, {}),
    "split_permuted_shared_slice": ("split", MoEConfig(n_experts=3, d_expert=16, n_shared=1),
                                    RoutingConfig(gate="softmax_topk", top_k=3),
                                    {"permute": True}, {}),
    "split_sigmoid_first_layer_dense": ("split", MoEConfig(n_experts=8, d_expert=16),
                                        RoutingConfig(gate="sigmoid_topk", top_k=4), {},
                                        {"n_dense_layers": 1}),
    "copy_every_second_layer": ("copy", MoEConfig(n_experts=4, d_expert=64),
                                RoutingConfig(gate="softmax_topk", top_k=2), {}, {"moe_every": 2}),
}


@pytest.mark.parametrize("case", list(PRESERVING))
def test_function_preserving_methods_reproduce_dense_logits(case):
    method, moe, routing, opts, model_kw = PRESERVING[case]
    dense = dense_model()
    target = moe_model(moe, routing, **model_kw)
    rep = upcycle_into(target, dense.state_dict(), UpcycleConfig(method=method, **opts))
    assert rep.function_preserving, rep.reason
    assert rep.moe_layers == [i for i, m in enumerate(target.schedule) if m]
    with torch.no_grad():
        torch.testing.assert_close(target(IDS).logits, dense(IDS).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method,routing,opts", [
    ("copy", RoutingConfig(gate="softmax_topk", top_k=2, renormalize=False), {}),
    ("drop", RoutingConfig(gate="softmax_topk", top_k=2), {"drop_ratio": 0.5}),
    ("noise", RoutingConfig(gate="softmax_topk", top_k=2), {"noise_std": 0.05}),
])
def test_non_preserving_combinations_say_so_and_differ(method, routing, opts):
    dense = dense_model()
    target = moe_model(MoEConfig(n_experts=4, d_expert=64), routing)
    rep = upcycle_into(target, dense.state_dict(), UpcycleConfig(method=method, **opts))
    assert not rep.function_preserving and rep.reason
    with torch.no_grad():
        assert (target(IDS).logits - dense(IDS).logits).abs().max() > 1e-3


def test_non_ffn_weights_are_copied_exactly_and_dense_layers_kept():
    dense = dense_model()
    target = moe_model(MoEConfig(n_experts=4, d_expert=64), RoutingConfig(top_k=2), n_dense_layers=1)
    upcycle_into(target, dense.state_dict(), UpcycleConfig(method="copy"))
    src, got = dense.state_dict(), target.state_dict()
    for k in ("embed.weight", "layers.1.attn.wq.weight", "layers.2.ffn_norm.weight", "norm.weight",
              "layers.0.ffn.w_in.weight", "layers.0.ffn.w_out.weight"):
        assert torch.equal(got[k], src[k]), k
    assert torch.count_nonzero(got["layers.1.ffn.router.bias"]) == 0


def test_vlm_upcycling_carries_vision_and_projector():
    over = ["train.max_steps=1", "model.moe_every=0"]
    dense_cfg = load_config(over)
    dense = build_vlm(dense_cfg, image_token_id=259, seed=0).eval()
    target_cfg = load_config(["train.max_steps=1", "moe.d_expert=256", "moe.granularity=1",
                              "moe.n_experts=4", "routing.top_k=2", "routing.renormalize=true",
                              "moe.n_shared=0"])
    target = build_vlm(target_cfg, image_token_id=259, seed=5).eval()
    rep = upcycle_into(target, dense.state_dict(), UpcycleConfig(method="copy"))
    assert rep.copied_vision and rep.function_preserving
    src, got = dense.state_dict(), target.state_dict()
    for k in src:
        if k.startswith(("vision.", "projector.")):
            assert torch.equal(got[k], src[k]), k
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, dense(ids).logits, atol=2e-5, rtol=1e-4)


def test_text_decoder_into_vlm_keeps_the_vlm_vision_init():
    """An LLM (e.g. imported from Hugging Face) upcycled into a VLM's decoder."""
    cfg = load_config(["train.max_steps=1", "moe.d_expert=256", "moe.granularity=1",
                       "routing.top_k=2", "routing.renormalize=true", "moe.n_shared=0"])
    dense_dec = build_model(replace(cfg.model, moe_every=0), cfg.moe, cfg.routing, "cpu", seed=0)
    target = build_vlm(cfg, image_token_id=259, seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("vision.")}
    rep = upcycle_into(target, dense_dec.state_dict(), UpcycleConfig(method="copy"))
    assert not rep.copied_vision
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_errors_name_the_problem():
    dense = dense_model()
    target = moe_model(MoEConfig(n_experts=4, d_expert=64), RoutingConfig(top_k=2))
    sd = dense.state_dict()
    with pytest.raises(ValueError, match="already an MoE model"):
        upcycle_into(target, target.state_dict(), UpcycleConfig(method="copy"))
    missing = {k: v for k, v in sd.items() if k != "layers.1.attn.wk.weight"}
    with pytest.raises(ValueError, match=r"no tensor 'layers.1.attn.wk.weight'"):
        upcycle_into(target, missing, UpcycleConfig(method="copy"))
    no_ffn = {k: v for k, v in sd.items() if k != "layers.2.ffn.w_out.weight"}
    with pytest.raises(ValueError, match=r"no dense FFN tensor 'layers.2.ffn.w_out.weight' for MoE layer 2"):
        upcycle_into(target, no_ffn, UpcycleConfig(method="copy"))
    wide = dense_model(replace(BASE, d_model=48))
    with pytest.raises(ValueError, match=r"expected \(128, 32\) \(model.d_model=32\)"):
        upcycle_into(target, wide.state_dict(), UpcycleConfig(method="copy"))
    extra = {**sd, "head.weight": torch.zeros(V, 32)}
    with pytest.raises(ValueError, match=r"no place in the target: \['head.weight'\]"):
        upcycle_into(target, extra, UpcycleConfig(method="copy"))
    with pytest.raises(ValueError, match="nothing to upcycle"):
        upcycle_into(target, sd, UpcycleConfig(method="none"))


def test_same_seed_same_weights():
    dense = dense_model()
    outs = []
    for seed in (3, 3, 4):
        target = moe_model(MoEConfig(n_experts=4, d_expert=16), RoutingConfig(top_k=4))
        upcycle_into(target, dense.state_dict(), UpcycleConfig(method="drop", permute=True), seed=seed)
        outs.append(target.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not torch.equal(outs[0]["layers.0.ffn.router.weight"], outs[2]["layers.0.ffn.router.weight"])


FITTING = {  # name: (method, n_shared, granularity, upcycle options, expected d_expert); d_ff 64
    "copy": ("copy", 0, 1, {}, 64),
    "copy_shared_slice": ("copy", 1, 1, {}, 32),  # shared 32 units, routed the other 32
    "copy_granularity3_shared": ("copy", 1, 3, {}, 48),  # routed 48/3 = 16 = 64 - 48
    "copy_granularity2": ("copy", 0, 2, {}, 128),  # 2x the experts, each the whole FFN
    "split_granularity4": ("split", 0, 4, {}, 64),  # routed 16 = 64 / 4
    "split_granularity2_shared": ("split", 1, 2, {}, 32),  # shared 32, routed 2 x 16
    "drop_auto_base": ("drop", 0, 2, {}, 64),  # auto: the split layout
    "noise_copy_base": ("noise", 0, 2, {"base": "copy"}, 128),
    "copy_shared_whole": ("copy", 1, 1, {"shared": "whole"}, 64),
    "copy_shared_random": ("copy", 1, 1, {"shared": "random"}, 64),  # takes no dense units
}


@pytest.mark.parametrize("case", list(FITTING))
def test_fitting_d_expert_builds_the_target_and_copy_has_no_other_width(case):
    method, n_shared, g, opts, want = FITTING[case]
    d = fitting_d_expert(64, method, n_shared, g, opts.get("shared", "slice"),
                         opts.get("base", "auto"))
    assert d == want
    routing = RoutingConfig(gate="softmax_topk", top_k=2)
    ucfg = UpcycleConfig(method=method, **opts)
    dense = dense_model()

    def upcycle(width: int):
        target = moe_model(MoEConfig(n_experts=4, d_expert=width, granularity=g,
                                     n_shared=n_shared), routing)
        return target, upcycle_into(target, dense.state_dict(), ucfg)

    target, rep = upcycle(d)
    if method in ("copy", "split") and opts.get("shared", "slice") == "slice":
        assert rep.function_preserving, rep.reason
        with torch.no_grad():
            torch.testing.assert_close(target(IDS).logits, dense(IDS).logits, atol=2e-5, rtol=1e-4)
    if method == "copy" and "shared" not in opts:  # the only width: any other fails
        for other in (d - g, d + g):
            with pytest.raises(ValueError, match=rf"moe.d_expert={d} fits"):
                upcycle(other)


@pytest.mark.parametrize("method,n_shared,g,match", [
    ("copy", 2, 1, r"moe.d_expert = 64/3;"),  # 64 - 2d = d has no integer solution
    ("split", 0, 3, r"64/1 as a multiple of 3"),
    ("copy", 4, 2, r"n_shared=4 \(upcycle.shared=slice\) and moe.granularity=2 would need "
                   r"moe.d_expert = 128/9 as"),
])
def test_fitting_d_expert_refuses_when_nothing_fits(method, n_shared, g, match):
    with pytest.raises(ValueError, match=match):
        fitting_d_expert(64, method, n_shared, g)
