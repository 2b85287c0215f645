"""Router (gate + capacity + losses + stats) and the MoE layer's dropped-token path,
against per-token / per-expert loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.model.experts import grouped_mm_supported
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.moe import MoELayer
from moe_vlm.routing import Router

TOL = dict(rtol=1e-5, atol=1e-6)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_router(d: int, e: int, k: int, seed: int = 0, std: float = 0.5, **cfg) -> Router:
    router = Router(d, e, k, RoutingConfig(top_k=k, **cfg))
    router.init_weights(std, generator=_gen(seed))
    return router


def make_x(t: int, d: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    x = torch.randn(t, d, generator=_gen(seed))
    x[:, 0] += offset
    return x


def skew(router: Router, prefs: list[float]) -> Router:
    """Feature 0 of the inputs carries a shared offset: give experts a logit preference."""
    with torch.no_grad():
        router.weight[:, 0] = torch.tensor(prefs)
    return router


# ---------------------------------------------------------------- references (loops)
def ref_logits(x: torch.Tensor, w: torch.Tensor) -> list[list[float]]:
    xs, ws = x.double().tolist(), w.double().tolist()
    return [[sum(a * b for a, b in zip(xr, wr)) for wr in ws] for xr in xs]


def _softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    z = sum(ex)
    return [v / z for v in ex]


def _argsort_desc(vals):
    return sorted(range(len(vals)), key=lambda i: -vals[i])


def ref_topk(logits, gate, k, renormalize=True, bias=None):
    """-> experts [T][K], weights [T][K], scores [T][E]."""
    n_e = len(logits[0])
    b = bias if bias is not None else [0.0] * n_e
    experts, weights, scores = [], [], []
    for row in logits:
        if gate == "softmax_topk":
            p = _softmax(row)
            score = p
        else:
            p = [1 / (1 + math.exp(-v)) for v in row]
            score = [v / sum(p) for v in p]
        idx = _argsort_desc([p[i] + b[i] for i in range(n_e)])[:k]
        w = [p[i] for i in idx]
        if gate == "sigmoid_topk" or renormalize:
            w = [v / sum(w) for v in w]
        experts.append(idx)
        weights.append(w)
        scores.append(score)
    return experts, weights, scores


def ref_expert_choice(logits, cap):
    scores = [_softmax(row) for row in logits]
    assign = {}
    for e in range(len(scores[0])):
        col = [s[e] for s in scores]
        for ti in _argsort_desc(col)[:cap]:
            assign[(ti, e)] = col[ti]
    return assign, scores


def ref_keep(experts, n_e, cap):
    used = [0] * n_e
    keep = [[False] * len(experts[0]) for _ in experts]
    for j in range(len(experts[0])):
        for ti in range(len(experts)):
            e = experts[ti][j]
            if used[e] < cap:
                keep[ti][j] = True
                used[e] += 1
    return keep


def ref_aux(scores, experts, n_e, n_groups=1, count_mult=1):
    t, k = len(experts), len(experts[0])
    s = t // n_groups
    total = 0.0
    for g in range(n_groups):
        counts = [0] * n_e
        for ti in range(g * s, (g + 1) * s):
            for ei in experts[ti]:
                counts[ei] += 1
        acc = 0.0
        for i in range(n_e):
            p_i = sum(scores[ti][i] for ti in range(g * s, (g + 1) * s)) / s
            acc += (count_mult * counts[i]) / (count_mult * s * k) * p_i
        total += n_e * acc
    return total / n_groups


def ref_z(logits):
    out = 0.0
    for row in logits:
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        out += lse * lse
    return out / len(logits)


def ref_capacity(t, k, e, cf):
    from fractions import Fraction
    return max(1, math.ceil(Fraction(str(cf)) * t * k / e))


def as_dict(out) -> dict[tuple[int, int], float]:
    pairs = list(zip(out.token_idx.tolist(), out.expert_idx.tolist(), out.weight.tolist()))
    d = {(ti, ei): w for ti, ei, w in pairs}
    assert len(d) == len(pairs), "duplicate (token, expert) assignment"
    return d


def assert_same_assignments(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    keys = sorted(want)
    torch.testing.assert_close(torch.tensor([got[k_] for k_ in keys], dtype=torch.float64),
                               torch.tensor([want[k_] for k_ in keys], dtype=torch.float64),
                               **TOL)


def topk_reference(router, x, cfg_gate, k, renormalize=True, use_bias=False):
    logits = ref_logits(x, router.weight.detach())
    bias = router.bias.tolist() if use_bias else None
    return logits, *ref_topk(logits, cfg_gate, k, renormalize, bias)


GATES = [("softmax_topk", True), ("softmax_topk", False), ("sigmoid_topk", True)]
SIZES = [(7, 5, 2), (7, 5, 1), (16, 8, 2), (1, 4, 2), (9, 4, 4)]  # (T, E, K); K=E included


# ---------------------------------------------------------------- assignments
@pytest.mark.parametrize("gate,renorm", GATES)
@pytest.mark.parametrize("t,e,k", SIZES)
def test_token_choice_assignments(gate, renorm, t, e, k):
    d = 6
    router = make_router(d, e, k, seed=t + e, gate=gate, renormalize=renorm)
    x = make_x(t, d, seed=t * e + k)
    out = router(x)
    _, experts, weights, scores = topk_reference(router, x, gate, k, renorm)
    want = {(ti, experts[ti][j]): weights[ti][j] for ti in range(t) for j in range(k)}
    assert_same_assignments(as_dict(out), want)
    assert out.token_idx.dtype == torch.int64 and out.expert_idx.dtype == torch.int64
    assert out.token_idx.shape == out.expert_idx.shape == out.weight.shape == (t * k,)
    ref_counts = [0.0] * e
    for row in experts:
        for ei in row:
            ref_counts[ei] += 1
    torch.testing.assert_close(out.counts, torch.tensor(ref_counts), rtol=0, atol=0)
    assert float(out.stats["drop_frac"]) == 0.0


@pytest.mark.parametrize("t,e,k,cf", [(7, 5, 2, None), (16, 8, 2, None), (16, 8, 1, 0.5),
                                      (9, 3, 2, 1.5), (1, 4, 1, None), (12, 4, 4, 0.5)])
def test_expert_choice_assignments(t, e, k, cf):
    d = 6
    router = make_router(d, e, k, seed=3, gate="expert_choice", capacity_factor=cf)
    x = make_x(t, d, seed=4)
    out = router(x)
    cap = max(1, min(t, math.ceil(t * k * (cf or 1.0) / e)))
    logits = ref_logits(x, router.weight.detach())
    want, scores = ref_expert_choice(logits, cap)
    assert_same_assignments(as_dict(out), want)
    torch.testing.assert_close(out.counts, torch.full((e,), float(cap)), rtol=0, atol=0)
    assert float(out.stats["drop_frac"]) == 0.0
    assert float(out.aux_loss) == 0.0  # balanced by construction
    assert float(out.stats["max_violation"]) == 0.0


# ---------------------------------------------------------------- capacity dropping
@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("t,e,k,cf", [(16, 4, 2, 1.0), (16, 4, 2, 0.5), (15, 5, 1, 1.0),
                                      (24, 6, 3, 1.25), (7, 5, 2, 1.0)])
def test_capacity_drops(gate, t, e, k, cf):
    d = 6
    router = skew(make_router(d, e, k, seed=5, gate=gate, capacity_factor=cf),
                  [2.0 - 0.8 * i for i in range(e)])
    x = make_x(t, d, seed=6, offset=1.0)
    out = router(x)
    _, experts, weights, scores = topk_reference(router, x, gate, k)
    cap = ref_capacity(t, k, e, cf)
    keep = ref_keep(experts, e, cap)
    want = {(ti, experts[ti][j]): weights[ti][j]
            for ti in range(t) for j in range(k) if keep[ti][j]}
    n_drop = t * k - len(want)
    assert n_drop > 0  # the setup really drops something
    assert_same_assignments(as_dict(out), want)
    torch.testing.assert_close(out.stats["drop_frac"], torch.tensor(n_drop / (t * k)))
    ref_counts = [0.0] * e
    for ti, ei in want:
        ref_counts[ei] += 1
    assert max(ref_counts) <= cap
    torch.testing.assert_close(out.counts, torch.tensor(ref_counts), rtol=0, atol=0)
    torch.testing.assert_close(out.stats["tokens_per_expert"], torch.tensor(ref_counts))
    # the balance loss is computed on the requested (pre-drop) assignments
    torch.testing.assert_close(out.aux_loss.double(),
                               torch.tensor(ref_aux(scores, experts, e), dtype=torch.float64),
                               **TOL)


def test_capacity_large_factor_drops_nothing():
    t, e, k, d = 16, 4, 2, 6
    router = skew(make_router(d, e, k, seed=5, capacity_factor=float(e)), [2.0, 1.0, 0.0, -1.0])
    out = router(make_x(t, d, seed=6, offset=1.0))
    assert out.token_idx.numel() == t * k
    assert float(out.stats["drop_frac"]) == 0.0


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("scope,n_seqs", [("micro_batch", 1), ("micro_batch", 4),
                                          ("sequence", 4), ("sequence", 2),
                                          ("global_batch", 4)])
@pytest.mark.parametrize("aux_coef,z_coef", [(0.01, 0.001), (0.3, 0.0), (0.0, 0.05)])
def test_losses(gate, scope, n_seqs, aux_coef, z_coef):
    t, e, k, d = 16, 6, 2, 8
    router = skew(make_router(d, e, k, seed=7, gate=gate, aux_loss_scope=scope,
                              aux_loss_coef=aux_coef, z_loss_coef=z_coef),
                  [1.5, 1.0, 0.0, 0.0, -0.5, -1.0])
    if scope == "global_batch":
        router.count_reducer = lambda c: 2 * c  # two identical data-parallel ranks
    x = make_x(t, d, seed=8, offset=1.0)
    out = router(x, n_seqs=n_seqs)
    logits, experts, _, scores = topk_reference(router, x, gate, k)
    groups = n_seqs if scope == "sequence" else 1
    want_aux = ref_aux(scores, experts, e, groups) if aux_coef > 0 else 0.0
    if scope == "global_batch":
        want_aux /= 2  # this rank's share; the identical other rank holds the other half
    want_z = ref_z(logits) if z_coef > 0 else 0.0
    torch.testing.assert_close(out.aux_loss.double(), torch.tensor(want_aux, dtype=torch.float64), **TOL)
    torch.testing.assert_close(out.z_loss.double(), torch.tensor(want_z, dtype=torch.float64), **TOL)
    torch.testing.assert_close(out.loss.double(),
                               torch.tensor(aux_coef * want_aux + z_coef * want_z,
                                            dtype=torch.float64), **TOL)
    torch.testing.assert_close(out.stats["aux_loss"], out.aux_loss.detach())
    torch.testing.assert_close(out.stats["z_loss"], out.z_loss.detach())
    if aux_coef > 0 and scope == "sequence":  # the scope is actually applied
        assert abs(want_aux - ref_aux(scores, experts, e, 1)) > 1e-4


def test_global_batch_reducer_with_other_rank():
    """Router.count_reducer adds another rank's counts: f from both ranks, P this rank's
    probability sum over both ranks' tokens (its share of the global-batch loss)."""
    t, e, k, d = 12, 4, 2, 6
    router = make_router(d, e, k, seed=9, aux_loss_scope="global_batch", aux_loss_coef=0.1)
    other = torch.tensor([[10.0, 0.0, 2.0, 0.0, 6.0]])  # another rank: 6 tokens x 2 | 6 tokens
    router.count_reducer = lambda c: c + other
    x = make_x(t, d, seed=10)
    out = router(x)
    _, experts, _, scores = topk_reference(router, x, "softmax_topk", k)
    counts = other[0, :e].tolist()
    for row in experts:
        for ei in row:
            counts[ei] += 1
    want = e * sum(counts[i] / (t * k + 12) * sum(s[i] for s in scores) / (t + 6) for i in range(e))
    torch.testing.assert_close(out.aux_loss.double(), torch.tensor(want, dtype=torch.float64), **TOL)
    assert abs(want - ref_aux(scores, experts, e)) > 1e-3


