"""Permute / unpermute kernels vs their plain-torch references (values and gradients).

Legend: T tokens, K experts per token, E experts, D width.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels import (
    grouped_gemm,
    grouped_gemm_reference,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)
from triton_kernels.inputs import TOLERANCES, make_topk

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {  # name: (T, E, K, D, skew)
    "uniform": (37, 8, 3, 40, "uniform"),
    "one_token": (1, 4, 2, 16, "uniform"),
    "all_on_one_expert_k1": (20, 5, 1, 33, "one_expert"),
    "zipf_k8": (50, 16, 8, 24, "zipf"),
    "empty_experts": (9, 8, 2, 17, "half_empty"),
}


def _inputs(case, dtype=torch.float32):
    t, e, k, d, skew = CASES[case]
    experts, weights = make_topk(t, e, k, skew, seed=1, device=DEV)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    return x, experts, weights, e


@pytest.mark.parametrize("case", list(CASES))
def test_permute_matches_reference(case):
    x, experts, _, e = _inputs(case)
    x.requires_grad_()
    rows, perm, offsets = permute(x, experts, e)
    r_rows, r_perm, r_offsets = permute_reference(x, experts, e)
    assert torch.equal(perm, r_perm) and torch.equal(offsets, r_offsets)
    assert torch.equal(rows, r_rows)  # a pure copy: bit-exact
    g = torch.randn_like(rows)
    (dx,) = torch.autograd.grad(rows, x, g)
    (r_dx,) = torch.autograd.grad(r_rows, x, g)
    torch.testing.assert_close(dx, r_dx, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_matches_reference(case, dtype):
    x, experts, weights, e = _inputs(case, dtype)
    rows, perm, _ = permute_reference(x, experts, e)
    rows = rows.detach().requires_grad_()
    weights = weights.requires_grad_()
    y = unpermute(rows, perm, weights)
    ref = unpermute_reference(rows, perm, weights)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (rows, weights), dy)
    want = torch.autograd.grad(ref, (rows, weights), dy)
    for name, a, b in zip(("drows", "dweights"), got, want):
        torch.testing.assert_close(a, b, atol=atol * 4, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_roundtrip_with_unit_weights_sums_k_copies():
    x, experts, _, e = _inputs("uniform")
    rows, perm, _ = permute(x, experts, e)
    ones = torch.ones(experts.shape, device=DEV)
    torch.testing.assert_close(unpermute(rows, perm, ones), x * experts.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_highest_experts_without_tokens_keep_their_offsets(dtype):
    """Ids only in [0, 5) with E = 8: offsets still has 8 entries, the last 3 equal to N,
    and feed a grouped GEMM over all 8 experts; forward and dx match the reference."""
    t, e, used, k, d = 13, 8, 5, 2, 19
    experts, _ = make_topk(t, used, k, "uniform", seed=3, device=DEV)  # [T, K] ids < 5
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
    x.requires_grad_()
    rows, perm, offsets = permute(x, experts, e)
    r_rows, r_perm, r_offsets = permute_reference(x, experts, e)
    counts = torch.stack([(experts == i).sum() for i in range(e)])  # [E], by a loop
    assert offsets.shape == (e,) and offsets.dtype == torch.int32
    assert offsets.tolist() == torch.cumsum(counts, 0).tolist()
    assert offsets[used:].tolist() == [t * k] * (e - used) and int(offsets[used - 1]) == t * k
    assert torch.equal(offsets, r_offsets) and torch.equal(perm, r_perm)
    assert torch.equal(rows, r_rows)
    g = torch.randn(rows.shape, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
    (dx,) = torch.autograd.grad(rows, x, g)
    (r_dx,) = torch.autograd.grad(r_rows, x, g)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(dx, r_dx, atol=atol, rtol=rtol)
    # the offsets are what grouped_gemm needs for w [E, D, F]: one end per expert
    w = (torch.randn(e, d, 7, generator=torch.Generator().manual_seed(6)) * d**-0.5).to(DEV, dtype)
    torch.testing.assert_close(grouped_gemm(rows.detach(), w, offsets),
                               grouped_gemm_reference(r_rows.detach(), w, r_offsets),
                               atol=atol, rtol=rtol)


def test_no_tokens_gives_e_zero_offsets():
    x = torch.zeros(0, 8, device=DEV, requires_grad=True)
    experts = torch.zeros(0, 2, dtype=torch.long, device=DEV)
    rows, perm, offsets = permute(x, experts, 4)
    assert rows.shape == (0, 8) and perm.numel() == 0
    assert offsets.tolist() == [0, 0, 0, 0] and offsets.dtype == torch.int32
    assert torch.equal(offsets, permute_reference(x, experts, 4)[2])


@pytest.mark.parametrize("fn", [permute, permute_reference])
def test_expert_id_out_of_range_raises(fn):
    x, experts, _, e = _inputs("uniform")  # ids in [0, 8)
    bad = experts.clone()
    bad[5, 1] = e  # one id == E
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, n_experts=8\) but the "
                                         r"largest is 8"):
        fn(x, bad, e)
    with pytest.raises(ValueError, match=r"n_experts=6\) but the largest is 7"):
        fn(x, experts, e - 2)  # too small an E for ids that reach 7


@pytest.mark.parametrize("fn", [permute, permute_reference])
def test_n_experts_is_required_and_a_positive_int(fn):
    x, experts, _, e = _inputs("uniform")
    with pytest.raises(TypeError, match="n_experts"):
        fn(x, experts)  # no inferring E from the ids (a host sync, short offsets)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"n_experts must be a positive int.*got {bad}"):
            fn(x, experts, bad)
    for bad in (8.0, torch.tensor(8), None, True):
        with pytest.raises(TypeError, match="n_experts must be a positive Python int"):
            fn(x, experts, bad)


def test_bad_inputs_raise_clear_errors():
    x, experts, weights, e = _inputs("uniform")
    with pytest.raises(ValueError, match="experts has 36 rows but x has 37"):
        permute(x, experts[:-1], e)
    with pytest.raises(TypeError, match="experts must be int32 or int64"):
        permute(x, experts.float(), e)
    rows, perm, _ = permute(x, experts, e)
    with pytest.raises(ValueError, match=r"weights \(36, 3\) needs perm of 108"):
        unpermute(rows, perm, weights[:-1])
    with pytest.raises(ValueError, match=r"weights must be \[T, K\]"):
        unpermute(rows, perm, weights.reshape(-1))
