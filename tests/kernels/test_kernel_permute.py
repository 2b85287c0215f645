"""Permute / unpermute kernels vs their plain-torch references (values and gradients).

Legend: T tokens, K experts per token, E experts, D width.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels import permute, permute_reference, unpermute, unpermute_reference
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


def test_n_experts_inferred_when_omitted():
    x, experts, _, e = _inputs("uniform")
    _, _, offsets = permute(x, experts)
    assert offsets.numel() == int(experts.max()) + 1


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