def test_loss_gradient_reaches_router_weight():
    t, e, k, d = 9, 5, 2, 6
    router = make_router(d, e, k, seed=11, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = make_x(t, d, seed=12)
    coef = torch.randn(t * k, generator=_gen(13))
    out = router(x)
    order = torch.argsort(out.token_idx * e + out.expert_idx)  # canonical (token, expert) order
    (out.loss + (out.weight[order] * coef).sum()).backward()

    w = router.weight.detach().clone().requires_grad_(True)
    logits = x @ w.t()
    _, experts, _, _ = topk_reference(router, x, "softmax_topk", k)
    total = w.new_zeros(())
    p_rows = []
    for ti in range(t):
        ex = torch.exp(logits[ti] - logits[ti].max())
        p = ex / ex.sum()
        p_rows.append(p)
        sel = sorted(experts[ti])
        s = sum(p[ei] for ei in experts[ti])
        for j, ei in enumerate(sel):
            total = total + p[ei] / s * coef[ti * k + j]
    counts = [0] * e
    for row in experts:
        for ei in row:
            counts[ei] += 1
    aux = sum(counts[i] / (t * k) * sum(p[i] for p in p_rows) / t for i in range(e)) * e
    z = sum(torch.logsumexp(logits[ti], 0) ** 2 for ti in range(t)) / t
    (total + 0.1 * aux + 0.01 * z).backward()
    torch.testing.assert_close(router.weight.grad, w.grad, **TOL)


# ---------------------------------------------------------------- stats
@pytest.mark.parametrize("gate,cf", [("softmax_topk", None), ("sigmoid_topk", None),
                                     ("softmax_topk", 1.0), ("expert_choice", None)])
def test_stats(gate, cf):
    t, e, k, d = 16, 5, 2, 6
    router = skew(make_router(d, e, k, seed=14, gate=gate, capacity_factor=cf),
                  [1.0, 0.5, 0.0, -0.5, -1.0])
    x = make_x(t, d, seed=15, offset=1.0)
    out = router(x)
    logits = ref_logits(x, router.weight.detach())
    if gate == "expert_choice":
        scores = [_softmax(row) for row in logits]
    else:
        scores = ref_topk(logits, gate, k)[2]
    counts = [0] * e
    for ei in out.expert_idx.tolist():
        counts[ei] += 1
    mean = sum(counts) / e
    want_mv = max(counts) / mean - 1.0
    want_ent = sum(-sum(p * math.log(p) for p in row) for row in scores) / t
    torch.testing.assert_close(out.stats["max_violation"].double(),
                               torch.tensor(want_mv, dtype=torch.float64), **TOL)
    torch.testing.assert_close(out.stats["entropy"].double(),
                               torch.tensor(want_ent, dtype=torch.float64), **TOL)
    assert 0.0 < want_ent < math.log(e)
    if gate != "expert_choice":
        assert want_mv > 0.1  # the skew shows up in the metric
    for v in out.stats.values():
        assert not v.requires_grad


def test_stats_uniform_router():
    """Zero weights: uniform scores -> entropy log E; k=E -> perfectly balanced."""
    t, e, d = 6, 4, 3
    router = Router(d, e, e, RoutingConfig(top_k=e))
    with torch.no_grad():
        router.weight.zero_()
    out = router(make_x(t, d, seed=0))
    torch.testing.assert_close(out.stats["entropy"], torch.tensor(math.log(e)))
    assert float(out.stats["max_violation"]) == 0.0
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.0))


