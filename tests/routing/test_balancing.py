"""Balancing losses (switch aux loss in its three scopes, router z-loss) and the
auxiliary-loss-free bias update, against loop references."""

from __future__ import annotations

import math

import pytest
import torch

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.routing import Router, router_z_loss, switch_aux_loss, update_balance_bias

TOL = dict(rtol=1e-6, atol=1e-6)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scores(t: int, e: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.softmax(torch.randn(t, e, generator=_gen(seed)) * scale, dim=-1)


def _experts(t: int, e: int, k: int, seed: int, skew: bool = False) -> torch.Tensor:
    """[T, K] distinct expert ids per token (random; ``skew`` favours low ids)."""
    r = torch.rand(t, e, generator=_gen(seed))
    if skew:
        r = r - 0.4 * torch.linspace(1.0, 0.0, e)  # low ids get lower keys -> chosen more
    return r.argsort(dim=-1)[:, :k].contiguous()


# ---------------------------------------------------------------- references
def ref_aux_loss(scores, experts, n_experts, n_groups=1, extra=None, extra_mult=1, groups=None):
    """E * sum_i f_i P_i per group, averaged over groups; written with explicit loops.

    ``extra`` (a list of expert ids from other ranks) is added to the counts of every
    group, and ``extra_mult`` multiplies counts and total (identical ranks summed); P_i is
    then this rank's probability sum over the tokens of all ranks (this rank's share).
    ``groups``: explicit lists of token indices (sequences of different lengths)."""
    t, k = experts.shape
    s = t // n_groups
    ids = experts.tolist()
    if groups is None:
        groups = [range(g * s, (g + 1) * s) for g in range(n_groups)]
    group_losses = []
    for toks in groups:
        s = len(toks)
        counts = [0] * n_experts
        for ti in toks:
            for j in range(k):
                counts[ids[ti][j]] += 1
        total = s * k
        counts = [c * extra_mult for c in counts]
        total *= extra_mult
        if extra is not None:
            for ei in extra:
                counts[ei] += 1
            total += len(extra)
        loss_g = scores.new_zeros(())
        for i in range(n_experts):
            p_i = scores.new_zeros(())
            for ti in toks:
                p_i = p_i + scores[ti, i]
            p_i = p_i / (total / k)  # tokens of every rank
            loss_g = loss_g + (counts[i] / total) * p_i
        group_losses.append(n_experts * loss_g)
    return sum(group_losses) / len(groups)


def ref_z_loss(logits):
    total = logits.new_zeros((), dtype=torch.float64)
    rows = logits.double()
    for ti in range(rows.shape[0]):
        m = rows[ti].max()
        lse = m + torch.log(sum(torch.exp(rows[ti, ei] - m) for ei in range(rows.shape[1])))
        total = total + lse * lse
    return total / rows.shape[0]


# ---------------------------------------------------------------- switch_aux_loss values
def test_aux_loss_uniform_is_one():
    t, e, k = 8, 4, 2
    scores = torch.full((t, e), 1.0 / e)
    experts = torch.tensor([[ti % e, (ti + 1) % e] for ti in range(t)])  # every expert 4x
    for n_groups in (1, 2):  # each sequence of 4 tokens is balanced too
        loss = switch_aux_loss(scores, experts, e, n_groups=n_groups)
        torch.testing.assert_close(loss, torch.tensor(1.0), rtol=0, atol=1e-7)


def test_aux_loss_collapsed_is_n_experts():
    t, e = 6, 5
    scores = torch.zeros(t, e)
    scores[:, 0] = 1.0
    experts = torch.zeros(t, 1, dtype=torch.int64)
    torch.testing.assert_close(switch_aux_loss(scores, experts, e), torch.tensor(5.0))


@pytest.mark.parametrize("t,e,k", [(1, 4, 1), (7, 5, 1), (7, 5, 2), (7, 5, 5), (16, 8, 2)])
def test_aux_loss_micro_batch(t, e, k):
    scores = _scores(t, e, seed=t * 10 + e + k)
    experts = _experts(t, e, k, seed=t + e * 3 + k, skew=True)
    loss = switch_aux_loss(scores, experts, e)
    torch.testing.assert_close(loss, ref_aux_loss(scores, experts, e), **TOL)


@pytest.mark.parametrize("b,s,e,k", [(2, 4, 4, 2), (3, 5, 5, 1), (4, 3, 6, 3), (7, 1, 5, 2)])
def test_aux_loss_per_sequence(b, s, e, k):
    t = b * s
    scores = _scores(t, e, seed=b * 100 + s, scale=2.0)
    experts = _experts(t, e, k, seed=b + s + e, skew=True)
    loss = switch_aux_loss(scores, experts, e, n_groups=b)
    ref = ref_aux_loss(scores, experts, e, n_groups=b)
    torch.testing.assert_close(loss, ref, **TOL)
    # the scope matters: the per-sequence value differs from the micro-batch one here
    assert not torch.allclose(ref, ref_aux_loss(scores, experts, e, n_groups=1), atol=1e-4)


def test_aux_loss_rejects_uneven_groups():
    scores, experts = _scores(7, 4, 0), _experts(7, 4, 2, 0)
    with pytest.raises(ValueError):
        switch_aux_loss(scores, experts, 4, n_groups=2)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_aux_loss_global_identical_ranks_unchanged(n_groups):
    """Two identical ranks (counts and totals x2): f is unchanged and each rank returns its
    share, half of the loss, so the shares add up to the single-rank value."""
    t, e, k = 8, 5, 2
    scores = _scores(t, e, seed=4)
    experts = _experts(t, e, k, seed=5, skew=True)
    local = switch_aux_loss(scores, experts, e, n_groups=n_groups)
    doubled = switch_aux_loss(scores, experts, e, n_groups=n_groups, count_reducer=lambda x: 2 * x)
    torch.testing.assert_close(2 * doubled, local, **TOL)
    torch.testing.assert_close(
        doubled, ref_aux_loss(scores, experts, e, n_groups=n_groups, extra_mult=2), **TOL)


def test_aux_loss_global_other_rank_counts():
    """f from the concatenation of both ranks' assignments, P from the local scores."""
    t, e, k = 8, 5, 2
    scores = _scores(t, e, seed=6)
    experts = _experts(t, e, k, seed=7)
    other = _experts(12, e, k, seed=8, skew=True)  # the other rank: 12 tokens, skewed
    other_ids = [ei for row in other.tolist() for ei in row]
    other_counts = torch.zeros(1, e)
    for ei in other_ids:  # loop reference of the other rank's counts
        other_counts[0, ei] += 1
    other_total = torch.tensor([[float(len(other_ids))]])
    calls = []

    def reducer(x):  # all-reduce(sum) of this rank and the other one: [counts | tokens]
        calls.append(tuple(x.shape))
        return x + torch.cat([other_counts, other_total / k], 1)

    loss = switch_aux_loss(scores, experts, e, count_reducer=reducer)
    assert calls == [(1, e + 1)]  # counts and token total in one reduction
    # reference: counts over the concatenation [local; other]
    cat = torch.cat([experts, other]).tolist()
    counts = [0] * e
    for row in cat:
        for ei in row:
            counts[ei] += 1
    ref = 0.0
    for i in range(e):
        p_i = sum(scores[ti, i].item() for ti in range(t)) / (t + 12)  # local share of P
        ref += counts[i] / (len(cat) * k) * p_i
    ref *= e
    torch.testing.assert_close(loss, torch.tensor(ref), **TOL)
    torch.testing.assert_close(loss, ref_aux_loss(scores, experts, e, extra=other_ids), **TOL)
    assert abs(loss.item() - switch_aux_loss(scores, experts, e).item()) > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_aux_loss_uneven_sequences(reduction):
    """Sequences of different lengths (padding removed) via ``group_ids``; an empty group
    (a sequence that was all padding) is left out of the mean."""
    e, k = 5, 2
    lengths = [3, 1, 0, 6]
    t = sum(lengths)
    scores = _scores(t, e, seed=21, scale=2.0)
    experts = _experts(t, e, k, seed=22, skew=True)
    group_ids = torch.cat([torch.full((n,), g) for g, n in enumerate(lengths)])
    loss = switch_aux_loss(scores, experts, e, n_groups=len(lengths), group_ids=group_ids,
                           reduction=reduction)
    starts = [sum(lengths[:g]) for g in range(len(lengths))]
    groups = [range(a, a + n) for a, n in zip(starts, lengths) if n]
    ref = ref_aux_loss(scores, experts, e, groups=groups)
    torch.testing.assert_close(loss, ref * (len(groups) if reduction == "sum" else 1), **TOL)


@pytest.mark.parametrize("n_groups", [1, 3])
def test_aux_loss_gradient(n_groups):
    t, e, k = 9, 5, 2
    logits = torch.randn(t, e, generator=_gen(9), dtype=torch.float32).requires_grad_(True)
    experts = _experts(t, e, k, seed=10, skew=True)
    switch_aux_loss(torch.softmax(logits, -1), experts, e, n_groups=n_groups).backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_aux_loss(torch.softmax(ref_logits, -1), experts, e, n_groups=n_groups).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(logits.grad, ref_logits.grad, **TOL)


# ---------------------------------------------------------------- z-loss
@pytest.mark.parametrize("t,e,scale", [(1, 4, 1.0), (7, 5, 1.0), (16, 8, 3.0), (5, 3, 100.0)])
def test_router_z_loss(t, e, scale):
    logits = torch.randn(t, e, generator=_gen(t + e)) * scale  # scale 100: naive exp overflows
    z = router_z_loss(logits)
    assert z.dtype == torch.float32 and torch.isfinite(z)
    torch.testing.assert_close(z.double(), ref_z_loss(logits), rtol=1e-6, atol=1e-6)


def test_router_z_loss_hand_value():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 -> mean((ln2)^2, (ln4)^2)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))


