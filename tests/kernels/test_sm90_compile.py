"""Every kernel the public ops launch compiles for sm_90 (H100/H200) at the OLMoE shape in
bf16, without spilling and within shared memory; no kernel is left unlaunched. No GPU: the
check (``benchmarks/sm90_check.py``) stubs Triton's driver and runs the installed Triton's
own compiler and ptxas. A failure lists the offending kernels and configs.

The check runs once, in a subprocess: conftest sets ``TRITON_INTERPRET=1`` before
``triton_kernels`` is imported here, and interpreted kernels cannot be compiled.
Legend: T tokens, D model width, F expert width, E experts, K experts per token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import sm90_check as sm90  # noqa: E402

CHECK_TIMEOUT_S = 270  # under pytest's 300 s, so a hung compile fails here with its output


@pytest.fixture(scope="module")
def olmoe_report(tmp_path_factory) -> sm90.Report:
    """The check at the OLMoE shape (T=2048, D=2048, F=1024, E=64, K=8) in bf16: about 50
    binaries, ~30 s on 2 idle cores (two compile processes)."""
    if sm90.bundled_ptxas(90) is None:
        pytest.skip("the installed Triton bundles no ptxas for sm_90: nothing to compile with")
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sm90_check.py"), "--scenario", "olmoe",
           "--dtype", "bf16", "--jobs", "2", "--quiet", "--json", str(out)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=CHECK_TIMEOUT_S)
    print(f"sm90 check: {time.time() - t0:.0f} s")
    assert r.returncode in (0, 1) and out.is_file(), \
        f"the check crashed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return sm90.Report.from_json(json.loads(out.read_text()))


def assert_none(report: sm90.Report, kind: str) -> None:
    """Fail with one line per offending row (kernel, variant, config, ops, numbers)."""
    if items := sm90.problems(report)[kind]:
        pytest.fail(f"{len(items)} {kind}:\n" + "\n".join(f"  - {item}" for item in items),
                    pytrace=False)


def test_every_kernel_compiles(olmoe_report):
    assert_none(olmoe_report, "compile errors")
    assert len(olmoe_report.rows) >= 20  # the autotune configs of each grouped-GEMM variant


def test_no_config_the_autotuner_can_pick_spills(olmoe_report):
    """Pruned configs are not compiled; every other one is a candidate on the GPU. Fix:
    drop or shrink the config (fewer accumulators per thread: smaller BLOCK_M*BLOCK_N per
    warp) or split the kernel's work."""
    assert_none(olmoe_report, "spills")


def test_no_config_over_shared_memory_survives_pruning(olmoe_report):
    """A config over 227 KB cannot launch on sm_90. Fix: fewer stages or smaller tiles, or
    an ``early_config_prune`` that drops it."""
    assert_none(olmoe_report, "shared memory")


def test_every_kernel_is_launched_by_a_public_op(olmoe_report):
    assert_none(olmoe_report, "unlaunched kernels")
    assert_none(olmoe_report, "undriven ops")
    ops = {op for r in olmoe_report.rows for op in r.ops}
    for op in sm90.DRIVERS:  # forward and backward of each, sorted_experts included
        assert {f"{op}.fwd", f"{op}.bwd"} <= ops, f"{op} launched no kernel in fwd or bwd: {sorted(ops)}"


def test_the_check_touches_no_big_tensor(olmoe_report):
    """The recorded inputs (gigabytes of weights at this shape) stay uninitialised and
    their gradients are not copied: the check needs ~0.4 GB, not ~6."""
    assert olmoe_report.peak_rss_gb < 2.0


def test_check_imports_no_hydra():
    """The check runs on the GPU image, which has no Hydra/OmegaConf."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import benchmarks.sm90_check, triton_kernels, moe_vlm.atomic\n"
            "print(sorted(m for m in sys.modules if m.startswith(('hydra', 'omegaconf'))))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- parsing (no compile)

LOG_39 = """ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_gg_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _gg_kernel
    1160 bytes stack frame, 1160 bytes spill stores, 1032 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 1160 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 412.000 ms
"""
LOG_36 = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for helper
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 384 bytes smem, 400 bytes cmem[0]
"""


def test_parse_ptxas_log():
    assert sm90.parse_ptxas_log(LOG_39) == dict(stack=1160, spill_stores=1160, spill_loads=1032,
                                                regs=255, static_smem=0)
    assert sm90.parse_ptxas_log(LOG_36) == dict(stack=0, spill_stores=0, spill_loads=0, regs=40,
                                                static_smem=384)
    assert sm90.parse_ptxas_log("") == {}


