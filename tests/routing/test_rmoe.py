"""Layerwise recurrent router (RMoE, ``routing.recurrent``): the router chain against a
float64 loop written from the paper's equations (GRU gates r, z, n as ``nn.GRUCell``
defines them), forward and every gradient; the decoder carries the state over dense layers
and never routes padding; every gate and balancing option runs; activation checkpointing
changes nothing; counting, freezing, upcycling, export and config checks; a short run
resumes to the uninterrupted losses.

Legend: T tokens, D model width, R recurrent width, E experts, L MoE layers.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.config.schema import ConfigError, ModelConfig, MoEConfig, RoutingConfig, UpcycleConfig
from moe_vlm.model.counting import count_params, flops_per_token
from moe_vlm.model.decoder import build_model
from moe_vlm.parallel.parallelize import parallelize
from moe_vlm.parallel.runtime import Layout
from moe_vlm.routing.recurrent import RouterGRU
from moe_vlm.routing.router import Router
from moe_vlm.train import train
from moe_vlm.train.checkpoint import list_checkpoints
from moe_vlm.train.freeze import GROUPS
from moe_vlm.train.rundir import read_jsonl
from moe_vlm.upcycling import upcycle_into
from moe_vlm.upcycling.hf import hf_class_for

T, D, R, E, L = 13, 16, 6, 8, 3


def gru_reference(x, h, w_ih, w_hh, b_ih, b_hh):
    """The GRU cell from its equations (torch.nn.GRUCell's definition), gate by gate."""
    w_ir, w_iz, w_in = w_ih.chunk(3)
    w_hr, w_hz, w_hn = w_hh.chunk(3)
    b_ir, b_iz, b_in = b_ih.chunk(3)
    b_hr, b_hz, b_hn = b_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    return (1 - z) * n + z * h


def rmoe_reference(xs, projs, routers, gru):
    """Per MoE layer i: x'_i = x_i W_proj^i, h_i = GRU(x'_i, h_{i-1}) (h_0 = 0), logits_i =
    h_i W_router^i. Returns the states and the logits, one per layer."""
    h = torch.zeros(xs[0].shape[0], projs[0].shape[0], dtype=xs[0].dtype)
    states, logits = [], []
    for x, p, w in zip(xs, projs, routers):
        h = gru_reference(x @ p.T, h, *gru)
        states.append(h)
        logits.append(h @ w.T)
    return states, logits


def _gru(dim: int = R, seed: int = 0) -> RouterGRU:
    g = RouterGRU(dim).double()
    with torch.no_grad():  # random biases too, so the test sees every term
        gen = torch.Generator().manual_seed(seed)
        for p in g.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    return g


def _routers(cfg: RoutingConfig, seed: int = 1) -> list[Router]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(L):
        r = Router(D, E, cfg.top_k, cfg).double()
        r.init_weights(0.8, generator=gen)
        out.append(r)
    return out


def test_gru_cell_matches_torch_gru_cell():
    g = _gru()
    ref = torch.nn.GRUCell(R, R).double()
    ref.load_state_dict(g.state_dict())
    x, h = torch.randn(T, R, dtype=torch.float64), torch.randn(T, R, dtype=torch.float64)
    torch.testing.assert_close(g(x, h), ref(x, h), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g(x, None), ref(x), rtol=1e-12, atol=1e-12)
    assert g(x[:0], None).shape == (0, R)  # no real token: no rows, no error


def test_router_chain_matches_the_equations_forward_and_gradients():
    """Three recurrent routers in a row vs the float64 loop: the states, the experts and
    combine weights, the z-loss, and the gradients of every projection, router and GRU
    tensor and of the inputs."""
    cfg = RoutingConfig(top_k=2, recurrent=True, recurrent_dim=R, aux_loss_coef=0.0,
                        z_loss_coef=1.0)
    routers, gru = _routers(cfg), _gru()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    u = torch.randn(T, E, generator=gen, dtype=torch.float64)  # weights each assignment
    c = torch.randn(T, R, generator=gen, dtype=torch.float64)  # weights each state entry

    state, got_loss = None, 0.0
    for x, rt in zip(xs, routers):
        out = rt(x, state=state, gru=gru)
        state = out.state
        got_loss = got_loss + out.z_loss + (out.weight * u[out.token_idx, out.expert_idx]).sum() \
            + (state * c).sum()
    params = [*[rt.proj for rt in routers], *[rt.weight for rt in routers], *gru.parameters(), *xs]
    got_grads = torch.autograd.grad(got_loss, params)

    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    projs, ws = ref_params[:L], ref_params[L:2 * L]
    ref_gru, ref_xs = ref_params[2 * L:2 * L + 4], ref_params[2 * L + 4:]
    states, logits = rmoe_reference(ref_xs, projs, ws, ref_gru)
    want_loss = 0.0
    state = None
    for x, rt, h, lg in zip(xs, routers, states, logits):
        probs = lg.softmax(-1)  # [T, E]
        top = probs.topk(2, dim=-1).indices  # [T, K]
        w = probs.gather(-1, top)
        w = w / w.sum(-1, keepdim=True)
        out = rt(x.detach(), state=state, gru=gru)  # the same router's choice, for the order
        state = out.state
        assert torch.equal(out.expert_idx, top.reshape(-1))
        torch.testing.assert_close(out.state, h.detach(), rtol=1e-10, atol=1e-12)
        want_loss = want_loss + torch.logsumexp(lg, -1).square().mean() \
            + (w * u.gather(-1, top)).sum() + (h * c).sum()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12)
    want_grads = torch.autograd.grad(want_loss, ref_params)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.abs().sum() > 0, i
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-11, msg=f"param {i}")


