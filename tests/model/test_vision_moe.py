"""MoE in the vision tower (V-MoE): MLP experts on every backend against a loop of linears,
the one-expert MoE ViT equal to the dense ViT bit for bit, upcycling (ours and Hugging
Face SigLIP / CLIP towers), the vision routing losses in the training loss and their
gradients, the step totals they are shares of, the Triton refusal, and the config checks.

Legend: N images, S image side, T tokens, D width, F expert width, E experts.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moe_vlm.config import ConfigError, load_config
from moe_vlm.config.schema import RoutingConfig
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.model import count_params
from moe_vlm.model import experts as experts_mod
from moe_vlm.model.dispatch import LocalDispatcher
from moe_vlm.model.experts import GroupedExperts, resolve_backend
from moe_vlm.model.layers import gelu_act
from moe_vlm.model.moe import MoELayer
from moe_vlm.model.vision import build_vision, load_hf_vision, upcycle_vision
from moe_vlm.model.vlm import build_vlm
from moe_vlm.routing.loss_norm import LossNorm
from test_vision import make_hf, pixels, vit_cfg  # noqa: E402

IMG = ByteTokenizer.image_id
CPU = torch.device("cpu")
BACKENDS = ["torch", "grouped_mm"]
ACTS = ["gelu", "gelu_tanh", "quick_gelu"]


# ---- MLP experts on expert-sorted rows -----------------------------------------------


def _loop_reference(x, tok, exp, weight, w_in, w_out, b_in, b_out, act):
    """y [T, D]: each assignment through its expert's MLP, one row at a time."""
    y = torch.zeros_like(x)
    for t, e, w in zip(tok.tolist(), exp.tolist(), weight):
        h = x[t] @ w_in[e] + b_in[e]  # [F] (or [2F])
        if act == "swiglu":
            gate, up = h.chunk(2)
            h = F.silu(gate) * up
        else:
            h = gelu_act(act)(h)
        y = y.index_add(0, torch.tensor([t]), (w * (h @ w_out[e] + b_out[e]))[None])
    return y


def _case(pattern: str, g: torch.Generator, n_exp: int):
    """(T, token_idx [N], expert_idx [N]) with top-2 per token."""
    if pattern == "one_token":
        return 1, torch.tensor([0, 0]), torch.tensor([3, 1])
    t = 7  # not a multiple of anything
    tok = torch.arange(t).repeat_interleave(2)
    if pattern == "all_one_expert":
        exp = torch.stack([torch.tensor([2, 0]) for _ in range(t)]).reshape(-1)
    else:  # "empty_expert": expert 1 gets nothing
        pool = torch.tensor([0, 2, 3])
        exp = torch.stack([pool[torch.randperm(3, generator=g)[:2]] for _ in range(t)]).reshape(-1)
    return t, tok, exp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["swiglu", *ACTS])
@pytest.mark.parametrize("pattern", ["empty_expert", "all_one_expert", "one_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_experts_match_a_loop_and_every_gradient(backend, act, pattern, dtype):
    g = torch.Generator().manual_seed(1)
    d, f, n_exp = 16, 24, 4
    ex = GroupedExperts(n_exp, d, f, backend, act=act, bias=True).to(dtype)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    t, tok, exp = _case(pattern, g, n_exp)
    x = torch.randn(t, d, generator=g).to(dtype).requires_grad_()
    weight = torch.rand(tok.numel(), generator=g).to(dtype).requires_grad_()
    y = LocalDispatcher()(x, tok, exp, weight, ex)
    params = [x, weight, *ex.parameters()]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref = _loop_reference(ref_params[0], tok, exp, ref_params[1], *ref_params[2:], act)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y.double(), ref, **tol)
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, params, gy.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_params, gy.double())
    names = ["x", "weight", *[n for n, _ in ex.named_parameters()]]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **tol, msg=name)
    if pattern == "empty_expert":  # the idle expert's gradients are zeros, not missing
        for a in grads[2:]:
            assert torch.count_nonzero(a[1]) == 0


