"""Expert backends (pure compute on expert-sorted rows) through the local dispatcher, the
fused Triton pair, and backend selection.

Legend: T tokens, D model width, F expert width, E experts, K experts per token,
N assignments (token, expert, weight).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from functools import partial

from moe_vlm.model import experts as experts_mod
from moe_vlm.model.dispatch import LocalDispatcher, routed_experts
from moe_vlm.model.experts import GroupedExperts, grouped_mm_supported, resolve_backend

CPU = torch.device("cpu")
D, FF, E = 16, 8, 4  # rows 16-byte aligned for fp32 and bf16


def pipeline(backend: str):
    """dispatch -> ``backend``'s compute on the expert-sorted rows -> weighted combine, as
    one ``fn(x, token_idx, expert_idx, weight, w_in, w_out) -> y [T, D]``."""
    compute = experts_mod.BACKENDS[backend]()
    disp = LocalDispatcher()

    def fn(x, tok, exp, weight, w_in, w_out):
        rows, offsets, routed = disp.dispatch(x, tok, exp, weight, w_in.shape[0])
        return disp.combine(compute(rows, offsets, w_in, w_out), routed)
    return fn


fused = partial(routed_experts, backend="triton")  # the fused Triton dispatcher + experts pair
experts_torch, experts_grouped_mm = pipeline("torch"), pipeline("grouped_mm")
BACKEND_FNS = {"torch": experts_torch, "grouped_mm": experts_grouped_mm}


# ----------------------------------------------------------------------------- helpers

def _distinct_experts(g: torch.Generator, t: int, k: int, n_exp: int) -> torch.Tensor:
    """[T*K] expert ids, K distinct per token (as a top-k gate produces)."""
    return torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(t)]).reshape(-1)


def make_case(name: str, seed: int = 0):
    """(T, token_idx [N], expert_idx [N]) for one routing pattern."""
    g = torch.Generator().manual_seed(seed)
    if name == "random":
        t, k = 6, 2
        tok = torch.arange(t).repeat_interleave(k)
        exp = _distinct_experts(g, t, k, E)
    elif name == "empty_expert":  # expert 1 (in the middle) gets no token
        t, k = 6, 2
        tok = torch.arange(t).repeat_interleave(k)
        pool = torch.tensor([0, 2, 3])
        exp = torch.stack([pool[torch.randperm(3, generator=g)[:k]] for _ in range(t)]).reshape(-1)
    elif name == "all_one_expert":
        t = 5
        tok = torch.arange(t)
        exp = torch.full((t,), 2, dtype=torch.long)
    elif name == "single_token":
        t, k = 1, 2
        tok = torch.zeros(k, dtype=torch.long)
        exp = torch.tensor([3, 1])
    elif name == "k1":
        t = 6
        tok = torch.arange(t)
        exp = torch.randint(0, E, (t,), generator=g)
    elif name == "odd_T7":
        t, k = 7, 3
        tok = torch.arange(t).repeat_interleave(k)
        exp = _distinct_experts(g, t, k, E)
    elif name == "dropped":  # capacity dropping, then shuffled: unsorted, duplicated, gaps
        t, k = 7, 2
        tok = torch.arange(t).repeat_interleave(k)
        exp = _distinct_experts(g, t, k, E)
        keep = torch.ones(t * k, dtype=torch.bool)
        keep[torch.tensor([1, 4, 5, 9])] = False  # token 2 fully dropped, others partially
        perm = torch.randperm(int(keep.sum()), generator=g)
        tok, exp = tok[keep][perm], exp[keep][perm]
    elif name == "expert_choice":  # every expert picks C tokens: unsorted, duplicates
        t, c = 7, 3
        tok = torch.cat([torch.randperm(t, generator=g)[:c] for _ in range(E)])
        exp = torch.arange(E).repeat_interleave(c)
    elif name == "n0":
        t = 5
        tok = torch.zeros(0, dtype=torch.long)
        exp = torch.zeros(0, dtype=torch.long)
    else:
        raise KeyError(name)
    return t, tok, exp


CASES = ["random", "empty_expert", "all_one_expert", "single_token", "k1", "odd_T7",
         "dropped", "expert_choice", "n0"]


def make_tensors(t: int, n: int, seed: int = 1, dtype=torch.float32, weight_dtype=torch.float32):
    """Leaf tensors x [T, D], weight [N], w_in [E, D, 2F], w_out [E, F, D], upstream grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, D, generator=g)
    weight = torch.rand(n, generator=g) + 0.1
    w_in = torch.randn(E, D, 2 * FF, generator=g) / D ** 0.5
    w_out = torch.randn(E, FF, D, generator=g) / FF ** 0.5
    go = torch.randn(t, D, generator=g)
    leaves = [x.to(dtype), weight.to(weight_dtype), w_in.to(dtype), w_out.to(dtype)]
    return [v.clone().requires_grad_(True) for v in leaves], go