def test_router_errors():
    cfg = RoutingConfig(top_k=2, recurrent=True, recurrent_dim=R)
    rt = _routers(cfg)[0]
    x = torch.randn(T, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="shared GRU"):
        rt(x)
    with pytest.raises(ValueError, match="state has shape"):
        rt(x, state=torch.zeros(T - 1, R, dtype=torch.float64), gru=_gru())


def test_recurrent_router_compiles_without_a_graph_break():
    """``parallel.compile`` compiles each block; the recurrent router (state, GRU) traces
    as one graph (fullgraph) with the eager results. The whole training loop compiled
    (grouped_mm, bf16, full checkpointing) was checked by hand to match eager."""
    cfg = RoutingConfig(top_k=2, recurrent=True, recurrent_dim=R, z_loss_coef=0.01)
    rt, gru = _routers(cfg)[0].float(), _gru().float()
    x, h = torch.randn(T, D), torch.randn(T, R)

    def route(x, h):
        o = rt(x, state=h, gru=gru)
        return o.weight, o.expert_idx, o.state, o.loss

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, h), route(x, h)):
        assert torch.equal(got, want)


def test_plain_router_has_no_recurrent_parameters():
    rt = Router(D, E, 2, RoutingConfig(top_k=2))
    assert rt.proj is None and rt.weight.shape == (E, D)
    assert [n for n, _ in rt.named_parameters()] == ["weight"]


# A decoder with dense layers between MoE layers: layers 0, 2, 4 MoE; 1, 3 dense.
TEXT = ["vision=none", "data=synthetic_text", "data.seq_len=24", "moe.backend=torch",
        "model.n_layers=5", "model.moe_every=2", "experiment=rmoe", "routing.recurrent_dim=8"]


def _decoder(*overrides: str, dtype=torch.float32):
    cfg = load_config([*TEXT, *overrides])
    return cfg, build_model(cfg.model, cfg.moe, cfg.routing, seed=0).to(dtype)


def _batch(cfg, b: int = 3, s: int = 24):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 15:] = False  # right padding
    mask[2, 7:] = False
    return ids, mask