def test_triton_refuses_mlp_experts_and_auto_avoids_it(monkeypatch):
    with pytest.raises(ValueError, match="fused SwiGLU experts without biases.*gelu_tanh MLPs "
                                         "with biases.*moe.backend=auto"):
        resolve_backend("triton", CPU, torch.float32, 64, 256, act="gelu_tanh", bias=True)
    # Where triton would run (a CUDA device, faked), auto keeps it for the decoder's SwiGLU
    # experts and passes it over for MLP experts.
    monkeypatch.setattr(experts_mod, "triton_supported", lambda *a: None)
    monkeypatch.setattr(experts_mod, "grouped_mm_supported", lambda *a: None)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.float32, 64, 256) == "triton"
    assert resolve_backend("auto", cuda, torch.float32, 64, 256, act="gelu_tanh", bias=True) == "grouped_mm"
    assert resolve_backend("auto", cuda, torch.float32, 64, 256, act="swiglu", bias=True) == "grouped_mm"


def test_config_refuses_triton_for_vision_experts():
    with pytest.raises(ConfigError, match=r"^moe\.backend: triton runs the decoder's fused SwiGLU"):
        load_config(["experiment=vit_moe", "moe.backend=triton"])


# ---- one expert = the dense ViT --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gate,renormalize", [("softmax_topk", False), ("softmax_topk", True),
                                              ("sigmoid_topk", False)])
def test_one_expert_moe_vit_equals_dense_vit_bit_for_bit(backend, act, gate, renormalize):
    """Every block's MLP an MoE layer with one expert holding its weights, top-1: the gate's
    weight is exactly 1 (softmax of one logit; a sigmoid weight normalised by itself), the
    expert computes the MLP with the same ``F.linear`` calls, the combine adds it to 0. So
    the MoE tower's features are the dense tower's, bit for bit."""
    cfg = vit_cfg(act=act, cls_token=True, drop_cls=False, pre_norm=True)
    dense = build_vision(cfg, "cpu", seed=3).eval()
    one = replace(cfg, moe_every=1, moe_experts=1, moe_top_k=1, moe_gate=gate,
                  moe_renormalize=renormalize)
    moe = upcycle_vision(dense, one, RoutingConfig(), backend, seed=5)
    assert len(moe.moe_layers()) == cfg.n_layers
    x = pixels(3, seed=2)
    with torch.no_grad():
        want = dense(x)
        got, routing = moe.forward_routed(x)
    assert all(torch.equal(r.weight, torch.ones_like(r.weight)) for r in routing)
    assert torch.equal(got, want)


def test_upcycled_renormalised_top2_computes_the_dense_tower():
    """Four copies of each MLP, top-2 with renormalised weights: the weights sum to 1, so the
    tower is the dense one to float rounding (w1*y + w2*y is not y bit for bit); without
    renormalisation (V-MoE's raw softmax weights) it is not."""
    cfg = vit_cfg()
    dense = build_vision(cfg, "cpu", seed=3).eval()
    x = pixels(2, seed=4)
    with torch.no_grad():
        want = dense(x)
        for renorm in (True, False):
            moe = upcycle_vision(dense, replace(cfg, moe_every=2, moe_experts=4, moe_top_k=2,
                                                moe_renormalize=renorm), RoutingConfig(), "torch")
            for layer in moe.moe_layers():  # every expert is the MLP of its block
                blk = dense.blocks[1].mlp
                for e in range(4):
                    assert torch.equal(layer.experts.w_in[e], blk.fc1.weight.t())
                    assert torch.equal(layer.experts.b_out[e], blk.fc2.bias)
            if renorm:
                torch.testing.assert_close(moe(x), want, atol=1e-6, rtol=1e-5)
            else:
                assert not torch.allclose(moe(x), want, atol=1e-3)