# ---------------------------------------------------------------- scaling and bias
@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk", "expert_choice"])
def test_routed_scaling(gate):
    t, e, k, d = 7, 5, 2, 6
    base = make_router(d, e, k, seed=16, gate=gate)
    scaled = make_router(d, e, k, seed=16, gate=gate, routed_scaling=2.5)
    x = make_x(t, d, seed=17)
    a, b = as_dict(base(x)), as_dict(scaled(x))
    assert sorted(a) == sorted(b)
    for key_ in a:
        assert b[key_] == pytest.approx(2.5 * a[key_], rel=1e-6)


@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_bias_used_only_when_enabled(gate, rate):
    t, e, k, d = 9, 5, 2, 6
    router = make_router(d, e, k, seed=18, gate=gate, bias_update_rate=rate)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.5]))  # would force expert 4
    x = make_x(t, d, seed=19)
    out = router(x)
    _, experts, weights, _ = topk_reference(router, x, gate, k, use_bias=rate > 0)
    want = {(ti, experts[ti][j]): weights[ti][j] for ti in range(t) for j in range(k)}
    assert_same_assignments(as_dict(out), want)
    n_on_4 = int((out.expert_idx == 4).sum())
    if rate > 0:
        assert n_on_4 == t
    else:
        assert n_on_4 < t