def test_decoder_state_over_dense_layers_matches_the_equations_and_skips_padding():
    """In float64, the states the decoder hands from MoE layer to MoE layer (over the dense
    layers between them) equal the loop on the routers' inputs; one row per real token;
    padded tokens' ids change nothing."""
    cfg, model = _decoder(dtype=torch.float64)
    assert model.schedule == [True, False, True, False, True]
    ids, mask = _batch(cfg)
    inputs = []
    hooks = [m.router.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for m in model.moe_layers()]
    out = model(input_ids=ids, labels=ids.roll(-1, 1), token_mask=mask)
    for hk in hooks:
        hk.remove()
    n_real = int(mask.sum())
    assert [x.shape[0] for x in inputs] == [n_real] * 3
    moes = model.moe_layers()
    gru = list(model.router_gru.parameters())
    states, _ = rmoe_reference(inputs, [m.router.proj for m in moes], [m.router.weight for m in moes], gru)
    for r, h in zip(out.routing, states):
        torch.testing.assert_close(r.state, h, rtol=1e-10, atol=1e-13)
    other = ids.masked_fill(~mask, 7)
    again = model(input_ids=other, labels=ids.roll(-1, 1), token_mask=mask)
    for a, b in zip(out.routing, again.routing):
        assert torch.equal(a.state, b.state)
    out.loss.backward()
    for name, p in model.named_parameters():
        if "router_gru." in name or name.endswith("router.proj"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("opts", [
    ["routing.gate=softmax_topk", "routing.top_k=2", "routing.aux_loss_scope=sequence"],
    ["routing.gate=sigmoid_topk", "routing.top_k=2", "routing.bias_update_rate=0.01",
     "routing.aux_loss_coef=0"],
    ["routing.gate=expert_choice", "routing.capacity_factor=1.0", "routing.aux_loss_coef=0"],
    ["routing.gate=softmax_topk", "routing.capacity_factor=0.5", "routing.z_loss_coef=0.01",
     "routing.aux_loss_scope=global_batch", "routing.renormalize_after_drop=true"],
], ids=["softmax_seq_aux", "sigmoid_bias", "expert_choice", "capacity_zloss"])
def test_every_gate_and_balancing_option_trains_the_recurrent_router(opts):
    cfg, model = _decoder(*opts)
    ids, mask = _batch(cfg)
    out = model(input_ids=ids, labels=ids.roll(-1, 1), token_mask=mask)
    assert torch.isfinite(out.loss)
    assert all(r.state.shape == (int(mask.sum()), 8) for r in out.routing)
    out.loss.backward()
    assert model.router_gru.weight_ih.grad.abs().sum() > 0
    assert all(m.router.proj.grad.abs().sum() > 0 for m in model.moe_layers())
    if cfg.routing.bias_update_rate:
        for m, r in zip(model.moe_layers(), out.routing):
            m.update_bias(r.counts, cfg.routing.bias_update_rate)
        assert model.moe_layers()[0].router.bias.abs().sum() > 0


def test_modality_routers_read_the_recurrent_state():
    """``routing.modality=routers``: the image router is [E, R] too, and image rows take
    its logits of the same state."""
    cfg = RoutingConfig(top_k=2, recurrent=True, recurrent_dim=R, modality="routers")
    rt = _routers(cfg)[0]
    assert rt.image_weight.shape == (E, R)
    x = torch.randn(T, D, dtype=torch.float64)
    img = torch.arange(T) % 2 == 0
    out = rt(x, is_image=img, gru=_gru())
    with torch.no_grad():
        rt.image_weight.copy_(rt.weight)  # same router for both: image rows route as text
    same = rt(x, is_image=img, gru=_gru())
    text = rt(x, gru=_gru())
    assert torch.equal(same.expert_idx, text.expert_idx)
    assert not torch.equal(out.expert_idx, text.expert_idx)


def test_full_activation_checkpointing_changes_no_loss_or_gradient():
    cfg, plain = _decoder("routing.z_loss_coef=0.01")
    cfg_ac, ckpt = _decoder("routing.z_loss_coef=0.01", "parallel.activation_checkpointing=full")
    parallelize(ckpt, Layout(device=torch.device("cpu")), cfg_ac)
    ids, mask = _batch(cfg)
    res = []
    for m in (plain, ckpt):
        out = m(input_ids=ids, labels=ids.roll(-1, 1), token_mask=mask)
        out.loss.backward()
        res.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert torch.equal(res[0][0], res[1][0])
    for n, g in res[0][1].items():
        assert torch.equal(res[1][1][n], g), n


def test_counting_freezing_and_export():
    cfg, model = _decoder()
    _, plain = _decoder("routing.recurrent=false")
    gru = sum(p.numel() for p in model.router_gru.parameters())
    extra = gru + sum(m.router.proj.numel() for m in model.moe_layers()) \
        + sum(m.router.weight.numel() - p.router.weight.numel()
              for m, p in zip(model.moe_layers(), plain.moe_layers()))
    c, cp = count_params(model), count_params(plain)
    assert c.total - cp.total == extra == c.active - cp.active  # router parameters: all active
    # the shared GRU runs in each of the 3 MoE layers: its matmuls count 3 times
    assert flops_per_token(model, 24) - flops_per_token(plain, 24) == 3 * 2 * (extra + 2 * gru)
    names = [n for n, _ in model.named_parameters()]
    router = {n for n in names if GROUPS["router"](n)}
    assert {n for n in names if "router_gru." in n or n.endswith("router.proj")} <= router
    assert router <= {n for n in names if GROUPS["moe"](n)}
    assert not any(GROUPS["experts"](n) for n in router)
    with pytest.raises(ValueError, match="routing.recurrent=true"):
        hf_class_for(cfg.model, cfg.moe, cfg.routing)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="routing.recurrent_dim"):
        load_config([*TEXT, "routing.recurrent_dim=0"])
    with pytest.raises(ConfigError, match="routing.recurrent.*has none"):
        load_config([*TEXT, "model.moe_every=0"])
    vlm = load_config(["experiment=rmoe", "vision.moe_every=1"])  # the ViT's MoE: not recurrent
    from moe_vlm.config.vision_moe import vision_routing
    assert vlm.routing.recurrent and not vision_routing(vlm.vision, vlm.routing).recurrent


