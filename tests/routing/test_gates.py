"""Gates (softmax_topk, sigmoid_topk, expert_choice) against per-token / per-expert loop
references written in plain Python (math module, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_vlm.routing import expert_choice, expert_choice_capacity, sigmoid_topk, softmax_topk

TOL64 = dict(rtol=1e-12, atol=1e-12)
TOL32 = dict(rtol=1e-6, atol=1e-6)

# (T, E, K): single token, k=1, k=E, odd sizes, a regular shape.
SHAPES = [(1, 4, 1), (1, 4, 4), (7, 5, 1), (7, 5, 2), (7, 5, 5), (16, 8, 2), (5, 1, 1), (9, 6, 3)]


def _logits(t: int, e: int, seed: int, dtype=torch.float64, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, e, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- plain-python references
def _softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    z = sum(ex)
    return [v / z for v in ex]


def _sigmoid_row(row: list[float]) -> list[float]:
    return [1.0 / (1.0 + math.exp(-v)) for v in row]


def _topk_desc(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first (a selection sort loop)."""
    chosen: list[int] = []
    for _ in range(k):
        best = None
        for e, v in enumerate(values):
            if e in chosen:
                continue
            if best is None or v > values[best]:
                best = e
        chosen.append(best)
    return chosen


def ref_softmax_topk(logits, k, renormalize, bias=None):
    rows = logits.double().tolist()
    b = bias.double().tolist() if bias is not None else [0.0] * len(rows[0])
    experts, weights, scores = [], [], []
    for row in rows:  # per token
        p = _softmax_row(row)
        sel = [p[e] + b[e] for e in range(len(p))]
        idx = _topk_desc(sel, k)
        w = [p[e] for e in idx]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        experts.append(idx)
        weights.append(w)
        scores.append(p)
    return experts, weights, scores


def ref_sigmoid_topk(logits, k, bias=None):
    rows = logits.double().tolist()
    b = bias.double().tolist() if bias is not None else [0.0] * len(rows[0])
    experts, weights, scores = [], [], []
    for row in rows:  # per token
        a = _sigmoid_row(row)
        sel = [a[e] + b[e] for e in range(len(a))]
        idx = _topk_desc(sel, k)
        s = sum(a[e] for e in idx)
        experts.append(idx)
        weights.append([a[e] / s for e in idx])
        tot = sum(a)
        scores.append([v / tot for v in a])
    return experts, weights, scores


def ref_expert_choice(logits, capacity):
    scores = [_softmax_row(row) for row in logits.double().tolist()]
    t, e_n = len(scores), len(scores[0])
    tokens, weights = [], []
    for e in range(e_n):  # per expert
        col = [scores[t_][e] for t_ in range(t)]
        idx = _topk_desc(col, capacity)
        tokens.append(idx)
        weights.append([col[i] for i in idx])
    return tokens, weights, scores


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- softmax_topk
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,k", SHAPES)
def test_softmax_topk_matches_reference(t, e, k, renormalize):
    logits = _logits(t, e, seed=100 + 7 * t + e + k)
    out = softmax_topk(logits, k, renormalize=renormalize)
    experts, weights, scores = ref_softmax_topk(logits, k, renormalize)
    assert out.experts.dtype == torch.int64 and out.experts.shape == (t, k)
    assert out.experts.tolist() == experts
    torch.testing.assert_close(out.weights, _t(weights), **TOL64)
    torch.testing.assert_close(out.scores, _t(scores), **TOL64)
    for row in out.experts.tolist():
        assert len(set(row)) == k  # distinct experts per token
    if renormalize:
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(t, dtype=torch.float64), **TOL64)


def test_softmax_topk_fp32():
    logits = _logits(13, 6, seed=3, dtype=torch.float32)
    out = softmax_topk(logits, 2, renormalize=True)
    experts, weights, scores = ref_softmax_topk(logits, 2, True)
    assert out.weights.dtype == torch.float32
    assert out.experts.tolist() == experts
    torch.testing.assert_close(out.weights, _t(weights, torch.float32), **TOL32)
    torch.testing.assert_close(out.scores, _t(scores, torch.float32), **TOL32)


