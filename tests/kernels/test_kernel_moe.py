"""Fused SwiGLU MoE expert function vs the plain-torch loop: output and every gradient
(x, w_in, w_out, routing weights) for the routing shapes the model produces.

Legend: T tokens, D model width, F expert width, E experts, K experts per token,
N assignments.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels import (moe_experts, moe_experts_reference, moe_experts_topk, sorted_experts,
                            sorted_experts_reference)
from triton_kernels.inputs import TOLERANCES, flat_assignments, make_moe

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {  # name: (T, D, F, E, K, skew)
    "uniform_k2": (23, 24, 20, 6, 2, "uniform"),
    "one_token": (1, 16, 16, 4, 1, "uniform"),
    "all_on_one_expert_odd_sizes": (17, 33, 19, 5, 1, "one_expert"),
    "zipf_k8": (12, 16, 24, 16, 8, "zipf"),
    "empty_experts": (9, 16, 16, 8, 2, "half_empty"),
    "wider_than_blocks": (40, 72, 40, 4, 2, "uniform"),
}
INPUTS = ("x", "w_in", "w_out", "weights")


def _compare(p, tok, exp, wgt, y, dtype):
    ref = moe_experts_reference(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    leaves = [p[n] for n in INPUTS]
    got = torch.autograd.grad(y, leaves, p["dy"], retain_graph=True)  # shares the routing graph
    want = torch.autograd.grad(ref, leaves, p["dy"])
    for name, a, b in zip(INPUTS, got, want):
        torch.testing.assert_close(a, b, atol=atol * 4, rtol=rtol * 2,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_flat_assignments_match_reference(case):
    p = make_moe(*CASES[case], device=DEV, requires_grad=True)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    _compare(p, tok, exp, wgt, moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"]),
             torch.float32)


@pytest.mark.parametrize("case", ["uniform_k2", "zipf_k8", "empty_experts"])
def test_topk_form_matches_reference(case):
    p = make_moe(*CASES[case], device=DEV, requires_grad=True)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    y = moe_experts_topk(p["x"], p["experts"], p["weights"], p["w_in"], p["w_out"])
    _compare(p, tok, exp, wgt, y, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(dtype):
    p = make_moe(20, 32, 24, 4, 2, dtype=dtype, device=DEV, requires_grad=True)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    _compare(p, tok, exp, wgt, moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"]), dtype)


def test_capacity_dropped_assignments():
    """Some assignments removed (tokens with 0, 1 or 2 left), as capacity dropping does."""
    p = make_moe(15, 16, 16, 4, 2, device=DEV, requires_grad=True)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    keep = torch.rand(tok.numel(), generator=torch.Generator().manual_seed(3)) > 0.4
    keep[:2] = False  # token 0 fully dropped
    keep = keep.to(DEV)
    tok, exp, wgt = tok[keep], exp[keep], wgt[keep]
    y = moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    assert torch.count_nonzero(y[0]) == 0
    _compare(p, tok, exp, wgt, y, torch.float32)


def test_expert_choice_order_and_repeated_tokens():
    """Expert-major assignments (not token-sorted), a token picked by 0..E experts."""
    p = make_moe(10, 16, 16, 4, 1, device=DEV, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    cap = 5
    tok = torch.cat([torch.randperm(10, generator=g)[:cap] for _ in range(4)]).to(DEV)  # [E*C]
    exp = torch.arange(4).repeat_interleave(cap).to(DEV)
    wgt = torch.rand(4 * cap, generator=g).to(DEV).requires_grad_()
    y = moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    ref = moe_experts_reference(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    leaves = [p["x"], p["w_in"], p["w_out"], wgt]
    for a, b in zip(torch.autograd.grad(y, leaves, p["dy"]), torch.autograd.grad(ref, leaves, p["dy"])):
        torch.testing.assert_close(a, b, atol=4e-5, rtol=2e-4)


def test_nothing_routed_gives_zeros_and_zero_grads():
    p = make_moe(6, 16, 16, 4, 1, device=DEV, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long, device=DEV)
    wgt = torch.zeros(0, device=DEV, requires_grad=True)
    y = moe_experts(p["x"], empty, empty, wgt, p["w_in"], p["w_out"])
    assert y.shape == p["x"].shape and torch.count_nonzero(y) == 0
    gx, gin, gout = torch.autograd.grad(y, (p["x"], p["w_in"], p["w_out"]), p["dy"])
    assert torch.count_nonzero(gx) + torch.count_nonzero(gin) + torch.count_nonzero(gout) == 0


def test_deterministic():
    p = make_moe(23, 24, 20, 6, 2, device=DEV)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    a = moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    assert torch.equal(a, moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"]))


def test_bad_inputs_raise_clear_errors():
    p = make_moe(8, 16, 16, 4, 2, device=DEV)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    with pytest.raises(ValueError, match=r"shapes do not fit.*w_out \(4, 16, 17\)"):
        moe_experts(p["x"], tok, exp, wgt, p["w_in"], torch.zeros(4, 16, 17, device=DEV))
    with pytest.raises(ValueError, match="must all be \\[N\\]"):
        moe_experts(p["x"], tok, exp[:-1], wgt, p["w_in"], p["w_out"])
    with pytest.raises(TypeError, match="expert_idx must be int32 or int64"):
        moe_experts(p["x"], tok, exp.float(), wgt, p["w_in"], p["w_out"])
    with pytest.raises(TypeError, match="dtypes must match"):
        moe_experts(p["x"], tok, exp, wgt, p["w_in"].half(), p["w_out"])
    with pytest.raises(ValueError, match=r"experts \(8, 2\) and weights \(8, 1\)"):
        moe_experts_topk(p["x"], p["experts"], p["weights"][:, :1], p["w_in"], p["w_out"])
    with pytest.raises(ValueError, match=r"moe_experts: expert ids must be in \[0, n_experts=4\)"):
        moe_experts(p["x"], tok, torch.full_like(exp, 4), wgt, p["w_in"], p["w_out"])  # id == E


def test_frozen_inputs_get_no_gradient_and_the_rest_still_match():
    p = make_moe(11, 16, 16, 4, 2, device=DEV)
    p["w_in"].requires_grad_()  # only the first expert weights train
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    y = moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    ref = moe_experts_reference(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    (got,) = torch.autograd.grad(y, p["w_in"], p["dy"])
    (want,) = torch.autograd.grad(ref, p["w_in"], p["dy"])
    torch.testing.assert_close(got, want, atol=4e-5, rtol=2e-4)


@pytest.mark.parametrize("case", ["uniform_k2", "all_on_one_expert_odd_sizes", "empty_experts"])
def test_sorted_experts_match_reference(case):
    """The experts alone on rows a dispatcher sorted by expert (empty groups included)."""
    p = make_moe(*CASES[case], device=DEV, requires_grad=True)
    tok, exp, _ = flat_assignments(p["experts"], p["weights"])
    order = torch.argsort(exp, stable=True)
    offsets = torch.cumsum(torch.bincount(exp, minlength=p["w_in"].shape[0]), 0).to(torch.int32)
    rows = p["x"].detach()[tok[order]].clone().requires_grad_()  # [N, D]
    leaves = [rows, p["w_in"], p["w_out"]]
    y = sorted_experts(rows, offsets, p["w_in"], p["w_out"])
    ref = sorted_experts_reference(rows, offsets, p["w_in"], p["w_out"])
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    dy = torch.randn_like(y)
    for name, a, b in zip(("rows", "w_in", "w_out"), torch.autograd.grad(y, leaves, dy),
                          torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(a, b, atol=atol * 4, rtol=rtol * 2, msg=lambda m: f"d{name}: {m}")


def test_sorted_experts_refuses_offsets_of_another_expert_count():
    p = make_moe(8, 16, 16, 4, 1, device=DEV)
    with pytest.raises(ValueError, match="offsets has 3 entries but w has 4 experts"):
        sorted_experts(p["x"], torch.tensor([2, 5, 8], dtype=torch.int32), p["w_in"], p["w_out"])


@pytest.mark.parametrize("case", ["uniform_k2", "empty_experts"])
def test_fused_pipeline_passes_torch_library_opcheck(case):
    """The fused forward is a ``torch.library`` custom op (so ``torch.compile`` keeps it in
    one graph): ``opcheck`` checks its schema, its fake implementation against the real
    outputs, and its autograd registration (gradients through the backward op)."""
    from triton_kernels.moe import _token_order

    p = make_moe(*CASES[case], device=DEV, requires_grad=True)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    _, tok_s, exp_s, w_s, idx = _token_order(tok, exp, wgt.detach().requires_grad_(), p["x"].shape[0])
    args = (p["x"], p["w_in"], p["w_out"], w_s, tok_s, exp_s, idx.tok_ptr, 0)
    torch.library.opcheck(torch.ops.triton_kernels.moe_experts_fwd.default, args)


def test_sorted_experts_pass_torch_library_opcheck():
    """The sorted-rows experts (what the all-to-all dispatcher feeds) are custom ops too."""
    p = make_moe(*CASES["empty_experts"], device=DEV, requires_grad=True)
    tok, exp, _ = flat_assignments(p["experts"], p["weights"])
    order = torch.argsort(exp, stable=True)
    offsets = torch.cumsum(torch.bincount(exp, minlength=p["w_in"].shape[0]), 0).to(torch.int32)
    rows = p["x"].detach()[tok[order]].clone().requires_grad_()  # [N, D]
    torch.library.opcheck(torch.ops.triton_kernels.sorted_experts_fwd.default,
                          (rows, offsets, p["w_in"], p["w_out"]))