def test_router_z_loss_gradient():
    logits = torch.randn(7, 5, generator=_gen(1), dtype=torch.float64).requires_grad_(True)
    router_z_loss(logits).backward()
    ref = logits.detach().clone().requires_grad_(True)
    ref_z_loss(ref).backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- update_balance_bias rule
def test_update_balance_bias_rule_in_place():
    bias = torch.tensor([0.10, 0.00, 0.00, -0.20, 0.05])
    counts = torch.tensor([7, 1, 3, 3, 1])  # mean 3: over, under, equal, equal, under
    ptr = bias.data_ptr()
    out = update_balance_bias(bias, counts, 0.01)
    expected = torch.tensor([0.09, 0.01, 0.00, -0.20, 0.06])
    assert out is bias and bias.data_ptr() == ptr  # updated in place
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-7)


def test_update_balance_bias_sign_not_magnitude():
    """Sign-based: a slightly and a massively overloaded expert move by the same rate."""
    bias = torch.zeros(4)
    update_balance_bias(bias, torch.tensor([10.0, 1000.0, 0.0, 990.0]), 0.5)  # mean 500
    torch.testing.assert_close(bias, torch.tensor([0.5, -0.5, 0.5, -0.5]), rtol=0, atol=0)
    update_balance_bias(bias, torch.tensor([2.0, 2.0, 2.0, 2.0]), 0.5)  # balanced: no change
    torch.testing.assert_close(bias, torch.tensor([0.5, -0.5, 0.5, -0.5]), rtol=0, atol=0)


