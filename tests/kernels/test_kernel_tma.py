"""The TMA (tensor-descriptor) variant of the grouped GEMMs: when it is chosen, and that it
matches the references, forward and every gradient, in Triton's interpreter (which emulates
descriptors, bounds and zero padding included). ``TRITON_KERNELS_TMA=1`` asks for it.

Legend: R rows, K reduction width, N output width, E groups; T, D, F, K(top-k) as in moe.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from triton_kernels import (grouped_gemm, grouped_gemm_reference, moe_experts, moe_experts_reference,
                            sorted_experts, sorted_experts_reference)
from triton_kernels.inputs import TOLERANCES, flat_assignments, make_grouped_gemm, make_moe
from triton_kernels.tma import dw_tma_ok, gg_tma_ok

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gg_mod = importlib.import_module("triton_kernels.grouped_gemm")  # the module, not the op


@pytest.fixture
def tma(monkeypatch):
    """Ask for TMA and record, per launch, (space, USE_TMA) as the launchers chose them."""
    monkeypatch.setenv("TRITON_KERNELS_TMA", "1")
    seen: list[tuple[str, bool]] = []
    pick = gg_mod._kernel

    def spy(space, a, tma_ok=False):
        kern, blocks, cfgs = pick(space, a, tma_ok)
        seen.append((space, bool(blocks.get("USE_TMA", any(c.kwargs["USE_TMA"] for c in cfgs)))))
        return kern, blocks, cfgs

    monkeypatch.setattr(gg_mod, "_kernel", spy)
    return seen


def test_operands_that_allow_tma():
    x = torch.empty(10, 24)  # 96-byte rows
    w = torch.empty(3, 24, 40)
    assert gg_tma_ok(x, w, None, False) and gg_tma_ok(x, w, None, True)
    assert not gg_tma_ok(torch.empty(10, 17), torch.empty(3, 17, 40), None, False)  # 68-byte rows
    assert gg_tma_ok(torch.empty(10, 17), w, torch.zeros(5, dtype=torch.int32), False)  # A gathered
    assert not gg_tma_ok(x, torch.empty(3, 40, 24).transpose(1, 2), None, False)  # W not row-major
    assert not gg_tma_ok(x[:, 1:], torch.empty(3, 23, 40), None, False)  # base off 16 bytes
    assert gg_tma_ok(x, w, None, False, swiglu=True)  # up columns start at N = 20: 80 bytes
    assert not gg_tma_ok(x.bfloat16(), w.bfloat16(), None, False, swiglu=True)  # 40 bytes
    idx = torch.zeros(10, dtype=torch.int32)
    assert dw_tma_ok(x, torch.empty(10, 40), None, None)
    assert dw_tma_ok(torch.empty(4, 17), torch.empty(10, 40), idx, None)  # only B via TMA
    assert not dw_tma_ok(x, torch.empty(10, 9), None, None)  # 36-byte rows of B
    assert not dw_tma_ok(x, torch.empty(10, 40), idx, idx)  # nothing left for TMA


CASES = {  # name: (group sizes, K, N); interpreter blocks are 32
    "mixed_with_empty": ([3, 0, 17, 5], 24, 40),
    "k_and_n_tails": ([70, 2, 41], 40, 72),
    "empty_first_and_last": ([0, 7, 0], 32, 8),
    "single_row": ([1], 16, 16),
}


def _run(op, x, w, offsets, dy=None):
    """(y, dx, dw) of ``op`` (the kernel or the reference) with a fixed ``dy``."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = op(x, w, offsets)
    dy = torch.randn_like(y, generator=torch.Generator().manual_seed(0)) if dy is None else dy
    return (y, *torch.autograd.grad(y, (x, w), dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_gemm_tma_matches_reference(tma, case, dtype):
    x, w, offsets = make_grouped_gemm(*CASES[case], dtype, DEV, seed=1)
    atol, rtol = TOLERANCES[dtype]
    got, want = _run(grouped_gemm, x, w, offsets), _run(grouped_gemm_reference, x, w, offsets)
    for name, g, r, scale in zip(("y", "dx", "dw"), got, want, (1, 4, 4)):
        torch.testing.assert_close(g, r, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")
    assert tma == [("gg", True), ("gg", True), ("dw", True)]  # forward, dx, dw


def test_unaligned_rows_fall_back_to_pointer_loads(tma):
    x, w, offsets = make_grouped_gemm([5, 6], 17, 12, device=DEV)  # fp32, 68-byte rows of x
    torch.testing.assert_close(grouped_gemm(x, w, offsets), grouped_gemm_reference(x, w, offsets),
                               atol=1e-5, rtol=1e-4)
    assert tma == [("gg", False)]


def test_next_group_never_leaks_in(tma):
    """Descriptors over a group's rows end at the group's end and W's is 3-D: NaN in the
    next group's rows and weights must not reach this group's outputs or gradients
    (a descriptor over all rows would multiply them by the padding's zeros: NaN)."""
    x, w, offsets = make_grouped_gemm([5, 7], 40, 24, device=DEV)  # K = 40: a tail of 32
    x[5:] = float("nan")
    w[1] = float("nan")
    dy = torch.randn(12, 24)
    dy[5:] = float("nan")
    y, dx, dw = _run(grouped_gemm, x, w, offsets, dy)
    ry, rdx, rdw = _run(grouped_gemm_reference, x, w, offsets, dy)
    for name, g, r in (("y", y[:5], ry[:5]), ("dx", dx[:5], rdx[:5]), ("dw", dw[0], rdw[0])):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert tma == [("gg", True), ("gg", True), ("dw", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_tma_matches_reference(tma, dtype):
    """Gathered GEMM 1 (W through TMA), GEMM 2, and both weight gradients (the side that is
    not gathered through TMA)."""
    p = make_moe(23, 24, 24, 6, 2, "uniform", dtype=dtype, device=DEV, requires_grad=True)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    y = moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    ref = moe_experts_reference(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    leaves = [p[n] for n in ("x", "w_in", "w_out", "weights")]
    got = torch.autograd.grad(y, leaves, p["dy"], retain_graph=True)
    want = torch.autograd.grad(ref, leaves, p["dy"])
    for name, a, b in zip(("x", "w_in", "w_out", "weights"), got, want):
        torch.testing.assert_close(a, b, atol=atol * 4, rtol=rtol * 2, msg=lambda m: f"d{name}: {m}")
    assert tma and all(use for _, use in tma)
    assert {s for s, _ in tma} == {"gg", "swiglu", "dw"}


def test_sorted_experts_tma_matches_reference(tma):
    rows, w_in, offsets = make_grouped_gemm([9, 0, 14], 24, 2 * 16, device=DEV, seed=3)
    w_out = torch.randn(3, 16, 24, device=DEV) / 4
    leaves = [v.requires_grad_() for v in (rows, w_in, w_out)]
    y = sorted_experts(rows, offsets, w_in, w_out)
    ref = sorted_experts_reference(rows, offsets, w_in, w_out)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(a, b, atol=4e-5, rtol=1e-4)
    assert tma and all(use for _, use in tma)