@pytest.mark.parametrize("kind", ["siglip_vision", "clip"])
def test_hf_tower_upcycles_into_moe_blocks(kind, tmp_path):
    """vision.name=hf with vision.moe_every > 0: the checkpoint's MLPs fill every expert (one
    expert: the HF-loaded dense tower's features, bit for bit); through build_vlm too."""
    m = make_hf(kind)
    m.save_pretrained(tmp_path)
    dense, hf_cfg = load_hf_vision(tmp_path)
    x = pixels(2, seed=1)
    hf_one = replace(hf_cfg, moe_every=1, moe_experts=1, moe_top_k=1)
    one = build_vision(hf_one, seed=0, backend="grouped_mm")
    assert not one.training  # as the dense HF tower loads
    with torch.no_grad():
        assert torch.equal(one(x), dense(x))
    cfg = load_config(["vision=hf", f"vision.hf_path={tmp_path}", "experiment=vit_moe",
                       "vision.select_layer=-1"])
    vlm = build_vlm(cfg, IMG)
    layers = vlm.vision_moe_layers()
    assert vlm.vision.moe_block_ids == [1] and len(layers) == 1
    assert layers[0].experts.w_in.shape == (8, hf_cfg.d_model, hf_cfg.d_ff)
    mlp = dense.blocks[1].mlp
    assert torch.equal(layers[0].experts.w_out, mlp.fc2.weight.t().expand(8, -1, -1))
    assert torch.equal(layers[0].experts.b_in, mlp.fc1.bias.expand(8, -1))
    with pytest.raises(ConfigError, match=r"^vision\.moe_d_expert: upcycling copies"):
        build_vision(replace(hf_one, moe_d_expert=8))


# ---- the VLM: losses, gradients, step totals -------------------------------------------


def _vlm(*overrides: str):
    cfg = load_config(["experiment=vit_moe", "moe.backend=torch", *overrides])
    return build_vlm(cfg, IMG, seed=0)


def _batch(model, n: int, seed: int = 0):
    """n samples of one image each: text, the placeholder run, text; labels = ids."""
    g = torch.Generator().manual_seed(seed)
    p = model.n_image_tokens
    ids = torch.randint(0, 256, (n, p + 10), generator=g)
    ids[:, 4:4 + p] = IMG
    return dict(input_ids=ids, labels=ids.clone(), pixel_values=pixels(n, seed))


def test_vision_routing_losses_enter_the_loss_and_reach_the_vision_routers():
    model = _vlm("vision.moe_aux_loss_coef=0.5", "routing.z_loss_coef=0.01")
    out = model(**_batch(model, 3))
    assert len(out.routing) == 2 and len(out.vision_routing) == 1
    want = sum(r.loss for r in out.routing) + sum(r.loss for r in out.vision_routing)
    torch.testing.assert_close(out.routing_loss, want)
    assert out.vision_routing[0].aux_loss > 0 and out.vision_routing[0].z_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.routing_loss)
    # The backpropagated loss carries the vision losses' gradient to the vision router.
    router = model.vision.blocks[1].mlp.router.weight
    rest = out.lm_loss + sum(r.loss for r in out.routing)
    vision = sum(r.loss for r in out.vision_routing)
    (g_loss,) = torch.autograd.grad(out.loss, [router], retain_graph=True)
    (g_rest,) = torch.autograd.grad(rest, [router], retain_graph=True)
    (g_vision,) = torch.autograd.grad(vision, [router])
    assert g_vision.abs().sum() > 1e-3 * g_rest.abs().sum() > 0
    torch.testing.assert_close(g_loss, g_rest + g_vision)
    # No balance loss anywhere: the routing loss is a constant 0, in the graph of nothing.
    model = _vlm("vision.moe_aux_loss_coef=0", "routing.aux_loss_coef=0", "routing.z_loss_coef=0")
    out = model(**_batch(model, 3))
    assert out.routing_loss == 0 and not out.routing_loss.requires_grad


@pytest.mark.parametrize("scope", ["sequence", "micro_batch"])
def test_vision_losses_are_shares_of_the_step(scope):
    """Split into two micro-batches with the step's totals (images counted), the shares of
    the vision z-loss and of the per-image balance loss add up to the whole batch's
    values; the micro-batch scope averages the micro-batches' own losses (by design)."""
    model = _vlm(f"routing.aux_loss_scope={scope}", "routing.z_loss_coef=0.01")
    batch = _batch(model, 4)
    whole = model(**batch, loss_norm=LossNorm(1, 1, 4, n_images=4)).vision_routing[0]
    halves = [model(**{k: v[i:i + 2] for k, v in batch.items()},
                    loss_norm=LossNorm(1, 1, 4, n_micro=2, n_images=4)).vision_routing[0]
              for i in (0, 2)]
    torch.testing.assert_close(halves[0].z_loss + halves[1].z_loss, whole.z_loss)
    if scope == "sequence":
        torch.testing.assert_close(halves[0].aux_loss + halves[1].aux_loss, whole.aux_loss)
    else:
        own = [model(**{k: v[i:i + 2] for k, v in batch.items()}).vision_routing[0].aux_loss
               for i in (0, 2)]
        torch.testing.assert_close(halves[0].aux_loss + halves[1].aux_loss, (own[0] + own[1]) / 2)
    with pytest.raises(ValueError, match="loss_norm.n_images is 0 but the batch has images"):
        model(**batch, loss_norm=LossNorm(1, 1, 4))