def test_update_balance_bias_router_buffer():
    cfg = RoutingConfig(top_k=1, bias_update_rate=0.1)
    router = Router(4, 3, 1, cfg)
    router.init_weights(0.1, generator=_gen(0))
    update_balance_bias(router.bias, torch.tensor([0.0, 3.0, 0.0]), 0.1)
    torch.testing.assert_close(router.bias, torch.tensor([0.1, -0.1, 0.1]), rtol=0, atol=1e-7)
    assert dict(router.named_buffers())["bias"] is router.bias


# ---------------------------------------------------------------- aux-loss-free balancing
def _skewed_router(gate: str, rate: float, d=16, e=8, k=2) -> Router:
    cfg = RoutingConfig(gate=gate, top_k=k, bias_update_rate=rate, aux_loss_coef=0.0)
    router = Router(d, e, k, cfg)
    router.init_weights(0.3, generator=_gen(1))
    with torch.no_grad():  # feature 0 is constant 1: a per-expert logit offset
        router.weight[:, 0] = torch.tensor([3.0, 2.5, 2.0, 0.0, 0.0, -1.0, -1.0, -2.0])
    return router


def _run_balancing(router: Router, rate: float, steps: int, t=256, seed=2) -> list[float]:
    g = _gen(seed)
    violations = []
    for _ in range(steps):
        x = torch.randn(t, router.weight.shape[1], generator=g)
        x[:, 0] = 1.0
        with torch.no_grad():
            out = router(x)
        counts = torch.bincount(out.expert_idx, minlength=router.n_experts).float()
        violations.append((counts.max() / counts.mean() - 1.0).item())
        update_balance_bias(router.bias, out.counts, rate)
    return violations


@pytest.mark.parametrize("gate,rate,final_max", [("sigmoid_topk", 0.005, 0.35),
                                                 ("softmax_topk", 0.002, 0.6)])
def test_bias_update_balances_skewed_router(gate, rate, final_max):
    steps = 150
    router = _skewed_router(gate, rate)
    v = _run_balancing(router, rate, steps)
    start, end = v[0], sum(v[-20:]) / 20
    assert start > 2.0  # heavily skewed at the start (ideal: 0)
    assert end < final_max
    assert end < start / 4  # a large drop (measured: 2.34 -> 0.20 sigmoid, 0.45 softmax)
    # the favoured experts were pushed down, the neglected ones up
    assert router.bias[0] < 0 and router.bias[-1] > 0

    # control: same router and data without the update stays skewed
    frozen = _skewed_router(gate, rate)
    v0 = _run_balancing(frozen, 0.0, 20)
    assert min(v0) > 2.0