@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("scope", ["micro_batch", "sequence"])
def test_aux_loss_counts_unbiased_topk(gate, scope):
    """With aux-loss-free bias the selection is bias-shifted, but the balance loss counts
    the unbiased top-k (DeepSeek-V3 eq. 18, Megatron-Core)."""
    t, e, k, d = 12, 5, 2, 6
    router = make_router(d, e, k, seed=30, gate=gate, bias_update_rate=0.01, aux_loss_coef=0.1,
                         aux_loss_scope=scope)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.5]))  # selection forced to 4
    x = make_x(t, d, seed=31)
    out = router(x, n_seqs=2)
    _, unbiased, _, scores = topk_reference(router, x, gate, k)
    _, biased, _, _ = topk_reference(router, x, gate, k, use_bias=True)
    groups = 2 if scope == "sequence" else 1
    want = ref_aux(scores, unbiased, e, groups)
    torch.testing.assert_close(out.aux_loss.double(), torch.tensor(want, dtype=torch.float64), **TOL)
    assert abs(want - ref_aux(scores, biased, e, groups)) > 1e-3  # the bias would change it
    assert int((out.expert_idx == 4).sum()) == t  # selection still uses the bias


@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
def test_normalize_top1_false_keeps_router_gradient(gate):
    """k=1 with normalised weights: every weight is 1 and the LM loss gives the router no
    gradient; ``normalize_top1=false`` keeps the raw probability (Megatron-Core)."""
    t, e, d = 8, 4, 6
    x = make_x(t, d, seed=32)
    grads = {}
    for norm in (True, False):
        router = make_router(d, e, 1, seed=33, gate=gate, aux_loss_coef=0.0, normalize_top1=norm)
        out = router(x)
        if norm:
            torch.testing.assert_close(out.weight, torch.ones(t))
        else:
            _, experts, weights, _ = topk_reference(router, x, gate, 1, renormalize=False)
            if gate == "sigmoid_topk":  # the reference normalises sigmoid weights: undo it
                logits = ref_logits(x, router.weight.detach())
                weights = [[1 / (1 + math.exp(-logits[ti][experts[ti][0]]))] for ti in range(t)]
            want = torch.tensor([w[0] for w in weights])
            torch.testing.assert_close(out.weight.double(), want.double(), **TOL)
        (out.weight * torch.arange(1.0, t + 1)).sum().backward()
        grads[norm] = router.weight.grad.abs().sum()
    assert grads[True] < 1e-5 < 1e-2 < grads[False]  # p / p: zero up to rounding


