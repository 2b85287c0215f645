"""Grouped GEMM kernel vs its plain-torch reference, forward and both gradients.

Legend: R rows, K reduction width, N output width, E groups. Runs under
TRITON_INTERPRET=1 on CPU (set in conftest), compiled on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels import grouped_gemm, grouped_gemm_reference
from triton_kernels.inputs import TOLERANCES, make_grouped_gemm

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {  # name: (group sizes, K, N)
    "mixed_with_empty": ([3, 0, 17, 5], 24, 40),
    "all_rows_last_group": ([0, 0, 33], 17, 19),
    "single_row": ([1], 16, 16),
    "empty_first_and_last": ([0, 7, 0], 20, 9),
    "k1_odd_n": ([4, 6], 1, 37),
    "larger_than_block": ([70, 2, 41], 48, 66),
}


def _check(counts, k, n, dtype, seed=0):
    x, w, offsets = make_grouped_gemm(counts, k, n, dtype, DEV, seed)
    x.requires_grad_()
    w.requires_grad_()
    y = grouped_gemm(x, w, offsets)
    ref = grouped_gemm_reference(x, w, offsets)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), dy)
    want = torch.autograd.grad(ref, (x, w), dy)
    for name, g, r in zip(("dx", "dw"), got, want):
        torch.testing.assert_close(g, r, atol=atol * 4, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    _check(*CASES[case], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_half(dtype):
    # the interpreter's bf16 tl.dot is broken; the kernel upcasts dot operands there
    _check([5, 0, 12], 24, 20, dtype)


def test_empty_group_gets_zero_weight_grad():
    x, w, offsets = make_grouped_gemm([4, 0, 3], 16, 16, device=DEV)
    w.requires_grad_()
    grouped_gemm(x, w, offsets).sum().backward()
    assert torch.count_nonzero(w.grad[1]) == 0
    assert torch.count_nonzero(w.grad[0]) > 0


def test_rows_past_last_offset_are_zero():
    x, w, _ = make_grouped_gemm([10], 16, 24, device=DEV)
    x.requires_grad_()
    offsets = torch.tensor([6], dtype=torch.int32, device=DEV)  # rows 6..9 belong to no group
    y = grouped_gemm(x, w, offsets)
    assert torch.count_nonzero(y[6:]) == 0
    torch.testing.assert_close(y[:6], (x[:6] @ w[0]).detach(), atol=1e-5, rtol=1e-4)
    y.sum().backward()
    assert torch.count_nonzero(x.grad[6:]) == 0


def test_int64_offsets_and_noncontiguous_inputs():
    x, w, offsets = make_grouped_gemm([3, 9], 20, 18, device=DEV)
    xt = x.t().contiguous().t()  # same values, column-major
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(grouped_gemm(xt, wt, offsets.long()),
                               grouped_gemm_reference(x, w, offsets), atol=1e-5, rtol=1e-4)


def test_deterministic():
    x, w, offsets = make_grouped_gemm([11, 0, 7], 24, 20, device=DEV)
    assert torch.equal(grouped_gemm(x, w, offsets), grouped_gemm(x, w, offsets))


@pytest.mark.parametrize("mutate,err,match", [
    (lambda x, w, o: (x[:, :-1], w, o), ValueError, r"x has K=23 columns"),
    (lambda x, w, o: (x, w.double(), o), TypeError, r"dtypes must match"),
    (lambda x, w, o: (x.double(), w.double(), o), TypeError, r"fp32, bf16 or fp16"),
    (lambda x, w, o: (x, w, o[:-1]), ValueError, r"offsets has 1 entries but w has 2"),
    (lambda x, w, o: (x, w, o.float()), TypeError, r"offsets must be int32 or int64"),
    (lambda x, w, o: (x[None], w, o), ValueError, r"x must be \[rows, K\]"),
])
def test_bad_inputs_raise_clear_errors(mutate, err, match):
    x, w, offsets = make_grouped_gemm([3, 4], 24, 16, device=DEV)
    with pytest.raises(err, match=match):
        grouped_gemm(*mutate(x, w, offsets))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, offsets = make_grouped_gemm([3, 4], 16, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        grouped_gemm(x, w, offsets)


def test_deterministic_mode_bypasses_autotuning(monkeypatch):
    """Under torch.use_deterministic_algorithms the GPU launch uses one fixed tile config
    (tile sizes set the accumulation order), not the autotuner's timing-based pick: the
    first config of the space that fits the device."""
    import importlib

    gg_mod = importlib.import_module("triton_kernels.grouped_gemm")  # the module, not the op
    tuning = importlib.import_module("triton_kernels.tuning")
    monkeypatch.setattr(gg_mod, "interpreting", lambda: False)  # the GPU code path
    a = torch.empty(8, 16, dtype=torch.bfloat16)
    tuned, blocks, cfgs = gg_mod._kernel("swiglu", a)
    assert blocks == {} and tuned is not gg_mod._gg_kernel and cfgs == tuning.configs("swiglu")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for space in ("gg", "swiglu", "dw"):
            kern, blocks, cfgs = gg_mod._kernel(space, a)
            first = tuning.configs(space)[0]
            assert kern is (gg_mod._gg_dw_kernel if space == "dw" else gg_mod._gg_kernel)
            assert blocks == {**first.kwargs, "num_warps": first.num_warps,
                              "num_stages": first.num_stages}
            assert cfgs == [first]
    finally:
        torch.use_deterministic_algorithms(prev)
