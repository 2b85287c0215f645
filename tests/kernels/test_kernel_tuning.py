"""Launch tuning (``triton_kernels.tuning``): autotune spaces, shared-memory pruning and the
occupancy-sized persistent grid. All host-side logic, checked on the CPU; the numbers it
encodes come from ``sm90_compile_check.py`` (sm_90).

Legend: BM/BN/BK block sizes, w warps, s stages, R rows, E groups.
"""

from __future__ import annotations

import pytest
import torch
import triton

from triton_kernels import tuning
from triton_kernels.tuning import H100, DeviceLimits

SPACES = ("gg", "swiglu", "dw")


@pytest.mark.parametrize("space,elem,fma", [(s, e, e == 4) for s in SPACES for e in (2, 4)])
def test_spaces_fit_h100_and_have_unique_tiles(space, elem, fma):
    """Every config fits an H100/H200 block (nothing for the autotuner to discard after
    compiling), and block sizes identify a config (the grid looks it up by them)."""
    cfgs = tuning.configs(space, fma)
    assert cfgs
    for c in cfgs:
        assert tuning.smem_bytes(space, c.kwargs, c.num_stages, elem) <= H100.smem_block, c
    keys = [tuple(sorted(c.kwargs.items())) for c in cfgs]
    assert len(set(keys)) == len(keys)


def test_dw_space_keeps_wgmma_shapes():
    """dw's output tile is (BK, BN): BK < 64 on 4 warps has no wgmma instruction shape."""
    for c in tuning.configs("dw"):
        assert c.kwargs["BLOCK_K"] >= 64


def test_smem_estimate_matches_compiled_kernels():
    """Shared memory Triton allocated for these configs (sm90_compile_check, bf16, OLMoE
    shape); the estimate may exceed it by its 1 KB margin, never fall short."""
    seen = {  # (space, BM, BN, BK, s): KB
        ("gg", 128, 128, 64, 3): 96.0, ("gg", 128, 256, 64, 3): 144.0,
        ("swiglu", 64, 128, 64, 4): 160.0, ("swiglu", 128, 64, 64, 4): 128.0,
        ("dw", 128, 256, 64, 3): 240.0, ("dw", 64, 128, 128, 3): 96.0,
    }
    for (space, m, n, k, s), kb in seen.items():
        est = tuning.smem_bytes(space, {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, s, 2)
        assert kb * 1024 <= est <= kb * 1024 + 1024, (space, m, n, k, s)


def test_pruner_drops_configs_over_the_block_limit():
    small = DeviceLimits(n_sm=8, smem_block=99 * 1024, smem_sm=100 * 1024)  # sm_86/89-like
    a = torch.empty(4, 4, dtype=torch.bfloat16)
    cfgs = tuning.configs("swiglu")
    kept = tuning.pruner("swiglu", small)(cfgs, {"a_ptr": a})
    need = {id(c): tuning.smem_bytes("swiglu", c.kwargs, c.num_stages, 2) for c in cfgs}
    assert kept == [c for c in cfgs if need[id(c)] <= small.smem_block]  # order kept
    assert 0 < len(kept) < len(cfgs)
    assert tuning.pruner("swiglu")(cfgs, {"a_ptr": a}) == cfgs  # H100: all fit
    tiny = DeviceLimits(n_sm=1, smem_block=1024, smem_sm=2048)
    (only,) = tuning.pruner("swiglu", tiny)(cfgs, {"a_ptr": a})
    assert need[id(only)] == min(need.values())  # none fits: the smallest


@pytest.mark.parametrize("regs,smem,warps,want", [
    (255, 64 * 1024, 4, 2),    # 128x128x32 w4: registers allow 2
    (169, 96 * 1024, 8, 1),    # 128x128x64 w8: registers allow 1
    (146, 64 * 1024, 4, 3),    # 64x64x64 w4: registers and smem allow 3
    (87, 64 * 1024, 4, 3),     # shared memory allows 3
    (32, 0, 8, 8),             # a copy kernel: warps allow 8 (64 warps / 8)
    (255, 240 * 1024, 8, 1),   # over the SM: still 1 (it will fail to load, not run 0)
])
def test_ctas_per_sm(regs, smem, warps, want):
    assert tuning.ctas_per_sm(regs, smem, warps) == want


def test_persistent_grid_from_occupancy():
    cfgs = tuning.configs("gg")
    first, small = cfgs[0], next(c for c in cfgs if c.num_warps == 4)
    a = torch.empty(4, 4, dtype=torch.bfloat16)
    cuda = torch.device("cuda", 0)  # only its type is read when limits are given
    big = lambda m: 10 ** 6  # noqa: E731
    grid = tuning.persistent_grid("gg", cfgs, cuda, big, lim=H100)
    for cfg in (first, small):
        meta = {**cfg.kwargs, "a_ptr": a}
        assert grid(meta) == (H100.n_sm * tuning.config_ctas("gg", cfg, 2),)
    assert tuning.config_ctas("gg", small, 2) >= 2 > tuning.config_ctas("gg", first, 2) - 1
    few = tuning.persistent_grid("gg", cfgs, cuda, lambda m: 7, lim=H100)
    assert few({**first.kwargs, "a_ptr": a}) == (7,)  # never more programs than tiles
    cpu = tuning.persistent_grid("gg", cfgs, torch.device("cpu"), big)
    assert cpu({**first.kwargs, "a_ptr": a}) == (4,)  # the interpreter: a small grid


def test_triton_configs_compare_by_value():
    """``_match`` and the tests above rely on equal configs comparing equal."""
    assert triton.Config({"A": 1}, num_warps=4) == triton.Config({"A": 1}, num_warps=4)
