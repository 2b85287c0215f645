"""MoELayer: router + routed experts + shared experts, against dense and hand-written
references, finite differences, and across expert backends.

Legend: B batch, S sequence, T = B*S tokens, D model width, F expert width,
E experts, K experts per token.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.model import experts as experts_mod
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.layers import SwiGLU
from moe_vlm.model.moe import MoELayer


# ----------------------------------------------------------------------------- helpers

def make_layer(d_model, n_experts, d_expert, top_k, d_shared=0, backend="torch",
               seed=0, std=0.5, **routing):
    routing.setdefault("aux_loss_coef", 0.0)
    layer = MoELayer(d_model, MoESizes(n_experts, d_expert, top_k, d_shared, 1),
                     RoutingConfig(top_k=top_k, **routing), backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        layer.router.bias.zero_()
    return layer


def swiglu_ref(x, w_in, w_out):
    """x [..., D], w_in [D, 2F] (gate | up), w_out [F, D]."""
    f = w_in.shape[1] // 2
    return (F.silu(x @ w_in[:, :f]) * (x @ w_in[:, f:])) @ w_out


def moe_ref(layer: MoELayer, x):
    """Routed + shared output, token by token, in x's dtype (softmax/sigmoid top-k)."""
    cfg, k = layer.router.cfg, layer.sizes.top_k
    flat = x.reshape(-1, x.shape[-1])
    wr = layer.router.weight.to(x.dtype)
    w_in, w_out = layer.experts.w_in.to(x.dtype), layer.experts.w_out.to(x.dtype)
    rows = []
    for t in range(flat.shape[0]):
        logits = wr @ flat[t]  # [E]
        if cfg.gate == "softmax_topk":
            p = torch.softmax(logits, -1)
        else:
            p = torch.sigmoid(logits)
        idx = p.topk(k).indices
        w = p[idx]
        if cfg.gate == "sigmoid_topk" or cfg.renormalize:
            w = w / w.sum()
        w = w * cfg.routed_scaling
        y = sum(w[j] * swiglu_ref(flat[t], w_in[idx[j]], w_out[idx[j]]) for j in range(k))
        if layer.shared is not None:
            y = y + swiglu_ref(flat[t], layer.shared.w_in.weight.T.to(x.dtype),
                               layer.shared.w_out.weight.T.to(x.dtype))
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


def topk_margin(layer: MoELayer, x):
    """Smallest gap between the k-th and (k+1)-th router probability over tokens."""
    logits = x.detach().reshape(-1, x.shape[-1]).double() @ layer.router.weight.detach().double().T
    p = torch.softmax(logits, -1).sort(-1, descending=True).values
    k = layer.sizes.top_k
    return float((p[:, k - 1] - p[:, k]).min())


# ----------------------------------------------------------------------------- dense limit

@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_single_expert_top1_equals_dense_swiglu(backend):
    d, f = 8, 4
    layer = make_layer(d, 1, f, 1, backend=backend, gate="softmax_topk", renormalize=True)
    dense = SwiGLU(d, f)
    with torch.no_grad():
        dense.w_in.weight.copy_(layer.experts.w_in[0].T)  # [2F, D]
        dense.w_out.weight.copy_(layer.experts.w_out[0].T)  # [D, F]
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(1))
    go = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, r = layer(x1)
    y_dense = dense(x2)
    assert torch.equal(r.weight, torch.ones(6))
    assert torch.equal(r.expert_idx, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(y, y_dense)
    (y * go).sum().backward()
    (y_dense * go).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.experts.w_in.grad[0], dense.w_in.weight.grad.T)
    torch.testing.assert_close(layer.experts.w_out.grad[0], dense.w_out.weight.grad.T)
    # weight == p / p == 1 whatever the router says: its gradient vanishes
    torch.testing.assert_close(layer.router.weight.grad, torch.zeros(1, d), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("routing", [
    dict(gate="softmax_topk", renormalize=True),
    dict(gate="softmax_topk", renormalize=False),
    dict(gate="softmax_topk", renormalize=True, routed_scaling=2.5),
    dict(gate="sigmoid_topk"),
], ids=["softmax_renorm", "softmax_raw", "scaled", "sigmoid"])
@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_layer_matches_token_loop_reference(backend, routing):
    layer = make_layer(8, 4, 4, 2, backend=backend, std=0.3, **routing)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    y, r = layer(x)
    with torch.no_grad():
        y_ref = moe_ref(copy.deepcopy(layer).double(), x.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    assert r.token_idx.numel() == 10 * 2


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_shared_expert_is_added_to_routed_output(backend):
    d, f, fs = 8, 4, 8
    layer = make_layer(d, 4, f, 2, d_shared=fs, backend=backend, std=0.3)
    routed_only = make_layer(d, 4, f, 2, d_shared=0, backend=backend)
    missing, unexpected = routed_only.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["shared.w_in.weight", "shared.w_out.weight"]
    assert layer.shared.w_in.weight.shape == (2 * fs, d)
    x = torch.randn(3, 4, d, generator=torch.Generator().manual_seed(4))
    y, _ = layer(x)
    y_routed, _ = routed_only(x)
    shared = swiglu_ref(x, layer.shared.w_in.weight.T, layer.shared.w_out.weight.T)
    assert shared.abs().max() > 1e-2  # the shared path matters here
    torch.testing.assert_close(y, y_routed + shared, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y_ref = moe_ref(copy.deepcopy(layer).double(), x.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)


def test_fully_dropped_token_gets_only_shared_output():
    """capacity_factor small: dropped tokens skip the routed experts entirely."""
    d = 8
    layer = make_layer(d, 4, 4, 1, d_shared=4, std=0.3, capacity_factor=0.25)
    x = torch.randn(1, 8, d, generator=torch.Generator().manual_seed(5))
    y, r = layer(x)
    routed = set(r.token_idx.tolist())
    dropped = [t for t in range(8) if t not in routed]
    assert dropped, "capacity 0.25 must drop some tokens"
    flat = x.reshape(8, d)
    torch.testing.assert_close(y.reshape(8, d)[dropped], layer.shared(flat[dropped]))


# ----------------------------------------------------------------------------- gradcheck

GC = dict(d=4, f=3, n_exp=3, k=2, t=5)


def gradcheck_layer(seed=8):
    layer = make_layer(GC["d"], GC["n_exp"], GC["f"], GC["k"], backend="torch", seed=seed,
                       gate="softmax_topk", renormalize=True).double()
    x = torch.randn(1, GC["t"], GC["d"], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed + 100))
    assert topk_margin(layer, x) > 0.02  # no near-ties: selection is locally constant
    return layer, x


def layer_fn_of_weights(layer, x):
    names = ("experts.w_in", "experts.w_out", "router.weight")
    params = dict(layer.named_parameters())

    def fn(w_in, w_out, w_router):
        out, _ = torch.func.functional_call(
            layer, {**params, names[0]: w_in, names[1]: w_out, names[2]: w_router}, (x,))
        return out
    leaves = tuple(params[n].detach().clone().requires_grad_() for n in names)
    return fn, leaves


def test_gradcheck_input_fp32_precision():
    """Finite differences with a step suited to the fp32 math inside the layer."""
    layer, x = gradcheck_layer()
    assert torch.autograd.gradcheck(lambda v: layer(v)[0], (x.requires_grad_(),),
                                    eps=1e-3, atol=1e-3, rtol=1e-2)


def test_gradcheck_weights_fp32_precision():
    layer, x = gradcheck_layer()
    fn, leaves = layer_fn_of_weights(layer, x)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-3, atol=1e-3, rtol=1e-2)



def test_gradcheck_input_fp64():
    layer, x = gradcheck_layer()
    assert torch.autograd.gradcheck(lambda v: layer(v)[0], (x.requires_grad_(),), eps=1e-6)


def test_gradcheck_weights_fp64():
    layer, x = gradcheck_layer()
    fn, leaves = layer_fn_of_weights(layer, x)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6)