def test_a_batch_without_images_still_runs_the_moe_tower():
    """Every micro-batch has the same vision router outputs (an empty batch of images: no
    tokens, zero loads and losses), so metrics stack and expert-parallel ranks all join."""
    model = _vlm()
    batch = _batch(model, 2)
    text = batch["input_ids"].clone()
    text[text == IMG] = 65
    out = model(input_ids=text, labels=text)
    assert len(out.vision_routing) == 1
    assert out.vision_routing[0].counts.sum() == 0 and out.vision_routing[0].loss == 0
    assert torch.isfinite(out.loss)


def test_counts_vision_experts_as_routed():
    model = _vlm()
    dense = build_vlm(load_config(["moe.backend=torch"]), IMG, seed=0)
    c, cd = count_params(model), count_params(dense)
    layer = model.vision_moe_layers()[0]
    per_expert = sum(p.numel() for p in layer.experts.parameters()) // 8
    assert per_expert == 2 * 64 * 256 + 256 + 64  # an MLP: two weights and two biases
    assert c.routed_expert == cd.routed_expert + 8 * per_expert
    assert c.total - c.active == cd.total - cd.active + 6 * per_expert  # top-2 of 8


# ---- config ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    (["experiment=encoder_free", "vision.moe_every=1"], r"^vision\.moe_every: vision\.name=patch"),
    (["vision=none", "data=synthetic_text", "vision.moe_every=1"], r"^vision\.moe_every: vision\.name=none"),
    (["vision.moe_every=3"], r"^vision\.moe_every: 3 exceeds vision\.n_layers=2"),
    (["vision.moe_every=2", "vision.select_layer=0"], r"^vision\.moe_every: every MoE block comes after"),
    (["experiment=vit_moe", "vision.moe_top_k=9"], r"^vision\.moe_top_k: 9 exceeds vision\.moe_experts=8"),
    (["experiment=vit_moe", "vision.moe_experts=0"], r"^vision\.moe_experts: must be >= 1"),
    (["experiment=vit_moe", "vision.moe_d_expert=0"], r"^vision\.moe_d_expert: must be >= 1"),
    (["experiment=vit_moe", "vision.moe_aux_loss_coef=-1"], r"^vision\.moe_aux_loss_coef: must be >= 0"),
    (["experiment=vit_moe", "vision.moe_gate=expert_choice", "routing.bias_update_rate=0.01"],
     r"^vision\.moe_gate: expert_choice is balanced by construction"),
    (["vision.moe_gate=top1"], r"vision\.moe_gate: unknown value 'top1'"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides)


def test_top1_with_normalised_weights_warns():
    with pytest.warns(UserWarning, match="vision.moe_top_k=1 .* no gradient from the LM loss"):
        load_config(["experiment=vit_moe", "vision.moe_top_k=1", "vision.moe_renormalize=true"])


def test_vision_routers_take_routing_with_the_vision_keys():
    model = _vlm("routing=deepseek_v3", "vision.moe_top_k=3")
    r = model.vision_moe_layers()[0].router.cfg
    dec = model.decoder.routing_cfg
    assert (r.gate, r.top_k, r.renormalize, r.aux_loss_coef, r.routed_scaling) == \
        ("softmax_topk", 3, False, 0.01, 1.0)
    assert (r.z_loss_coef, r.bias_update_rate, r.aux_loss_scope) == \
        (dec.z_loss_coef, dec.bias_update_rate, dec.aux_loss_scope)
    assert isinstance(model.vision.blocks[1].mlp, MoELayer)
    assert not isinstance(model.vision.blocks[0].mlp, MoELayer)