def loop_reference(x, token_idx, expert_idx, weight, w_in, w_out):
    """y[t] = sum over t's assignments of weight * (silu(x Wg) * (x Wu)) Wo, one at a time."""
    f = w_in.shape[-1] // 2
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=x.dtype)
        for n in range(token_idx.numel()):
            if int(token_idx[n]) != t:
                continue
            e = int(expert_idx[n])
            gate = x[t] @ w_in[e][:, :f]
            up = x[t] @ w_in[e][:, f:]
            acc = acc + weight[n] * ((F.silu(gate) * up) @ w_out[e])
        rows.append(acc)
    return torch.stack(rows)


def run_with_grads(fn, leaves, tok, exp, go):
    """Output and grads w.r.t. (x, weight, w_in, w_out) of <fn(...), go>."""
    x, weight, w_in, w_out = leaves
    y = fn(x, tok, exp, weight, w_in, w_out)
    if not y.requires_grad:  # only the plain loop reference has no graph with N=0
        assert tok.numel() == 0 and fn is loop_reference
        return y, [torch.zeros_like(v) for v in leaves]
    grads = torch.autograd.grad(y, leaves, go.to(y.dtype), allow_unused=True,
                                materialize_grads=True)
    return y, list(grads)


def fp64_reference(leaves, tok, exp, go):
    ref_leaves = [v.detach().double().requires_grad_(True) for v in leaves]
    return run_with_grads(loop_reference, ref_leaves, tok, exp, go.double())


