"""Expert capacity and the GShard-priority keep mask, against a loop reference."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.routing import capacity_keep_mask, expert_capacity


def ref_keep_mask(experts: torch.Tensor, n_experts: int, capacity: int) -> list[list[bool]]:
    """GShard priority: choice rank 0 for all tokens (in token order), then rank 1, ...;
    each expert keeps its first ``capacity`` assignments."""
    ids = experts.tolist()
    t = len(ids)
    k = len(ids[0]) if t else 0
    used = [0] * n_experts
    keep = [[False] * k for _ in range(t)]
    for j in range(k):  # choice rank first
        for ti in range(t):  # then token order
            e = ids[ti][j]
            if used[e] < capacity:
                keep[ti][j] = True
                used[e] += 1
    return keep


def _experts(t: int, e: int, k: int, seed: int, skew: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(t, e, generator=g) - skew * torch.linspace(1.0, 0.0, e)
    return r.argsort(dim=-1)[:, :k].contiguous()


# ---------------------------------------------------------------- expert_capacity
@pytest.mark.parametrize("t,k,e,cf,expected", [
    (8, 2, 4, 1.0, 4),  # exact
    (8, 2, 4, 1.25, 5),
    (8, 2, 4, 2.0, 8),
    (7, 1, 5, 1.0, 2),  # ceil(1.4)
    (7, 2, 5, 1.0, 3),  # ceil(2.8)
    (10, 2, 4, 0.5, 3),  # ceil(2.5)
    (1, 1, 8, 1.0, 1),  # ceil(0.125)
    (3, 1, 64, 0.01, 1),  # never below 1
    (16, 4, 16, 1.5, 6),  # ceil(6.0)
    (32, 2, 8, 0.75, 6),
])
def test_expert_capacity(t, k, e, cf, expected):
    assert expert_capacity(t, k, e, cf) == expected


def test_expert_capacity_exact_arithmetic():
    # 1.1 * 100 * 1 / 2 is 55.000000000000007 in floats; the capacity is ceil(55) = 55.
    assert expert_capacity(100, 1, 2, 1.1) == 55
    assert expert_capacity(30, 1, 10, 1.1) == 4  # 3.3 -> 4
    assert expert_capacity(70, 1, 7, 0.7) == 7  # 7.000000000000001 in floats


def test_expert_capacity_argument_order():
    # (n_tokens, top_k, n_experts, cf): swapping k and E changes the answer.
    assert expert_capacity(12, 1, 4, 1.0) == 3
    assert expert_capacity(12, 4, 1, 1.0) == 48


# ---------------------------------------------------------------- capacity_keep_mask
def test_keep_mask_hand_example_rank_major():
    """First choices of all tokens beat any second choice (token-major order would keep
    token 1's second choice and drop token 2's first)."""
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert capacity_keep_mask(experts, 2, 1).tolist() == [[True, False], [True, False],
                                                          [False, False]]
    assert capacity_keep_mask(experts, 2, 2).tolist() == [[True, True], [True, False],
                                                          [True, False]]
    assert capacity_keep_mask(experts, 2, 3).tolist() == [[True, True], [True, True],
                                                          [True, True]]


@pytest.mark.parametrize("t,e,k,cap,skew", [
    (7, 5, 1, 1, 0.0), (7, 5, 2, 2, 0.0), (7, 5, 2, 3, 0.5), (16, 8, 2, 4, 0.0),
    (16, 8, 2, 3, 0.7), (32, 4, 2, 10, 0.5), (9, 6, 3, 2, 0.3), (1, 4, 2, 1, 0.0),
    (5, 5, 5, 2, 0.0), (13, 3, 1, 4, 0.6),
])
def test_keep_mask_matches_reference(t, e, k, cap, skew):
    experts = _experts(t, e, k, seed=t * 31 + e * 7 + k + cap, skew=skew)
    keep = capacity_keep_mask(experts, e, cap)
    assert keep.dtype == torch.bool and keep.shape == (t, k)
    assert keep.tolist() == ref_keep_mask(experts, e, cap)
    kept = torch.bincount(experts[keep], minlength=e)
    assert int(kept.max()) <= cap


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cap", [1, 3, 6])
def test_keep_mask_all_tokens_on_one_expert(k, cap):
    t, e = 6, 4
    experts = torch.zeros(t, k, dtype=torch.int64)
    experts[:, 0] = 2  # every first choice is expert 2
    if k == 2:
        experts[:, 1] = 0  # ... and every second choice expert 0
    keep = capacity_keep_mask(experts, e, cap)
    # expert 2 keeps tokens 0..cap-1 (token order); same for expert 0 on rank 1
    expected_col = [ti < cap for ti in range(t)]
    assert keep[:, 0].tolist() == expected_col
    if k == 2:
        assert keep[:, 1].tolist() == expected_col
    assert keep.tolist() == ref_keep_mask(experts, e, cap)


@pytest.mark.parametrize("t,e,k", [(7, 5, 2), (16, 8, 2), (1, 3, 3), (10, 2, 1)])
def test_keep_mask_capacity_larger_than_needed_drops_nothing(t, e, k):
    experts = _experts(t, e, k, seed=t + e + k, skew=0.8)
    for cap in (t, t * k, 10 * t * k):  # t already suffices: an expert appears once per token
        assert capacity_keep_mask(experts, e, cap).all()


@pytest.mark.parametrize("t,e,k", [(7, 5, 2), (16, 8, 3), (4, 6, 2)])
def test_keep_mask_capacity_one(t, e, k):
    experts = _experts(t, e, k, seed=3 * t + e + k, skew=0.4)
    keep = capacity_keep_mask(experts, e, 1)
    assert keep.tolist() == ref_keep_mask(experts, e, 1)
    # each used expert keeps exactly one assignment: the first one in priority order
    used = set(experts.reshape(-1).tolist())
    assert int(keep.sum()) == len(used)
    for ei in used:
        first = None
        for j in range(k):
            for ti in range(t):
                if first is None and experts[ti, j].item() == ei:
                    first = (ti, j)
        assert keep[first].item()
