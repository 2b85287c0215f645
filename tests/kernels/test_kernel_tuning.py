"""Launch tuning (``triton_kernels.tuning``): autotune spaces, shared-memory pruning, the
occupancy-sized persistent grid and the fp32 precision knob. All host-side logic, checked on
the CPU; the numbers it encodes come from ``sm90_compile_check.py`` (sm_90).

Legend: BM/BN/BK block sizes, w warps, s stages, R rows, E groups.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton

from triton_kernels import tuning
from triton_kernels.tuning import H100, DeviceLimits

gg_mod = importlib.import_module("triton_kernels.grouped_gemm")  # the module, not the op
SPACES = ("gg", "swiglu", "dw")


def _all_spaces():
    for space in SPACES:
        for elem in (2, 4):
            for fma in ((False, True) if elem == 4 else (False,)):
                for mode in ("off", "on"):
                    yield space, elem, fma, mode


@pytest.mark.parametrize("space,elem,fma,mode", list(_all_spaces()))
def test_spaces_fit_h100_and_have_unique_tiles(space, elem, fma, mode):
    """Every config fits an H100/H200 block (nothing for the autotuner to discard after
    compiling), and block sizes identify a config (the grid looks it up by them)."""
    cfgs = tuning.configs(space, elem, fma, mode)
    assert cfgs
    for c in cfgs:
        assert tuning.smem_bytes(space, c.kwargs, c.num_stages, elem) <= H100.smem_block, c
        assert c.kwargs["USE_TMA"] == (mode == "on")
    keys = [tuple(sorted(c.kwargs.items())) for c in cfgs]
    assert len(set(keys)) == len(keys)


def test_dw_space_keeps_wgmma_shapes():
    """dw's output tile is (BK, BN): BK < 64 on 4 warps has no wgmma instruction shape."""
    for elem in (2, 4):
        for c in tuning.configs("dw", elem):
            assert c.kwargs["BLOCK_K"] >= 64


def test_fp32_halves_the_reduction_block():
    """4-byte inputs: the same tiles with half the reduction block, so the same shared
    memory; the forward keeps K blocks >= 32, SwiGLU <= 64 accumulator registers per
    thread (the others spilled)."""
    for space, red in (("gg", "BLOCK_K"), ("swiglu", "BLOCK_K"), ("dw", "BLOCK_M")):
        halved = {}
        for c in tuning.configs(space, 2):
            kw = {**c.kwargs, red: c.kwargs[red] // 2}
            halved[tuple(sorted(kw.items()))] = (c, tuning.smem_bytes(space, c.kwargs, c.num_stages, 2))
        full = tuning.configs(space, 4)
        for c in full:
            c16, smem16 = halved[tuple(sorted(c.kwargs.items()))]
            assert tuning.smem_bytes(space, c.kwargs, c.num_stages, 4) == smem16
            assert (c.num_warps, c.num_stages) == (c16.num_warps, c16.num_stages)
            if space != "dw":
                assert c.kwargs["BLOCK_K"] >= 32
            if space == "swiglu":
                assert 2 * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) <= 64
        assert len(full) == len(halved) or space != "dw"


def test_tma_knob(monkeypatch):
    monkeypatch.delenv("TRITON_KERNELS_TMA", raising=False)
    assert tuning.tma_mode() == "off"
    for value, mode in (("0", "off"), ("auto", "auto"), ("1", "on"), ("on", "on")):
        monkeypatch.setenv("TRITON_KERNELS_TMA", value)
        assert tuning.tma_mode() == mode
    monkeypatch.setenv("TRITON_KERNELS_TMA", "maybe")
    with pytest.raises(ValueError, match="TRITON_KERNELS_TMA"):
        tuning.tma_mode()
    both = tuning.configs("gg", tma="auto")
    assert [c.kwargs["USE_TMA"] for c in both].count(True) == len(tuning.configs("gg", tma="on"))
    assert both[0] == tuning.configs("gg")[0]  # deterministic mode keeps cp.async


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


# ----------------------------------------------------------------------------- precision

def _set_precision(legacy: str, new: str) -> None:
    """Put both of torch's knobs in a consistent state (mixing the legacy and the new API
    makes torch's legacy getters raise)."""
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.fp32_precision = new


@pytest.fixture
def torch_precision():
    """Start from torch's default matmul precision; restore the caller's afterwards."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    _set_precision("highest", "none")
    yield
    _set_precision(*saved)


@pytest.fixture
def gpu_path(monkeypatch, torch_precision):
    """Launchers take their GPU branch (no interpreter)."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(gg_mod, "interpreting", lambda: False)


class _Recorder:
    """Stands in for a kernel: ``kern[grid](*args, **kwargs)`` records the kwargs."""

    def __init__(self):
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


@pytest.mark.parametrize("setting,want", [
    (lambda: None, "ieee"),
    (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    (lambda: torch.set_float32_matmul_precision("medium"), "tf32"),
    (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), "tf32"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "ieee"),
])
def test_fp32_precision_follows_torch_knob(gpu_path, monkeypatch, setting, want):
    """The PRECISION the launchers pass for fp32 inputs is read from PyTorch's knob at
    launch; 16-bit inputs are unaffected, and deterministic mode runs the same way."""
    setting()
    rec = _Recorder()
    monkeypatch.setattr(gg_mod, "_gg_kernel", rec)
    monkeypatch.setattr(gg_mod, "_gg_dw_kernel", rec)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # launch the plain kernel: no autotuner
    try:
        x = torch.randn(6, 16)
        w = torch.randn(2, 16, 8)
        offsets = torch.tensor([2, 6], dtype=torch.int32)
        gg_mod.gg_forward(x, w, offsets)
        gg_mod.gg_weight_grad(x, torch.randn(6, 8), offsets, 2)
        gg_mod.gg_forward(x.bfloat16(), w.bfloat16(), offsets)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert [c["PRECISION"] for c in rec.calls] == [want, want, "tf32"]
    assert not any(c["DOT_FP32"] for c in rec.calls)
    # ieee fp32 runs FMA dots: the launch uses the FMA space's first config
    space = tuning.configs("gg", 4, fma=want == "ieee")
    assert rec.calls[0]["BLOCK_K"] == space[0].kwargs["BLOCK_K"]


def test_interpreter_always_runs_ieee(monkeypatch, torch_precision):
    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    torch.set_float32_matmul_precision("high")
    assert tuning.dot_args(torch.float32) == {"DOT_FP32": False, "PRECISION": "ieee"}
    assert tuning.dot_args(torch.bfloat16) == {"DOT_FP32": True, "PRECISION": "ieee"}


def test_triton_configs_compare_by_value():
    """``_match`` and the tests above rely on equal configs comparing equal."""
    assert triton.Config({"A": 1}, num_warps=4) == triton.Config({"A": 1}, num_warps=4)