def test_occupancy_names_its_limiter():
    # 255 regs -> 8192 per warp -> 8 warps of registers -> 2 CTAs of 4 warps (smem allows 2 too)
    assert sm90.occupancy(255, 96 * 1024, 4) == (2, "regs")
    assert sm90.occupancy(79, 64 * 1024, 4) == (3, "smem")  # regs would allow 6
    assert sm90.occupancy(24, 0, 4) == (16, "warps")  # 64 warps per SM
    assert sm90.occupancy(16, 0, 1) == (32, "ctas")
    assert sm90.occupancy(64, 240 * 1024, 8) == (0, "smem")  # over 227 KB: cannot launch


def test_instruction_kinds():
    wgmma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd9, %rd10, 0, 1, 1, 0, 1;"
    assert sm90.mma_kind(wgmma, "") == "wgmma"
    assert sm90.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {}", "") == "mma.sync"
    assert sm90.mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;", "%5 = tt.dot %3, %4, %cst") == "FMA"
    assert sm90.mma_kind("ld.global.b32 %r1, [%rd1];", "") == "-"
    tma = ("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
           "[%r1], [%rd1, {%r2}];")
    assert sm90.load_kind(tma) == "TMA"
    ptx = ("cp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;\n"
           "cp.async.ca.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x4, %r8;\n"
           "@%p1 ld.global.b32 { %r1 }, [ %rd1 + 0 ];")
    assert sm90.load_kind(ptx) == "cp.async 4/16B"
    assert sm90.load_kind("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
                          "ld.global.L1::evict_last.b16 { %rs1 }, [ %rd2 + 0 ];") == "ld 2/16B"


def _row(**kw) -> sm90.Row:
    base = dict(kernel="_k", variant="bf16", config="M64 N64 K64 w4 s4", ops=["op.fwd"],
                scenarios=["olmoe/bf16"], regs=128, smem=64 * 1024)
    return sm90.Row(**{**base, **kw})


def test_problems_lists_the_offending_rows():
    report = sm90.Report(
        triton="x", ptxas="y", arch=90, scenarios=["olmoe"], dtypes=["bf16"],
        pruned=["_k M128 N256 K64 w8 s3"], unlaunched=["triton_kernels.m._orphan_kernel"],
        undriven=["new_op"], seconds=1.0, peak_rss_gb=0.5, rows=[
            _row(),
            _row(config="M128 N128 K32 w4 s4", spill_stores=1160, spill_loads=1032),
            _row(config="odd", scenarios=["odd/bf16"], spill_stores=8, spill_loads=8),  # reported only
            _row(config="M128 N256 K64 w8 s3", smem=240 * 1024),
            _row(config="bad", error="CompilationError: boom"),
        ])
    found = sm90.problems(report)
    assert [len(found[k]) for k in found] == [1, 1, 1, 1, 1]
    assert "M128 N128 K32 w4 s4" in found["spills"][0] and "1160 B" in found["spills"][0]
    assert "240.0 KB" in found["shared memory"][0] and "op.fwd" in found["shared memory"][0]
    assert sm90.problems(report, spill_budget=2000)["spills"] == []
    text = sm90.format_report(report)
    assert "SPILL" in text and ">227KB" in text and "pruned by the autotuner" in text
    assert sm90.Report.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_pruned_configs_are_neither_compiled_nor_reported():
    """A recorded autotuned launch expands to the configs its ``early_config_prune`` keeps
    (run as the autotuner runs it); the pruned ones are only listed."""
    import torch
    import triton
    import triton.language as tl

    def toy(x_ptr, n, BLOCK: tl.constexpr, FAST: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    def drop_big(configs, named_args, **kwargs):
        assert named_args["n"] == 10 and kwargs == {"FAST": True}
        return [c for c in configs if c.kwargs["BLOCK"] <= 128]

    configs = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2) for b in (64, 128, 256)]
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):  # a compiling JITFunction
        toy = triton.jit(toy)
    tuner = triton.autotune(configs, key=["n"], prune_configs_by={"early_config_prune": drop_big})(toy)
    launches: list[sm90.Launch] = []
    with sm90.record_launches(launches, "toy.fwd", "olmoe/bf16"):
        tuner[(1,)](torch.empty(4), 10, FAST=True)
    units, pruned = sm90.expand(launches[0])
    assert [sm90._config_label(u.values()) for u in units] == ["BLOCK64 w4 s2", "BLOCK128 w4 s2"]
    assert units[0].variant() == "FAST fp32"
    assert pruned == ["toy BLOCK256 w4 s2"]
    one = triton.autotune(configs[:1], key=["n"], prune_configs_by={"early_config_prune": drop_big})(toy)
    assert sm90.autotune_configs(one, (None, 3), {}) == (configs[:1], [])  # no choice: no pruning
