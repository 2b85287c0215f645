"""GPU-only: the compiled kernels in bf16 and fp16 at real MoE sizes, against the
references (relative error of whole tensors; elementwise checks at these sizes would
only measure the references' own bf16 rounding). Skipped without CUDA.

Legend: T tokens, D model width, F expert width, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels import (
    grouped_gemm,
    grouped_gemm_reference,
    moe_experts,
    moe_experts_reference,
    moe_experts_topk,
    permute,
    permute_reference,
    sorted_experts,
    sorted_experts_reference,
    unpermute,
    unpermute_reference,
)
from triton_kernels.inputs import flat_assignments, make_grouped_gemm, make_moe, skew_counts

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
REL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
SHAPES = {  # (T, D, F, E, K): fine-grained and coarse, odd sizes
    "olmoe_like": (2048, 2048, 1024, 64, 8),
    "mixtral_like": (1024, 4096, 3584, 8, 2),
    "odd": (777, 1000, 333, 12, 3),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skew", ["uniform", "zipf"])
def test_grouped_gemm_gpu(dtype, skew):
    counts = skew_counts(8192, 32, skew)
    counts[3] = 0  # an empty expert
    x, w, offsets = make_grouped_gemm(counts, 1000, 1536, dtype, "cuda")
    x.requires_grad_()
    w.requires_grad_()
    y = grouped_gemm(x, w, offsets)
    ref = grouped_gemm_reference(x, w, offsets)
    assert rel_err(y, ref) < REL[dtype]
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy)):
        assert rel_err(a, b) < REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_unpermute_gpu(dtype):
    p = make_moe(4096, 2048, 16, 64, 8, "zipf", dtype, "cuda")
    rows, perm, offsets = permute(p["x"], p["experts"], 64)
    r_rows, r_perm, r_offsets = permute_reference(p["x"], p["experts"], 64)
    assert torch.equal(rows, r_rows) and torch.equal(perm, r_perm) and torch.equal(offsets, r_offsets)
    w = p["weights"].float().requires_grad_()
    rows = rows.detach().requires_grad_()
    y = unpermute(rows, perm, w)
    ref = unpermute_reference(rows, perm, w)
    assert rel_err(y, ref) < REL[dtype]
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (rows, w), dy), torch.autograd.grad(ref, (rows, w), dy)):
        assert rel_err(a, b) < REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe_experts_gpu(dtype, shape):
    p = make_moe(*SHAPES[shape], skew="zipf", dtype=dtype, device="cuda", requires_grad=True)
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])
    leaves = [p[n] for n in ("x", "w_in", "w_out", "weights")]
    ref = moe_experts_reference(p["x"], tok, exp, wgt, p["w_in"], p["w_out"])
    want = torch.autograd.grad(ref, leaves, p["dy"], retain_graph=True)
    for y in (moe_experts(p["x"], tok, exp, wgt, p["w_in"], p["w_out"]),
              moe_experts_topk(p["x"], p["experts"], p["weights"], p["w_in"], p["w_out"])):
        assert rel_err(y, ref) < REL[dtype]
        got = torch.autograd.grad(y, leaves, p["dy"], retain_graph=True)
        for name, a, b in zip(("x", "w_in", "w_out", "weights"), got, want):
            assert rel_err(a, b) < REL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_sorted_experts_gpu(dtype):
    """The experts alone on expert-sorted rows (what the all-to-all dispatcher feeds)."""
    counts = skew_counts(8192, 64, "zipf")
    counts[5] = 0
    rows, w_in, offsets = make_grouped_gemm(counts, 2048, 2 * 512, dtype, "cuda")
    w_out = (torch.randn(64, 512, 2048, device="cuda") / 512 ** 0.5).to(dtype)
    leaves = [v.requires_grad_() for v in (rows, w_in, w_out)]
    y = sorted_experts(rows, offsets, w_in, w_out)
    ref = sorted_experts_reference(rows, offsets, w_in, w_out)
    assert rel_err(y, ref) < REL[dtype]
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        assert rel_err(a, b) < REL[dtype]