@pytest.mark.parametrize("method,moe,top_k", [("copy", MoEConfig(n_experts=4, d_expert=64), 2),
                                              ("split", MoEConfig(n_experts=2, d_expert=64,
                                                                  granularity=4), 1)])
def test_upcycle_into_a_recurrent_target_keeps_the_dense_function(method, moe, top_k):
    """The new router tensors keep the target's fresh init (router rows shared by a
    replica's shards), and copy/split still give the dense model's logits at step 0."""
    base = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                       moe_every=0, max_seq_len=16, init_std=0.1)
    dense = build_model(base, MoEConfig(), RoutingConfig(), seed=0).eval()
    routing = RoutingConfig(top_k=top_k, recurrent=True, recurrent_dim=8)
    target = build_model(replace(base, moe_every=1), moe, routing, seed=1).eval()
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    rep = upcycle_into(target, dense.state_dict(), UpcycleConfig(method=method))
    assert rep.function_preserving, rep.reason
    sd = target.state_dict()
    for k in fresh:
        if "router_gru." in k or k.endswith("router.proj"):
            assert torch.equal(sd[k], fresh[k]), k
    m = 4 if method == "split" else 1
    w = sd["layers.0.ffn.router.weight"]  # [E, R]
    assert torch.equal(w, fresh["layers.0.ffn.router.weight"][::m].repeat_interleave(m, 0))
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-6)


def test_short_run_stops_and_resumes_to_the_uninterrupted_losses(tiny_config, tmp_path):
    common = ["experiment=rmoe", "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=3",
              "train.log_every=1", "data.seq_len=24", "moe.backend=torch"]
    full = tiny_config(*common, f"run.dir={tmp_path}/full")
    assert train(full, full.run.dir)["status"] == "completed"
    part = tiny_config(*common, f"run.dir={tmp_path}/part", "train.stop_after_steps=3")
    train(part, part.run.dir)
    rest = tiny_config(*common, f"run.dir={tmp_path}/part")
    assert train(rest, rest.run.dir)["resumed_from"] == 3
    rows = [[{k: v for k, v in r.items() if k != "tokens_per_s"}
             for r in read_jsonl(tmp_path / d / "metrics.jsonl")] for d in ("part", "full")]
    assert rows[0] == rows[1]
    got, want = (torch.load(list_checkpoints(tmp_path / d / "checkpoints")[-1][1],
                            weights_only=False)["model"] for d in ("part", "full"))
    assert "router_gru.weight_hh" in want and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