def test_softmax_topk_no_renormalize_keeps_raw_probabilities():
    # Hand-checked numbers: logits [0, ln 2, ln 3] -> probs [1/6, 2/6, 3/6].
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
    raw = softmax_topk(logits, 2, renormalize=False)
    assert raw.experts.tolist() == [[2, 1]]
    torch.testing.assert_close(raw.weights, torch.tensor([[0.5, 1 / 3]], dtype=torch.float64), **TOL64)
    ren = softmax_topk(logits, 2, renormalize=True)
    torch.testing.assert_close(ren.weights, torch.tensor([[0.6, 0.4]], dtype=torch.float64), **TOL64)


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_weight_gradient(renormalize):
    """Weights are differentiable w.r.t. the logits; compare with a per-token autograd
    reference."""
    t, e, k = 7, 5, 2
    logits = _logits(t, e, seed=11).requires_grad_(True)
    coef = _logits(t, k, seed=12)
    out = softmax_topk(logits, k, renormalize=renormalize)
    (out.weights * coef).sum().backward()

    ref_logits = logits.detach().clone().requires_grad_(True)
    experts, _, _ = ref_softmax_topk(ref_logits.detach(), k, renormalize)
    total = ref_logits.new_zeros(())
    for ti in range(t):
        row = ref_logits[ti]
        ex = torch.exp(row - row.max())
        p = ex / ex.sum()
        w = [p[ei] for ei in experts[ti]]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        for j in range(k):
            total = total + w[j] * coef[ti, j]
    total.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, **TOL64)


# ---------------------------------------------------------------- selection bias
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("t,e,k", [(7, 5, 1), (7, 5, 2), (16, 8, 3), (1, 4, 2)])
def test_softmax_topk_bias_matches_reference(t, e, k, renormalize):
    logits = _logits(t, e, seed=21 + t + k)
    g = torch.Generator().manual_seed(22 + e)
    bias = torch.rand(e, generator=g, dtype=torch.float64) * 0.6
    out = softmax_topk(logits, k, renormalize=renormalize, bias=bias)
    experts, weights, scores = ref_softmax_topk(logits, k, renormalize, bias)
    assert out.experts.tolist() == experts
    torch.testing.assert_close(out.weights, _t(weights), **TOL64)
    torch.testing.assert_close(out.scores, _t(scores), **TOL64)  # scores stay unbiased


@pytest.mark.parametrize("k", [1, 2])
def test_softmax_topk_bias_changes_selection_not_weights(k):
    t, e = 7, 5
    logits = _logits(t, e, seed=31)
    probs = ref_softmax_topk(logits, e, False)[2]
    bias = torch.zeros(e, dtype=torch.float64)
    bias[4] = 1.0  # p + 1 > 1 > any unbiased p: expert 4 is everybody's first choice
    unb = softmax_topk(logits, k, renormalize=False)
    out = softmax_topk(logits, k, renormalize=False, bias=bias)
    assert out.experts[:, 0].tolist() == [4] * t
    assert unb.experts[:, 0].tolist() != [4] * t  # the bias did change the selection
    for ti in range(t):
        for j in range(k):
            ei = out.experts[ti, j].item()
            # weight is the unbiased probability, not probability + bias
            assert out.weights[ti, j].item() == pytest.approx(probs[ti][ei], rel=1e-12, abs=1e-14)
        if k == 2:  # second choice: the best of the rest by the unbiased probability
            rest = [ei for ei in range(e) if ei != 4]
            assert out.experts[ti, 1].item() == max(rest, key=lambda ei: probs[ti][ei])
    if k == 1:
        ren = softmax_topk(logits, 1, renormalize=True, bias=bias)
        torch.testing.assert_close(ren.weights, torch.ones(t, 1, dtype=torch.float64), **TOL64)


# ---------------------------------------------------------------- sigmoid_topk
@pytest.mark.parametrize("t,e,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sigmoid_topk_matches_reference(t, e, k, with_bias):
    logits = _logits(t, e, seed=200 + 5 * t + e + k)
    bias = None
    if with_bias:
        g = torch.Generator().manual_seed(201 + t)
        bias = (torch.rand(e, generator=g, dtype=torch.float64) - 0.5) * 0.8
    out = sigmoid_topk(logits, k, bias=bias)
    experts, weights, scores = ref_sigmoid_topk(logits, k, bias)
    assert out.experts.dtype == torch.int64 and out.experts.shape == (t, k)
    assert out.experts.tolist() == experts
    torch.testing.assert_close(out.weights, _t(weights), **TOL64)
    torch.testing.assert_close(out.scores, _t(scores), **TOL64)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(t, dtype=torch.float64), **TOL64)


