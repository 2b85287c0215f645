"""MoTE: ternary experts (absmean weights, absmax activations, straight-through gradients)
against values worked by hand and a token-by-token reference from the paper's equations;
the upcycling recipe (frozen full-precision shared expert = the dense FFN); the expert
memory report; refusals; a short run of the preset.

Legend: T tokens, D model width, F expert width, E experts, K experts per token.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moe_vlm.config import load_config
from moe_vlm.config.schema import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    RoutingConfig,
    TrainConfig,
    UpcycleConfig,
)
from moe_vlm.model.decoder import build_model
from moe_vlm.model.expert_memory import expert_memory, layer_expert_memory
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.moe import MoELayer
from moe_vlm.model.ternary import (
    EPS,
    absmax_quantize,
    quantize_activations,
    ternary_codes,
    ternary_weight,
)
from moe_vlm.model.ternary_experts import TernaryExperts
from moe_vlm.train import train
from moe_vlm.train.freeze import apply_trainable
from moe_vlm.train.optim import build_optimizer
from moe_vlm.upcycling.hf_export import hf_class_for
from moe_vlm.upcycling.upcycle import upcycle_into

# ----------------------------------------------------------------------------- quantisers

# Two experts, each [R=2, C=4] holding gate (columns 0-1) and up (columns 2-3).
W = torch.tensor([
    [[0.30, -0.10, 1.0, 0.0],
     [0.05, -0.60, -2.0, 0.0]],
    [[0.00, 0.00, 0.5, 0.5],
     [0.00, 0.00, 0.5, -0.5]],
], dtype=torch.float64)
# expert 0 gate: mean |W| = (0.3 + 0.1 + 0.05 + 0.6) / 4 = 0.2625; W / 0.2625 = 1.14, -0.38,
#   0.19, -2.29 -> round 1, 0, 0, -2 -> clip 1, 0, 0, -1
# expert 0 up: mean = 3 / 4 = 0.75; 1.33, 0, -2.67, 0 -> 1, 0, -1 (clipped), 0
# expert 1 gate: all zero: scale clamped to EPS, codes 0; up: mean 0.5, codes exactly +-1
CODES = torch.tensor([[[1, 0, 1, 0], [0, -1, -1, 0]],
                      [[0, 0, 1, 1], [0, 0, 1, -1]]], dtype=torch.float64)
SCALES = torch.tensor([[0.2625, 0.75], [EPS, 0.5]], dtype=torch.float64)
W_Q = torch.tensor([[[0.2625, 0, 0.75, 0], [0, -0.2625, -0.75, 0]],
                    [[0, 0, 0.5, 0.5], [0, 0, 0.5, -0.5]]], dtype=torch.float64)


def test_ternary_codes_and_values_by_hand():
    codes, scales = ternary_codes(W, n_mats=2)
    assert torch.equal(codes, CODES)
    torch.testing.assert_close(scales, SCALES, rtol=0, atol=1e-15)
    torch.testing.assert_close(ternary_weight(W, n_mats=2), W_Q, rtol=0, atol=1e-15)
    assert set(ternary_weight(W, 2).unique().tolist()) == {-0.75, -0.2625, 0.0, 0.2625, 0.5, -0.5, 0.75}


def test_one_scale_per_matrix_when_the_columns_hold_one():
    # n_mats=1: expert 0 is one matrix, mean = (0.3+0.1+0.05+0.6+1+2) / 8 = 0.50625
    codes, scales = ternary_codes(W, n_mats=1)
    torch.testing.assert_close(scales[:, 0], torch.tensor([0.50625, 0.25], dtype=torch.float64))
    # 0.3/0.50625 = 0.59 -> 1; -0.1 -> 0; 1.0 -> 1.98 -> 1 (clip of 2); 0.05 -> 0; -0.6 -> -1
    assert torch.equal(codes[0], torch.tensor([[1., 0, 1, 0], [0, -1, -1, 0]], dtype=torch.float64))


def test_all_zero_matrix_and_half_rounds_to_even():
    assert torch.equal(ternary_weight(torch.zeros(2, 3, 4)), torch.zeros(2, 3, 4))
    # mean |W| = 1: 1.5 -> round 2 -> clip 1; 0.5 -> 0 (half to even); -1.0 -> -1
    w = torch.tensor([[[1.5, 0.5, -1.0, 1.0]]])
    assert torch.equal(ternary_weight(w), torch.tensor([[[1.0, 0.0, -1.0, 1.0]]]))


def test_scales_are_per_expert():
    """Scaling one expert changes no other expert's codes or scale; quantising a slice of
    the experts (a rank's share under expert parallelism) is the slice of the whole."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, 8, generator=g)
    w2 = w.clone()
    w2[3] *= 100.0
    q, q2 = ternary_weight(w, 2), ternary_weight(w2, 2)
    keep = [0, 1, 2, 4]
    assert torch.equal(q[keep], q2[keep])
    torch.testing.assert_close(q2[3], q[3] * 100.0)
    assert torch.equal(ternary_weight(w[2:4], 2), q[2:4])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[E, R, C\]"):
        ternary_codes(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="do not split into 3"):
        ternary_codes(torch.zeros(1, 2, 4), n_mats=3)
    with pytest.raises(ValueError, match="bits=1"):
        absmax_quantize(torch.zeros(2, 2), 1)


def test_absmax_activations_by_hand():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.0]], dtype=torch.float64)
    # 8 bits: q = 127; row 0: s = 1: 127, -63.5 -> -64 (half to even), 31.75 -> 32
    want8 = torch.tensor([[1.0, -64 / 127, 32 / 127], [0, 0, 0], [-2.0, 2 * 64 / 127, 0]],
                         dtype=torch.float64)  # row 2: s = 2: -127, 63.5 -> 64, 0
    torch.testing.assert_close(absmax_quantize(x, 8), want8, rtol=0, atol=1e-15)
    # 2 bits: q = 1: levels -s, 0, s
    want2 = torch.tensor([[1.0, 0.0, 0.0], [0, 0, 0], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(absmax_quantize(x, 2), want2, rtol=0, atol=0)
    assert quantize_activations(x, 0) is x
    assert absmax_quantize(x.float(), 8).dtype == torch.float32


def test_straight_through_gradients_by_hand():
    """dL/dW = dL/dW_q and dL/dx = dL/dx_q, for L = sum((Q_a(x) @ Q_w(W)[0]) ** 2)."""
    w = W.clone().requires_grad_(True)
    x = torch.tensor([[0.7, -0.2], [0.1, 0.4]], dtype=torch.float64, requires_grad=True)
    xq = quantize_activations(x, 8)
    y = xq @ ternary_weight(w, 2)[0]  # [2, 4]
    (y ** 2).sum().backward()
    scale = 127 / x.detach().abs().amax(1, keepdim=True)
    xq_hand = torch.round(x.detach() * scale) / scale
    y_hand = xq_hand @ W_Q[0]
    gw = torch.zeros_like(W)
    gw[0] = xq_hand.T @ (2 * y_hand)  # dL/dW_q for expert 0; expert 1 unused: zeros
    torch.testing.assert_close(w.grad, gw, rtol=0, atol=1e-14)
    torch.testing.assert_close(x.grad, (2 * y_hand) @ W_Q[0].T, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- MoE layer

D, FE, E, K, FS = 8, 8, 5, 2, 4


def make_layer(act_bits: int, backend: str = "torch") -> MoELayer:
    layer = MoELayer(D, MoESizes(E, FE, K, FS, 1), RoutingConfig(top_k=K, renormalize=False, aux_loss_coef=0.0), backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    layer.experts.quant = TernaryExperts(act_bits)
    return layer


def hand_quant(w: torch.Tensor, n_mats: int) -> torch.Tensor:
    """BitNet b1.58's absmean ternary, one expert and one matrix at a time, with the
    straight-through trick ``w + (q - w).detach()``."""
    out = []
    for e in range(w.shape[0]):
        mats = []
        for m in w[e].detach().chunk(n_mats, dim=1):
            gamma = max(m.abs().mean().item(), EPS)
            mats.append(torch.clamp(torch.round(m / gamma), -1, 1) * gamma)
        out.append(torch.cat(mats, dim=1))
    return w + (torch.stack(out) - w).detach()


def hand_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 0:
        return x
    scale = (2 ** (bits - 1) - 1) / x.detach().abs().max().clamp(min=EPS)
    # BitNet's order of operations: a value at k + 1/2 on the grid (frequent here: the
    # hidden activations are sums of grid products) rounds the same way only in the same order
    return x + (torch.round(x.detach() * scale) / scale - x).detach()


def moe_ternary_ref(layer: MoELayer, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Token by token (x [T, D]): softmax top-k over the router logits, each chosen
    expert's SwiGLU with hand-quantised weights and activations, plus the shared expert
    in full precision."""
    w_in, w_out = hand_quant(layer.experts.w_in, 2), hand_quant(layer.experts.w_out, 1)
    shared_in, shared_out = layer.shared.w_in.weight, layer.shared.w_out.weight  # [2Fs, D], [D, Fs]
    rows = []
    for t in range(x.shape[0]):
        p = torch.softmax(layer.router.weight @ x[t], -1)  # [E]
        top = p.topk(K).indices
        y = torch.zeros_like(x[t])
        for e in top.tolist():
            gate, up = (hand_act(x[t], bits) @ w_in[e]).chunk(2)
            y = y + p[e] * (hand_act(F.silu(gate) * up, bits) @ w_out[e])
        sg, su = (shared_in @ x[t]).chunk(2)
        rows.append(y + shared_out @ (F.silu(sg) * su))
    return torch.stack(rows)


@pytest.mark.parametrize("bits", [8, 0, 4])
def test_moe_layer_matches_the_hand_quantised_reference(bits):
    """Forward and every gradient (input, latent expert weights, router, shared expert)."""
    layer = make_layer(bits).double()
    ref_layer = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 7, D, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.reshape(7, D).clone().requires_grad_(True)
    y, _ = layer(x1)
    y_ref = moe_ternary_ref(ref_layer, x2, bits)
    torch.testing.assert_close(y.reshape(7, D), y_ref, rtol=1e-12, atol=1e-12)
    probe = torch.randn(7, D, generator=g, dtype=torch.float64)
    (y.reshape(7, D) * probe).sum().backward()
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(x1.grad.reshape(7, D), x2.grad, rtol=1e-10, atol=1e-12)
    for (name, p), (_, p_ref) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert layer.experts.w_in.grad.abs().sum() > 0


def test_ternary_layer_is_not_the_full_precision_one():
    """The quantisation is on: the same layer without it gives a different output."""
    layer = make_layer(8)
    x = torch.randn(1, 5, D, generator=torch.Generator().manual_seed(3))
    y, _ = layer(x)
    layer.experts.quant = None
    y_fp, _ = layer(x)
    assert (y - y_fp).abs().max() > 1e-3


@pytest.mark.parametrize("bits", [8, 0])
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_backends_agree_with_torch(backend, bits):
    """grouped_mm and triton (Triton's CPU interpreter here) on quantised weights (and, at
    8 bits, the unfused pair of grouped GEMMs) equal the torch loop, output and gradients."""
    from moe_vlm.model.experts import grouped_mm_supported, triton_supported

    why = grouped_mm_supported(torch.device("cpu"), torch.float32, D, FE) if backend == "grouped_mm" \
        else triton_supported(torch.device("cpu"), torch.float32)
    if why:
        pytest.skip(why)
    x = torch.randn(1, 9, D, generator=torch.Generator().manual_seed(4))
    out = {}
    for b in ("torch", backend):
        layer = make_layer(bits, b)
        xb = x.clone().requires_grad_(True)
        y, _ = layer(xb)
        (y ** 2).sum().backward()
        out[b] = (y.detach(), xb.grad, layer.experts.w_in.grad, layer.experts.w_out.grad)
    for a, b in zip(out["torch"], out[backend]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_decoder_installs_ternary_experts_only_when_asked():
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      n_dense_layers=1, max_seq_len=16)
    off = build_model(cfg, MoEConfig(n_experts=4, n_shared=1, d_expert=8), RoutingConfig(), "cpu")
    on = build_model(cfg, MoEConfig(n_experts=4, n_shared=1, d_expert=8, ternary=True,
                                    ternary_act_bits=4), RoutingConfig(), "cpu")
    assert all(m.experts.quant is None for m in off.moe_layers())
    assert [m.experts.quant for m in on.moe_layers()] == [TernaryExperts(4)]
    assert "quant=TernaryExperts(act_bits=4)" in repr(on.moe_layers()[0].experts)


# ----------------------------------------------------------------------------- upcycling recipe

def test_mote_upcycling_shared_expert_is_the_frozen_dense_ffn():
    """copy + shared whole: the shared expert and every routed expert start as the dense
    FFN; with train.trainable=[router, experts] the shared expert gets no gradient, is in
    no optimiser group and does not move in a step, while the routed experts do."""
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      moe_every=0, max_seq_len=16)
    dense = build_model(cfg, MoEConfig(), RoutingConfig(), "cpu", seed=5)
    moe_cfg = ModelConfig(**{**cfg.__dict__, "moe_every": 1})
    model = build_model(moe_cfg, MoEConfig(n_experts=3, n_shared=1, d_expert=32, ternary=True),
                        RoutingConfig(top_k=1), "cpu", seed=6)
    upcycle_into(model, dense.state_dict(), UpcycleConfig(method="copy", shared="whole"))
    sd = dense.state_dict()
    for i, layer in enumerate(model.moe_layers()):
        w_in, w_out = sd[f"layers.{i}.ffn.w_in.weight"], sd[f"layers.{i}.ffn.w_out.weight"]
        assert torch.equal(layer.shared.w_in.weight, w_in) and torch.equal(layer.shared.w_out.weight, w_out)
        for e in range(3):
            assert torch.equal(layer.experts.w_in[e], w_in.T) and torch.equal(layer.experts.w_out[e], w_out.T)
    apply_trainable(model, ["router", "experts"])
    shared = [p for n, p in model.named_parameters() if ".ffn.shared." in n]
    routed = [p for n, p in model.named_parameters() if ".ffn.experts." in n]
    assert shared and not any(p.requires_grad for p in shared)
    assert routed and all(p.requires_grad for p in routed)
    opt = build_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in shared) and all(id(p) in in_opt for p in routed)
    before = [p.detach().clone() for p in shared + routed]
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(7))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in shared) and all(p.grad is not None for p in routed)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(shared, before[:len(shared)]))
    assert not torch.equal(routed[0], before[len(shared)])


# ----------------------------------------------------------------------------- memory report

def test_layer_memory_by_hand():
    m = layer_expert_memory(3, n_experts=4, d_model=64, d_expert=256, d_shared=256)
    # routed: 4 experts x 3 matrices x 64 x 256 = 196608 weights; bf16: 393216 bytes
    assert (m.layer, m.routed_params, m.scales, m.shared_params) == (3, 196608, 12, 49152)
    assert m.routed_bf16_bytes == 393216 and m.shared_bf16_bytes == 98304
    # 196608 x log2(3) = 311616.3 bits = 38952.04 bytes, + 12 bf16 scales (24 bytes) -> 38977
    assert m.routed_ternary_bytes == 38977
    # 2 bits: 49152 bytes + 24
    assert m.routed_packed_bytes == 49176


def test_model_memory_counts_moe_layers_only():
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=32,
                      n_dense_layers=1, max_seq_len=16)
    moe = MoEConfig(n_experts=4, n_shared=1, d_expert=8, granularity=2, ternary=True)
    model = build_model(cfg, moe, RoutingConfig(), "cpu")
    rep = expert_memory(model, ternary=True)
    # granularity 2: 8 experts of width 4; per layer 8 x 3 x 16 x 4 = 1536 weights, 24 scales;
    # shared 3 x 16 x 8 = 384 weights
    assert [lay["layer"] for lay in rep["layers"]] == [1, 2]
    assert rep["layers"][0]["routed_params"] == 1536 and rep["layers"][0]["scales"] == 24
    assert rep["total"]["routed_params"] == 3072 and rep["total"]["shared_params"] == 768
    # per layer ternary: 1536 x log2(3) / 8 = 304.3 + 48 -> 353; bf16 shared 768 per layer
    assert rep["total"]["routed_ternary_bytes"] == 2 * 353
    assert rep["expert_bytes"] == 2 * 353 + 2 * 768
    assert expert_memory(model, ternary=False)["expert_bytes"] == 2 * 3072 + 2 * 768


# ----------------------------------------------------------------------------- config, export, run

@pytest.mark.parametrize("overrides, key", [
    (["moe.ternary_act_bits=1"], "moe.ternary_act_bits"),
    (["moe.ternary_act_bits=17"], "moe.ternary_act_bits"),
    (["moe.ternary=true", "model.moe_every=0"], "moe.ternary"),
])
def test_bad_ternary_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["vision=none", "data=synthetic_text", *overrides])


def test_hf_export_refuses_ternary_experts():
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      max_seq_len=16)
    routing = RoutingConfig(top_k=2, renormalize=True)
    assert hf_class_for(cfg, MoEConfig(n_experts=4, d_expert=8), routing)
    with pytest.raises(ValueError, match=r"moe\.ternary=true"):
        hf_class_for(cfg, MoEConfig(n_experts=4, d_expert=8, ternary=True), routing)


def test_mote_preset_trains_from_a_dense_checkpoint(tiny_config, tmp_path):
    dense = tiny_config("model.moe_every=0", "train.max_steps=2", "train.ckpt_every=2",
                        "train.eval_every=2", f"run.dir={tmp_path / 'dense'}")
    train(dense, dense.run.dir)
    cfg = tiny_config("experiment=mote", f"upcycle.source={tmp_path / 'dense'}",
                      "train.max_steps=3", "train.eval_every=3", f"run.dir={tmp_path / 'mote'}")
    assert cfg.moe.ternary and cfg.moe.ternary_act_bits == 8 and cfg.upcycle.shared == "whole"
    s = train(cfg, cfg.run.dir)
    assert s["status"] == "completed" and math.isfinite(s["final_eval_loss"])
    assert s["upcycle"]["method"] == "copy" and s["expert_memory"]["ternary"]
    assert s["expert_bytes"] == s["expert_memory"]["expert_bytes"] < \
        s["expert_memory"]["total"]["routed_bf16_bytes"]
    shared = sum(lay["shared_params"] for lay in s["expert_memory"]["layers"])
    assert s["params_total"] - s["params_trainable"] >= shared  # the shared experts are frozen