NAMES = ["x", "weight", "w_in", "w_out"]


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_per_token_loop(case):
    t, tok, exp = make_case(case)
    leaves, go = make_tensors(t, tok.numel())
    y, grads = run_with_grads(experts_torch, leaves, tok, exp, go)
    y_ref, grads_ref = fp64_reference(leaves, tok, exp, go)
    assert y.dtype == torch.float32 and y.shape == (t, D)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_grouped_mm_matches_torch_fp32(case):
    t, tok, exp = make_case(case)
    leaves, go = make_tensors(t, tok.numel())
    y_t, g_t = run_with_grads(experts_torch, leaves, tok, exp, go)
    y_g, g_g = run_with_grads(experts_grouped_mm, leaves, tok, exp, go)
    assert y_g.dtype == torch.float32
    torch.testing.assert_close(y_g, y_t, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(NAMES, g_g, g_t):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
@pytest.mark.parametrize("case", CASES)
def test_bf16_close_to_fp32_reference(backend, case):
    """bf16 x / expert weights (fp32 routing weights, as the router makes them)."""
    t, tok, exp = make_case(case, seed=3)
    leaves, go = make_tensors(t, tok.numel(), seed=4, dtype=torch.bfloat16)
    y, grads = run_with_grads(BACKEND_FNS[backend], leaves, tok, exp, go)
    y_ref, grads_ref = fp64_reference(leaves, tok, exp, go)  # same bf16 values, exact math
    assert y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [v.dtype for v in leaves]
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_no_assignments_gives_zero_output_and_grads(backend):
    t, tok, exp = make_case("n0")
    leaves, go = make_tensors(t, 0)
    y, grads = run_with_grads(BACKEND_FNS[backend], leaves, tok, exp, go)
    assert y.shape == (t, D)
    assert torch.equal(y, torch.zeros(t, D))
    for name, g, v in zip(NAMES, grads, leaves):
        assert g.shape == v.shape, name
        assert torch.equal(g, torch.zeros_like(v)), name


def test_routing_weight_scales_output_linearly():
    """Doubling every weight doubles the output; an expert's weight 0 removes it."""
    t, tok, exp = make_case("random")
    (x, w, w_in, w_out), _ = make_tensors(t, tok.numel())
    y = experts_torch(x, tok, exp, w, w_in, w_out)
    torch.testing.assert_close(experts_torch(x, tok, exp, 2 * w, w_in, w_out), 2 * y)
    keep = exp != 0
    w0 = torch.where(keep, w, torch.zeros_like(w))
    torch.testing.assert_close(experts_torch(x, tok, exp, w0, w_in, w_out),
                               experts_torch(x, tok[keep], exp[keep], w[keep], w_in, w_out))


def test_torch_backend_fp64_keeps_fp64_precision():
    t, tok, exp = make_case("random")
    leaves, go = make_tensors(t, tok.numel(), dtype=torch.float64, weight_dtype=torch.float64)
    y, _ = run_with_grads(experts_torch, leaves, tok, exp, go)
    y_ref, _ = fp64_reference(leaves, tok, exp, go)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


def test_torch_backend_no_assignments_stays_differentiable():
    t, tok, exp = make_case("n0")
    (x, w, w_in, w_out), go = make_tensors(t, 0)
    y = experts_torch(x, tok, exp, w, w_in, w_out)
    (y * go).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("dtype,d_model,d_expert,bad", [
    (torch.float32, 6, 8, "d_model"),
    (torch.float32, 16, 3, "d_expert"),
    (torch.float32, 16, 2, "d_expert"),
    (torch.bfloat16, 16, 4, "d_expert"),
    (torch.bfloat16, 12, 8, "d_model"),
    (torch.float64, 16, 8, "float64"),
])
def test_grouped_mm_supported_gives_reason(dtype, d_model, d_expert, bad):
    why = grouped_mm_supported(CPU, dtype, d_model, d_expert)
    assert isinstance(why, str) and bad in why


@pytest.mark.parametrize("dtype,d_model,d_expert", [
    (torch.float32, 16, 8), (torch.float32, 4, 4), (torch.bfloat16, 16, 8),
    (torch.float16, 8, 8)])
def test_grouped_mm_supported_when_aligned(dtype, d_model, d_expert):
    assert grouped_mm_supported(CPU, dtype, d_model, d_expert) is None


def test_resolve_backend_auto():
    assert resolve_backend("auto", CPU, torch.float32, 16, 8) == "grouped_mm"
    assert resolve_backend("auto", CPU, torch.float32, 16, 6) == "torch"
    assert resolve_backend("auto", CPU, torch.float32, 10, 8) == "torch"
    assert resolve_backend("auto", CPU, torch.float64, 16, 8) == "torch"


def test_resolve_backend_explicit():
    assert resolve_backend("torch", CPU, torch.float64, 5, 3) == "torch"
    assert resolve_backend("grouped_mm", CPU, torch.float32, 16, 8) == "grouped_mm"
    with pytest.raises(ValueError, match=r"grouped_mm.*16-byte.*d_expert=6.*moe.backend=torch"):
        resolve_backend("grouped_mm", CPU, torch.float32, 16, 6)
    with pytest.raises(ValueError, match=r"float64"):
        resolve_backend("grouped_mm", CPU, torch.float64, 16, 8)
    with pytest.raises(ValueError, match=r"unknown"):
        resolve_backend("cutlass", CPU, torch.float32, 16, 8)


@pytest.mark.parametrize("case", CASES)
def test_triton_backend_matches_torch(case):
    """The model's triton backend (Triton's CPU interpreter here) against the loop."""
    t, tok, exp = make_case(case)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, D, generator=g, requires_grad=True)
    w_in = (torch.randn(E, D, 2 * FF, generator=g) * 0.3).requires_grad_()
    w_out = (torch.randn(E, FF, D, generator=g) * 0.3).requires_grad_()
    w = torch.rand(tok.numel(), generator=g, requires_grad=True)
    go = torch.randn(t, D, generator=g)
    leaves = (x, w_in, w_out, w)
    outs = {}
    for name, fn in (("torch", experts_torch), ("triton", pipeline("triton")), ("fused", fused)):
        y = fn(x, tok, exp, w, w_in, w_out)
        outs[name] = (y, torch.autograd.grad(y, leaves, go))
    for name in ("triton", "fused"):
        torch.testing.assert_close(outs[name][0], outs["torch"][0], atol=1e-5, rtol=1e-4)
        for a, b in zip(outs[name][1], outs["torch"][1]):
            torch.testing.assert_close(a, b, atol=4e-5, rtol=2e-4)