# ----------------------------------------------------------------------------- backends

@pytest.fixture
def backend_spy(monkeypatch):
    calls = []

    def wrap(name, real):
        def fn(*args):
            calls.append(name)
            return real(*args)
        return lambda: fn

    monkeypatch.setitem(experts_mod.BACKENDS, "torch", wrap("torch", experts_mod.swiglu_torch))
    monkeypatch.setitem(experts_mod.BACKENDS, "grouped_mm",
                        wrap("grouped_mm", experts_mod.swiglu_grouped_mm))
    return calls


@pytest.mark.parametrize("routing", [
    dict(gate="softmax_topk", aux_loss_coef=0.01, z_loss_coef=1e-3),
    dict(gate="sigmoid_topk"),
    dict(gate="softmax_topk", capacity_factor=0.5),
    dict(gate="expert_choice"),
], ids=["softmax", "sigmoid", "dropping", "expert_choice"])
def test_torch_and_grouped_mm_layers_agree(backend_spy, routing):
    layer_t = make_layer(16, 4, 8, 2, d_shared=8, backend="torch", std=0.3, **routing)
    layer_g = copy.deepcopy(layer_t)
    layer_g.experts.backend = "grouped_mm"  # before its first forward
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(6))
    go = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(7))
    outs = []
    for layer in (layer_t, layer_g):
        xi = x.clone().requires_grad_()
        y, r = layer(xi)
        ((y * go).sum() + r.loss).backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}, r))
    assert backend_spy == ["torch", "grouped_mm"]
    (y_t, gx_t, gp_t, r_t), (y_g, gx_g, gp_g, r_g) = outs
    assert torch.equal(r_t.expert_idx, r_g.expert_idx)
    torch.testing.assert_close(y_g, y_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_t, rtol=1e-5, atol=1e-6)
    assert gp_t.keys() == gp_g.keys()
    for name in gp_t:
        assert gp_t[name] is not None, name
        torch.testing.assert_close(gp_g[name], gp_t[name], rtol=1e-5, atol=1e-6, msg=name)


def test_changing_backend_after_forward_takes_effect(backend_spy):
    layer = make_layer(16, 4, 8, 2, backend="torch", std=0.3)
    x = torch.randn(1, 5, 16)
    layer(x)
    layer.experts.backend = "grouped_mm"
    assert layer.experts.backend_name(x.reshape(5, 16)) == "grouped_mm"
    layer(x)
    assert backend_spy == ["torch", "grouped_mm"]


def test_output_shapes_and_router_output():
    layer = make_layer(8, 4, 4, 2, std=0.3)
    y, r = layer(torch.randn(3, 5, 8))
    assert y.shape == (3, 5, 8)
    assert r.token_idx.shape == r.expert_idx.shape == r.weight.shape == (30,)
    assert r.counts.shape == (4,) and float(r.counts.sum()) == 30.0