def test_top1_normalised_weights_warn_at_start_up():
    from moe_vlm.config import load_config

    with pytest.warns(UserWarning, match="normalize_top1=false"):
        load_config(["routing=mixtral_top2", "routing.top_k=1"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(["routing=mixtral_top2", "routing.top_k=1", "routing.normalize_top1=false"])
        load_config(["routing=mixtral_top2"])


@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
def test_renormalize_after_drop(gate):
    """``renormalize_after_drop``: weights renormalised over the kept experts (DeepSpeed,
    GShard); the default renormalises over the k chosen ones before the drop."""
    t, e, k, d, cf = 16, 4, 2, 6, 0.5
    x = make_x(t, d, seed=34, offset=1.0)
    outs = {}
    for after in (False, True):
        router = skew(make_router(d, e, k, seed=35, gate=gate, capacity_factor=cf,
                                  renormalize_after_drop=after), [2.0, 1.2, 0.4, -0.4])
        outs[after] = router(x)
    _, experts, weights, _ = topk_reference(router, x, gate, k)
    keep = ref_keep(experts, e, ref_capacity(t, k, e, cf))
    before = {(ti, experts[ti][j]): weights[ti][j] for ti in range(t) for j in range(k) if keep[ti][j]}
    assert_same_assignments(as_dict(outs[False]), before)
    after = {}
    for ti in range(t):
        kept = [j for j in range(k) if keep[ti][j]]
        total = sum(weights[ti][j] for j in kept)
        after.update({(ti, experts[ti][j]): weights[ti][j] / total for j in kept})
    assert_same_assignments(as_dict(outs[True]), after)
    partial = [ti for ti in range(t) if sum(keep[ti]) == 1]
    assert partial, "the setup must drop one of two experts for some token"


# ---------------------------------------------------------------- MoE layer: dropped tokens
def _backends():
    out = ["torch"]
    if grouped_mm_supported(torch.device("cpu"), torch.float32, 16, 8) is None:
        out.append("grouped_mm")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
def test_moe_dropped_tokens_pass_through_residual(backend, gate):
    b, s, d, e, f, k = 2, 8, 16, 4, 8, 2
    routing = RoutingConfig(gate=gate, top_k=k, capacity_factor=0.5, aux_loss_coef=0.01)
    layer = MoELayer(d, MoESizes(e, f, k, 0, 1), routing, backend)
    assert layer.shared is None
    g = _gen(20)
    layer.router.init_weights(0.5, generator=g)
    layer.experts.init_weights(0.3, 0.3, generator=g)
    skew(layer.router, [2.0, 1.5, -1.0, -1.5])
    x = torch.randn(b, s, d, generator=g)
    x[..., 0] += 1.0
    with torch.no_grad():
        y, r = layer(x)
    assert y.shape == x.shape

    flat = x.reshape(b * s, d)
    t = b * s
    _, experts, weights, _ = topk_reference(layer.router, flat, gate, k)
    keep = ref_keep(experts, e, ref_capacity(t, k, e, 0.5))
    w_in = layer.experts.w_in.detach().double()
    w_out = layer.experts.w_out.detach().double()
    yf = y.reshape(t, d)
    n_full_drop = n_kept = 0
    for ti in range(t):
        xt = flat[ti].double()
        ref = torch.zeros(d, dtype=torch.float64)
        for j in range(k):
            if not keep[ti][j]:
                continue
            ei = experts[ti][j]
            h = F.silu(xt @ w_in[ei][:, :f]) * (xt @ w_in[ei][:, f:])
            ref = ref + weights[ti][j] * (h @ w_out[ei])
        if not any(keep[ti]):
            n_full_drop += 1
            assert torch.equal(yf[ti], torch.zeros(d))  # exactly zero MoE output
            assert torch.equal(flat[ti] + yf[ti], flat[ti])  # block output = residual
            assert ti not in r.token_idx.tolist()
        else:
            n_kept += 1
            assert yf[ti].abs().sum() > 0
            torch.testing.assert_close(yf[ti].double(), ref, rtol=1e-5, atol=1e-5)
    assert n_full_drop > 0 and n_kept > 0  # both paths are exercised