def test_sigmoid_topk_bias_changes_selection_not_weights():
    t, e, k = 7, 5, 2
    logits = _logits(t, e, seed=41)
    aff = [_sigmoid_row(r) for r in logits.tolist()]
    bias = torch.zeros(e, dtype=torch.float64)
    bias[0] = 2.0  # sigmoid < 1, so expert 0 wins every token
    unb = sigmoid_topk(logits, k)
    out = sigmoid_topk(logits, k, bias=bias)
    assert out.experts[:, 0].tolist() == [0] * t
    assert unb.experts[:, 0].tolist() != [0] * t
    for ti in range(t):
        e0, e1 = out.experts[ti].tolist()
        s = aff[ti][e0] + aff[ti][e1]  # unbiased affinities, not affinity + bias
        assert out.weights[ti, 0].item() == pytest.approx(aff[ti][e0] / s, rel=1e-12)
        assert out.weights[ti, 1].item() == pytest.approx(aff[ti][e1] / s, rel=1e-12)


def test_sigmoid_topk_differs_from_softmax_topk_weights():
    """Guards against the sigmoid gate silently using softmax probabilities: for k=2 the
    renormalised softmax weights are p_a/(p_a+p_b), the sigmoid ones s_a/(s_a+s_b)."""
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    out = sigmoid_topk(logits, 2)
    s0, s1 = 1 / (1 + math.exp(-2.0)), 0.5
    torch.testing.assert_close(out.weights, torch.tensor([[s0 / (s0 + s1), s1 / (s0 + s1)]],
                                                         dtype=torch.float64), **TOL64)
    sm = softmax_topk(logits, 2, renormalize=True)
    assert not torch.allclose(out.weights, sm.weights)


# ---------------------------------------------------------------- expert_choice
@pytest.mark.parametrize("t,e,cap", [(7, 5, 1), (7, 5, 2), (7, 5, 7), (1, 4, 1), (16, 8, 4),
                                     (9, 3, 5)])
def test_expert_choice_matches_reference(t, e, cap):
    logits = _logits(t, e, seed=300 + t * e + cap)
    out = expert_choice(logits, cap)
    tokens, weights, scores = ref_expert_choice(logits, cap)
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (e, cap)
    assert out.tokens.tolist() == tokens
    torch.testing.assert_close(out.weights, _t(weights), **TOL64)
    torch.testing.assert_close(out.scores, _t(scores), **TOL64)
    for row in out.tokens.tolist():
        assert len(set(row)) == cap  # an expert never takes the same token twice


def test_expert_choice_full_capacity_takes_every_token():
    t, e = 7, 5
    logits = _logits(t, e, seed=5)
    out = expert_choice(logits, t)
    for row in out.tokens.tolist():
        assert sorted(row) == list(range(t))


# Hand-computed capacities: ceil(T * K * cf / E), clamped to [1, T]; cf=None means 1.0.
@pytest.mark.parametrize("t,e,k,cf,expected", [
    (7, 5, 1, None, 2),  # ceil(1.4)
    (7, 5, 2, None, 3),  # ceil(2.8)
    (7, 5, 2, 1.25, 4),  # ceil(3.5)
    (16, 8, 2, 1.0, 4),  # exact
    (16, 8, 2, 2.0, 8),
    (1, 8, 1, None, 1),  # ceil(0.125) = 1
    (4, 2, 2, 4.0, 4),  # ceil(16) clamped to T=4
    (8, 64, 1, 0.5, 1),  # ceil(0.0625) = 1, never 0
    (10, 4, 1, 0.5, 2),  # ceil(1.25)
])
def test_expert_choice_capacity(t, e, k, cf, expected):
    assert expert_choice_capacity(t, e, k, cf) == expected


def test_expert_choice_with_capacity_helper():
    t, e, k = 7, 5, 2
    cap = expert_choice_capacity(t, e, k, None)
    assert cap == 3
    logits = _logits(t, e, seed=77)
    out = expert_choice(logits, cap)
    tokens, weights, _ = ref_expert_choice(logits, 3)
    assert out.tokens.tolist() == tokens
    torch.testing.assert_close(out.weights, _t(weights), **TOL64)