def test_triton_backend_under_bf16_autocast_close_to_torch():
    t, tok, exp = make_case("random")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, D, generator=g)
    w_in, w_out = torch.randn(E, D, 2 * FF, generator=g) * 0.3, torch.randn(E, FF, D, generator=g) * 0.3
    w = torch.rand(tok.numel(), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_tr = pipeline("triton")(x, tok, exp, w, w_in, w_out)
        y_fu = fused(x, tok, exp, w, w_in, w_out)
        y_to = experts_torch(x, tok, exp, w, w_in, w_out)
    assert y_tr.dtype == y_fu.dtype == y_to.dtype == torch.float32
    torch.testing.assert_close(y_tr, y_to, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y_fu, y_to, atol=3e-2, rtol=3e-2)


def test_triton_backend_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match=r"triton.*float64.*moe.backend=auto, torch or grouped_mm"):
        resolve_backend("triton", CPU, torch.float64, 16, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", CPU, torch.float32, 16, 8) == "grouped_mm"
    ex = GroupedExperts(E, D, FF, backend="triton")
    ex.init_weights(0.1, 0.1, torch.Generator().manual_seed(0))
    t, tok, exp = make_case("random")
    with pytest.raises(ValueError, match=r"need CUDA \(or TRITON_INTERPRET=1.*moe.backend=auto"):
        LocalDispatcher()(torch.randn(t, D), tok, exp, torch.ones(tok.numel()), ex)


@pytest.mark.parametrize("d_expert,dtype,expected", [
    (8, torch.float32, "grouped_mm"), (6, torch.float32, "torch"), (8, torch.float64, "torch")])
def test_grouped_experts_auto_runs_resolved_backend(monkeypatch, d_expert, dtype, expected):
    calls = []

    def spy(name):
        real = {"torch": experts_mod.swiglu_torch, "grouped_mm": experts_mod.swiglu_grouped_mm}[name]

        def fn(*args):
            calls.append(name)
            return real(*args)
        return fn

    monkeypatch.setitem(experts_mod.BACKENDS, "torch", lambda: spy("torch"))
    monkeypatch.setitem(experts_mod.BACKENDS, "grouped_mm", lambda: spy("grouped_mm"))
    ex = GroupedExperts(E, D, d_expert, backend="auto").to(dtype)
    ex.init_weights(0.1, 0.1, torch.Generator().manual_seed(0))
    t, tok, exp = make_case("random")
    x = torch.randn(t, D, dtype=dtype)
    w = torch.rand(tok.numel(), dtype=dtype)
    assert ex.backend_name(x) == expected
    y = LocalDispatcher()(x, tok, exp, w, ex)
    assert calls == [expected]
    torch.testing.assert_close(y, experts_torch(x, tok, exp, w, ex.w_in, ex.w_out))
