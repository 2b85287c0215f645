"""Compile every Triton kernel our public ops launch for sm_90 (H100/H200), without a GPU.

    python benchmarks/sm90_check.py                                   # olmoe shape, bf16
    python benchmarks/sm90_check.py --scenario olmoe,odd --dtype bf16,fp32 --json out.json
    python benchmarks/sm90_check.py --triton-site /tmp/triton36       # another Triton
    python benchmarks/sm90_check.py --jobs 2 --env NAME=VALUE   # 2 processes; a launcher switch too

Why: a kernel that spills registers, asks for more shared memory than an SM has, or does
not compile at all for sm_90 is found today only on a GPU, at the first launch (or never:
a spill is silent). Triton's own compiler runs fine on a CPU machine once its CUDA driver is
replaced by a stub that names the target, so CI can read what ptxas makes of each kernel.

How (nothing is launched, nothing needs a driver):
1. ``stub_driver``: Triton's active driver becomes one that reports ``GPUTarget("cuda", 90,
   32)``; ``JITFunction.warmup`` then compiles (TTIR -> TTGIR -> PTX -> cubin) with the ptxas
   bundled in the Triton wheel.
2. ``record_ops``: each public op of ``triton_kernels`` runs forward and backward on CPU
   tensors at a real shape while ``kernel[grid](...)`` records its arguments instead of
   launching. The recorded arguments are what the launchers pass on CUDA (dtypes, strides,
   constexprs), so the specializations compiled here are those a GPU run compiles. The ops
   run again in deterministic mode (a fixed config) and under each ``--env NAME=VALUE``.
3. ``expand``: an autotuned launch becomes one compile per config the autotuner keeps at
   that launch (its ``prune_configs_by`` runs first: a pruned config is never compiled).
4. ``compile_units``: each binary once (``--jobs`` forked processes share the work);
   registers and spills from ptxas' own ``-v`` log, shared memory from the kernel
   metadata, occupancy from the sm_90 limits, instruction kinds from the PTX and TTGIR.
5. ``jit_kernels``: every ``@triton.jit`` kernel of the package; one that no op launched is
   reported, so a new kernel cannot escape the check.

``problems`` turns a report into failures (what the CLI's exit status and
``tests/kernels/test_sm90_compile.py`` enforce): a compile error, a spill above
``SPILL_BUDGET_BYTES`` at a real shape, shared memory above the per-block limit, a kernel no
op launched, a public op without a driver here.

Another Triton (the GPU image has 3.6, this machine 3.9): install it into a folder and
point ``--triton-site`` at it; the script re-runs itself with that folder first on the path:

    pip install --target /tmp/triton36 triton==3.6.0
    python benchmarks/sm90_check.py --triton-site /tmp/triton36

Legend: T tokens, D model width, F expert width, E experts, K experts per token.
Imports torch, triton and (for the JSON file) ``moe_vlm.atomic``: no Hydra, so it runs on
the GPU image. ``triton_kernels`` is imported only by ``check`` (after
``TRITON_INTERPRET`` is removed: the interpreter is chosen when a kernel is decorated).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional
from unittest import mock

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "triton_kernels"


class Shape(NamedTuple):
    tokens: int  # T
    d_model: int  # D
    d_expert: int  # F
    n_experts: int  # E
    top_k: int  # K
    real: bool  # a model's shape: spills here fail the check (elsewhere they are reported)


SCENARIOS: dict[str, Shape] = {
    "olmoe": Shape(2048, 2048, 1024, 64, 8, real=True),  # OLMoE-1B-7B layer, 2k tokens
    "odd": Shape(777, 1000, 333, 12, 3, real=False),  # no size a multiple of 16
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Sm90:
    """Per-SM limits of sm_90 (H100 and H200 alike), CUDA occupancy-calculator rules."""

    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are given to a warp in blocks of 256
    max_warps: int = 64
    max_ctas: int = 32
    smem_per_sm: int = 233472  # 228 KB
    smem_per_block: int = 232448  # 227 KB: the opt-in maximum one CTA may ask for
    smem_reserved: int = 1024  # the driver keeps 1 KB per CTA
    n_sms: int = 132  # H100 SXM / H200


SM90 = Sm90()
# A spill at a real shape sends registers to local memory inside the K loop; every config
# that does not spill shows a tile fits, so the budget is none. A kernel that needs a few
# bytes of stack for a reason (say an epilogue) would raise this with that reason.
SPILL_BUDGET_BYTES = 0


# ----------------------------------------------------------------------------- driver stub

class StubDriver:
    """Stands in for Triton's CUDA driver: a fixed target, device 0, stream 0, and the
    device properties a config-pruning function may read. Anything else needs a GPU."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = StubUtils()

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def __getattr__(self, name: str):
        raise RuntimeError(f"sm90_check: driver.{name} needs a real GPU")


class StubUtils:
    """``driver.active.utils``: what an ``early_config_prune`` may ask of the device."""

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"max_shared_mem": SM90.smem_per_block, "multiprocessor_count": SM90.n_sms,
                "max_num_regs": SM90.regs_per_sm, "warpSize": 32}


@contextlib.contextmanager
def stub_driver(arch: int = 90) -> Iterator[StubDriver]:
    """Compile for ``sm_<arch>`` inside the block (Triton's active driver is swapped)."""
    from triton.runtime.driver import driver

    stub = StubDriver(arch)
    before = driver._active  # None until first used; reset_active() would make a real driver
    driver.set_active(stub)
    try:
        yield stub
    finally:
        driver.set_active(before)


def bundled_ptxas(arch: int = 90) -> Optional[str]:
    """Path of the ptxas Triton runs for ``arch`` (3.9: the CUDA 13 one for sm_90 too), or
    None when the wheel has none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - no NVIDIA backend, or no binary
        return None
    return path if os.path.isfile(path) else None


def ptxas_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "?"


# ----------------------------------------------------------------------------- recording

@dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` made by ``op`` (``"moe_experts.bwd"``)."""

    op: str
    scenario: str  # "olmoe/bf16"
    mode: str  # the launch mode it was made in: "default", "deterministic", "NAME=VALUE"
    kernel: Any  # JITFunction, Autotuner or Heuristics
    grid: Any
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def record_launches(sink: list[Launch], op: str, scenario: str, mode: str = "default") -> Iterator[None]:
    """Inside the block, kernel launches append to ``sink`` and run nothing."""
    from triton.runtime.jit import KernelInterface

    def getitem(kernel, grid):
        return lambda *args, **kwargs: sink.append(
            Launch(op, scenario, mode, kernel, grid, args, kwargs))

    with mock.patch.object(KernelInterface, "__getitem__", getitem):
        yield


@contextlib.contextmanager
def cpu_tensors_allowed(modules: list[Any]) -> Iterator[None]:
    """The package refuses CPU tensors unless interpreting. Run its ``check_device`` as if
    interpreting (every other check still runs); the launchers still see a compiling Triton
    and pick the GPU configs."""
    with contextlib.ExitStack() as stack:
        for mod in modules:
            orig = getattr(mod, "check_device", None)
            if orig is None:
                continue

            def as_interpreted(*tensors: Tensor, _orig: Callable = orig, **kw: Any) -> None:
                with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
                    _orig(*tensors, **kw)

            stack.enter_context(mock.patch.object(mod, "check_device", as_interpreted))
        yield


def _routing(s: Shape) -> Tensor:
    """experts [T, K]: K distinct experts per token, every expert equally loaded."""
    t, k = torch.arange(s.tokens)[:, None], torch.arange(s.top_k)[None, :]
    return (t * s.top_k + k) % s.n_experts


def _offsets(n_rows: int, n_experts: int) -> Tensor:
    counts = torch.full((n_experts,), n_rows // n_experts)
    counts[: n_rows % n_experts] += 1
    return torch.cumsum(counts, 0).to(torch.int32)


class Leaves(list):
    """Makes the tensors a driver differentiates, uninitialised (no kernel reads them, so
    gigabytes of weights cost no memory), and keeps them for ``torch.autograd.grad``:
    ``backward()`` would copy each gradient into ``.grad`` (the recorded launch still holds
    it), touching every page."""

    def __call__(self, *shape: int, dtype: torch.dtype) -> Tensor:
        self.append(torch.empty(*shape, dtype=dtype, requires_grad=True))
        return self[-1]


# Drivers: one per public op, (package, shape, dtype, leaves) -> the output to
# backpropagate. Routing weights are fp32, as the router's softmax makes them.

def _drive_grouped_gemm(pkg, s: Shape, dt: torch.dtype, leaf: Leaves) -> Tensor:
    rows = s.tokens * s.top_k
    x = leaf(rows, s.d_model, dtype=dt)
    return pkg.grouped_gemm(x, leaf(s.n_experts, s.d_model, s.d_expert, dtype=dt),
                            _offsets(rows, s.n_experts))


def _drive_permute(pkg, s: Shape, dt: torch.dtype, leaf: Leaves) -> Tensor:
    return pkg.permute(leaf(s.tokens, s.d_model, dtype=dt), _routing(s), s.n_experts)[0]


def _drive_unpermute(pkg, s: Shape, dt: torch.dtype, leaf: Leaves) -> Tensor:
    _, perm, _ = pkg.permute_reference(torch.empty(s.tokens, 1), _routing(s), s.n_experts)
    rows = leaf(s.tokens * s.top_k, s.d_model, dtype=dt)
    return pkg.unpermute(rows, perm, leaf(s.tokens, s.top_k, dtype=torch.float32))


def _weights(s: Shape, dt: torch.dtype, leaf: Leaves) -> tuple[Tensor, Tensor]:
    return (leaf(s.n_experts, s.d_model, 2 * s.d_expert, dtype=dt),
            leaf(s.n_experts, s.d_expert, s.d_model, dtype=dt))


def _drive_moe_experts(pkg, s: Shape, dt: torch.dtype, leaf: Leaves) -> Tensor:
    experts = _routing(s).reshape(-1)
    tokens = torch.arange(s.tokens).repeat_interleave(s.top_k)
    weight = leaf(experts.numel(), dtype=torch.float32)
    return pkg.moe_experts(leaf(s.tokens, s.d_model, dtype=dt), tokens, experts, weight,
                           *_weights(s, dt, leaf))


def _drive_moe_experts_topk(pkg, s: Shape, dt: torch.dtype, leaf: Leaves) -> Tensor:
    weights = leaf(s.tokens, s.top_k, dtype=torch.float32)
    return pkg.moe_experts_topk(leaf(s.tokens, s.d_model, dtype=dt), _routing(s), weights,
                                *_weights(s, dt, leaf))


def _drive_sorted_experts(pkg, s: Shape, dt: torch.dtype, leaf: Leaves) -> Tensor:
    rows = s.tokens * s.top_k
    return pkg.sorted_experts(leaf(rows, s.d_model, dtype=dt), _offsets(rows, s.n_experts),
                              *_weights(s, dt, leaf))


DRIVERS: dict[str, Callable[[Any, Shape, torch.dtype, Leaves], Tensor]] = {
    "grouped_gemm": _drive_grouped_gemm,
    "permute": _drive_permute,
    "unpermute": _drive_unpermute,
    "moe_experts": _drive_moe_experts,
    "moe_experts_topk": _drive_moe_experts_topk,
    "sorted_experts": _drive_sorted_experts,
}


def public_ops(pkg) -> list[str]:
    """The package's ``__all__`` less the plain-torch ``*_reference`` twins."""
    return [n for n in pkg.__all__ if not n.endswith("_reference")]


def record_ops(pkg, modules: list[Any], scenario: str, dtype: str,
               env_modes: tuple[str, ...] = ()) -> list[Launch]:
    """Launches of every driven op, forward then backward, at one shape and dtype, in
    each launch mode: the default; deterministic (``train.deterministic``: the launchers
    bypass the autotuner for a fixed config that pruning does not see); and once per
    ``NAME=VALUE`` of ``env_modes`` with that environment variable set (a launcher switch)."""
    s, dt = SCENARIOS[scenario], DTYPES[dtype]
    launches: list[Launch] = []
    tag = f"{scenario}/{dtype}"
    modes = [("default", contextlib.nullcontext()), ("deterministic", _deterministic())]
    modes += [(m, mock.patch.dict(os.environ, [m.split("=", 1)])) for m in env_modes]
    with cpu_tensors_allowed(modules):
        for mode, context in modes:
            with context:
                for op in [op for op in public_ops(pkg) if op in DRIVERS]:
                    leaves = Leaves()
                    with record_launches(launches, f"{op}.fwd", tag, mode):
                        out = DRIVERS[op](pkg, s, dt, leaves)
                    with record_launches(launches, f"{op}.bwd", tag, mode):
                        torch.autograd.grad(out, leaves, torch.empty_like(out), allow_unused=True)
    return launches


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block, without its filling
    of every ``torch.empty`` with NaN: that would touch gigabytes of weights no kernel reads."""
    import torch.utils.deterministic as det

    before, fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        det.fill_uninitialized_memory = fill


# ----------------------------------------------------------------------------- configs

@dataclass
class Unit:
    """One compile: a JIT function, the launch's arguments and one config's values."""

    fn: Any  # JITFunction
    launch: Launch
    kwargs: dict
    config: dict  # the autotune config's / heuristics' values (empty for a plain launch)

    def values(self) -> dict:
        """Tile sizes, warps and stages, whether a config or the launch set them."""
        return {k: v for k, v in self.kwargs.items()
                if k.startswith("BLOCK_") or k in self.config or k in ("num_warps", "num_stages")}

    def variant(self) -> str:
        return variant_label(self.fn, self.launch.args, self.kwargs, self.values())


def autotune_configs(tuner, args: tuple, kwargs: dict) -> tuple[list, list]:
    """(configs the autotuner keeps for this launch, configs it prunes), as its ``run``
    decides: pruning (``early_config_prune``, ``perf_model``) only when there is a choice."""
    if len(tuner.configs) <= 1:
        return list(tuner.configs), []
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        kept = list(tuner.prune_configs(kwargs))
    finally:
        tuner.nargs = None
    return kept, [c for c in tuner.configs if all(c is not k for k in kept)]


def expand(launch: Launch) -> tuple[list[Unit], list[str]]:
    """A recorded launch -> (compile units, labels of the configs pruned away)."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    units: list[Unit] = []
    pruned: list[str] = []

    def walk(obj, kwargs: dict, config: dict) -> None:
        if isinstance(obj, JITFunction):
            units.append(Unit(obj, launch, kwargs, config))
        elif isinstance(obj, Autotuner):
            kept, dropped = autotune_configs(obj, launch.args, kwargs)
            pruned.extend(f"{_jit_of(obj).fn.__name__} {_config_label(c.all_kwargs())}" for c in dropped)
            for c in kept:
                walk(obj.fn, {**kwargs, **c.all_kwargs()}, {**config, **c.all_kwargs()})
        elif isinstance(obj, Heuristics):
            named = {**dict(zip(obj.arg_names, launch.args)), **kwargs}
            extra = {k: rule(named) for k, rule in obj.values.items()}
            walk(obj.fn, {**kwargs, **extra}, {**config, **extra})
        else:
            raise TypeError(f"sm90_check cannot expand a launch of {type(obj).__name__}")

    walk(launch.kernel, dict(launch.kwargs), {})
    return units, pruned


def _config_label(values: dict) -> str:
    """``M128 N64 K64 w4 s4`` from a config's values (BLOCK_ prefixes dropped)."""
    parts = [k.removeprefix("BLOCK_") + ("" if v is True else str(v)) for k, v in values.items()
             if (k.startswith("BLOCK_") or k.isupper()) and v is not False]
    parts += [f"{a}{values[k]}" for k, a in (("num_warps", "w"), ("num_stages", "s")) if k in values]
    return " ".join(parts)


# ----------------------------------------------------------------------------- analysis

PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
PTXAS_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """regs, stack, spill_stores, spill_loads, static_smem of the entry function (the
    kernel) from ``ptxas -v``; a non-inlined callee's own lines are not the kernel's."""
    entry = PTXAS_ENTRY.search(log)
    if entry is None:
        return {}
    log = log[entry.end():]
    out: dict[str, int] = {}
    if m := re.search(rf"Function properties for {re.escape(entry[1])}\s+(\d+) bytes stack frame, "
                      r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
    if m := PTXAS_REGS.search(log):
        out.update(regs=int(m[1]), static_smem=int(m[2] or 0))
    return out


def occupancy(regs: int, smem: int, num_warps: int, lim: Sm90 = SM90) -> tuple[int, str]:
    """(CTAs resident per SM, what limits it: regs, smem, warps or ctas). ``smem`` is the
    CTA's whole shared memory in bytes; over the per-block limit it cannot launch (0)."""
    if smem > lim.smem_per_block:
        return 0, "smem"
    warp_regs = -(-max(regs, 1) * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    by = {"regs": lim.regs_per_sm // warp_regs // num_warps,
          "smem": lim.smem_per_sm // (smem + lim.smem_reserved),
          "warps": lim.max_warps // num_warps,
          "ctas": lim.max_ctas}
    limiter = min(by, key=by.get)
    return by[limiter], limiter


def mma_kind(ptx: str, ttgir: str) -> str:
    """How ``tl.dot`` became instructions: Hopper's async warpgroup MMA, Ampere's
    per-warp ``mma.sync`` (a slow path on sm_90), plain FMAs, or no dot at all."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "FMA" if re.search(r"\btt\.dot\b", ttgir) else "-"


CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared[\w.:]*\s*\[[^]]*\],\s*\[[^]]*\],\s*(\w+)")
LD_GLOBAL = re.compile(r"\bld\.global[\w.:]*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def load_kind(ptx: str) -> str:
    """How global memory is read: TMA (``cp.async.bulk.tensor``), ``cp.async`` (with its
    copy sizes in bytes, 16 = vectorised) or plain loads into registers (their widths)."""
    if "cp.async.bulk.tensor" in ptx:
        return "TMA"
    if sizes := {int(n, 0) for n in CP_ASYNC.findall(ptx)}:
        return "cp.async " + "/".join(map(str, sorted(sizes))) + "B"
    if widths := {int(v or 1) * int(b) // 8 for v, b in LD_GLOBAL.findall(ptx)}:
        return "ld " + "/".join(map(str, sorted(widths))) + "B"
    return "-"


def warp_specialized(ttgir: str) -> bool:
    return "ttg.warp_specialize" in ttgir


@dataclass
class Row:
    """One compiled binary (or one failed compile) and what ptxas made of it."""

    kernel: str
    variant: str  # the specialization: constexpr flags, int args equal to 1, dtypes
    config: str  # tile sizes, warps, stages
    ops: list[str] = field(default_factory=list)  # "moe_experts.bwd" ...
    scenarios: list[str] = field(default_factory=list)  # "olmoe/bf16" ...
    modes: list[str] = field(default_factory=list)  # the launch modes that compile it
    error: str = ""
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0  # bytes: dynamic (Triton's) + static
    ctas_per_sm: int = 0
    limiter: str = ""
    warps_per_sm: int = 0
    mma: str = ""
    loads: str = ""
    warp_specialized: bool = False
    hash: str = ""

    @property
    def spill_bytes(self) -> int:
        return max(self.spill_stores, self.spill_loads)

    def at_real_shape(self) -> bool:
        return any(SCENARIOS[s.split("/")[0]].real for s in self.scenarios)


def variant_label(fn, args: tuple, kwargs: dict, config: dict) -> str:
    """What tells specializations apart: constexpr flags and values (not the config's),
    int arguments equal to 1 (Triton specializes them), and the tensors' dtypes."""
    bound = {**dict(zip([p.name for p in fn.params], args)), **kwargs}
    parts = []
    for p in fn.params:
        v = bound.get(p.name)
        if p.is_constexpr and p.name not in config and not p.name.startswith("BLOCK_"):
            if v is True:
                parts.append(p.name)
            elif v not in (False, None):
                parts.append(f"{p.name}={v}")
        elif not p.is_constexpr and type(v) is int and v == 1:
            parts.append(f"{p.name}=1")
    short = {v: k for k, v in DTYPES.items()}
    dtypes = {n: short.get(v.dtype, str(v.dtype)) for n, v in bound.items()
              if isinstance(v, Tensor) and v.is_floating_point()}
    if dtypes:
        main = Counter(dtypes.values()).most_common(1)[0][0]
        parts += [main] + [f"{n}:{d}" for n, d in dtypes.items() if d != main]
    return " ".join(parts)


def compile_unit(unit: Unit) -> tuple[Any, str, str]:
    """-> (CompiledKernel or None, error text, ptxas -v log). Triton prints the log when
    ``TRITON_DUMP_PTXAS_LOG=1`` and it really compiles (not on a cache hit)."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ck = unit.fn.warmup(*unit.launch.args, grid=unit.launch.grid, **unit.kwargs)
            ck = ck.result() if hasattr(ck, "result") else ck  # an async-compile future
        return ck, "", log.getvalue()
    except Exception as e:  # noqa: BLE001 - a compile error is a result here
        lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
        return None, "\n".join(lines[:1] + lines[-5:] if len(lines) > 6 else lines), log.getvalue()


def describe(ck, log: str, row: Row) -> None:
    """Fill ``row``'s resource and instruction columns from a compiled kernel."""
    md, ptx, ttgir = ck.metadata, ck.asm.get("ptx", ""), ck.asm.get("ttgir", "")
    usage = parse_ptxas_log(log)
    if "regs" not in usage:  # never report "no spill" for a binary ptxas did not describe
        row.error = "no ptxas -v log for this binary (a cache hit?)"
        return
    row.regs = usage["regs"]
    row.spill_stores, row.spill_loads = usage["spill_stores"], usage["spill_loads"]
    row.smem = md.shared + usage["static_smem"]
    row.ctas_per_sm, row.limiter = occupancy(row.regs, row.smem, md.num_warps)
    row.warps_per_sm = row.ctas_per_sm * md.num_warps
    row.mma, row.loads = mma_kind(ptx, ttgir), load_kind(ptx)
    row.warp_specialized = warp_specialized(ttgir)


_described: dict[str, Row] = {}  # this process's compiled binaries by hash: a repeat is a cache hit


def compile_row(unit: Unit) -> Row:
    """The row of one unit: compiled and described, or copied from the earlier row of the
    same binary (a second compile of it hits Triton's cache, which prints no ptxas log)."""
    ck, error, log = compile_unit(unit)
    fn, launch = unit.fn, unit.launch
    config = unit.values()
    if ck is not None:  # Triton's defaults where the launch set none
        config |= {"num_warps": ck.metadata.num_warps, "num_stages": ck.metadata.num_stages}
    row = Row(fn.fn.__name__, unit.variant(), _config_label(config), [launch.op], [launch.scenario],
              [launch.mode], error)
    if ck is not None:
        row.hash = ck.hash
        if ck.hash in _described:
            seen = _described[ck.hash]
            return replace(seen, ops=row.ops, scenarios=row.scenarios, modes=row.modes)
        describe(ck, log, row)
        _described[ck.hash] = row
    return row


def merge_rows(rows: list[Row]) -> list[Row]:
    """One row per binary (per failed kernel/variant/config), with all the ops and
    scenarios that launch it."""
    merged: dict[str, Row] = {}
    for r in rows:
        key = r.hash or f"{r.kernel} {r.variant} {r.config}"
        if key not in merged:
            merged[key] = replace(r, ops=[], scenarios=[], modes=[])
        m = merged[key]
        for name in ("ops", "scenarios", "modes"):
            have = getattr(m, name)
            have += [v for v in getattr(r, name) if v not in have]
    return sorted(merged.values(), key=lambda r: (r.kernel, r.variant, r.config))


_pending: list[list[Unit]] = []  # what forked workers compile (inherited, never pickled)


def _compile_group(i: int) -> list[Row]:
    return [compile_row(u) for u in _pending[i]]


def compile_units(units: list[Unit], jobs: int, progress: Callable[[str], None]) -> list[Row]:
    """Compile every unit, in ``jobs`` forked processes when > 1 (the recorded tensors are
    inherited, not copied). Units with the same kernel, variant and config stay together,
    so each binary is compiled once."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((u.fn.fn.__name__, u.variant(), _config_label(u.values())), []).append(u)
    _pending[:] = list(groups.values())
    rows: list[Row] = []
    try:
        if jobs <= 1:
            results = map(_compile_group, range(len(_pending)))
        else:
            ctx = multiprocessing.get_context("fork")
            pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_own_cache_dir)
            results = pool.map(_compile_group, range(len(_pending)))
        for group in results:
            rows += group
            r = group[0]
            progress(f"{len(rows):4d}/{len(units)} {r.kernel} [{r.variant}] {r.config}"
                     + (" FAILED" if r.error else ""))
    finally:
        _pending.clear()
        if jobs > 1:
            pool.shutdown()
    return merge_rows(rows)


def _own_cache_dir() -> None:
    """A forked worker compiles into its own Triton cache: a binary another worker made
    would be a cache hit here, without the ptxas log its spills are read from."""
    os.environ["TRITON_CACHE_DIR"] = os.path.join(os.environ["TRITON_CACHE_DIR"], str(os.getpid()))


# ----------------------------------------------------------------------------- coverage

def package_modules(name: str = PACKAGE) -> tuple[Any, list[Any]]:
    pkg = importlib.import_module(name)
    mods = [pkg] + [importlib.import_module(m.name)
                    for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}.")]
    return pkg, mods


def _jit_of(obj) -> Any:
    from triton.runtime.jit import JITFunction

    for _ in range(4):  # Autotuner / Heuristics wrap a JITFunction in .fn
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def jit_kernels(modules: list[Any]) -> dict[str, Any]:
    """``module.name`` -> JITFunction for every ``@triton.jit`` kernel defined in
    ``modules``. A jit function that another one calls is a device function (compiled
    inline into its caller), not a kernel."""
    found = {}
    for mod in modules:
        for val in vars(mod).values():
            fn = _jit_of(val)
            if fn is not None and fn.fn.__module__ == mod.__name__:
                found[f"{mod.__name__}.{fn.fn.__name__}"] = fn
    called = {getattr(n.func, "id", getattr(n.func, "attr", None))  # f(...) or module.f(...)
              for fn in found.values() for n in ast.walk(ast.parse(textwrap.dedent(fn.src)))
              if isinstance(n, ast.Call)}
    return {k: fn for k, fn in found.items() if fn.fn.__name__ not in called}


# ----------------------------------------------------------------------------- the check

@dataclass
class Report:
    triton: str  # "3.9.0 (/path/to/triton)"
    ptxas: str
    arch: int
    scenarios: list[str]  # "olmoe=(T, D, F, E, K)"
    dtypes: list[str]
    rows: list[Row]
    pruned: list[str]  # "kernel config" pruned by the autotuner, per launch (deduplicated)
    unlaunched: list[str]  # kernels no op launched
    undriven: list[str]  # public ops with no driver in DRIVERS
    seconds: float
    peak_rss_gb: float  # of this process and of its compile workers, whichever is larger

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Report":
        """The report a ``--json`` file holds (its extra keys, e.g. ``problems``, dropped)."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "rows": [Row(**r) for r in data["rows"]]})


def check(scenarios: list[str], dtypes: list[str], arch: int = 90, jobs: int = 1,
          env_modes: tuple[str, ...] = (), progress: Callable[[str], None] = lambda s: None) -> Report:
    """Record, expand and compile every launch of every public op in every launch mode
    (``record_ops``); the whole report."""
    import triton

    t0 = time.time()
    if os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0") and PACKAGE in sys.modules:
        raise RuntimeError(f"{PACKAGE} was imported under TRITON_INTERPRET=1: its kernels are "
                           "interpreted; run the check in a fresh process without it")
    ptxas = bundled_ptxas(arch)
    if ptxas is None:
        raise RuntimeError(f"triton {triton.__version__} has no bundled ptxas for sm_{arch}")
    pkg, modules = package_modules()
    launches = [ln for sc in scenarios for dt in dtypes
                for ln in record_ops(pkg, modules, sc, dt, env_modes)]
    cache = tempfile.mkdtemp(prefix="sm90_check_cache_")
    # a fresh cache: every binary is compiled, so ptxas prints its log. 3.9 warns that its
    # fp-fusion default will change; "1" is that default, made explicit.
    env = {"TRITON_CACHE_DIR": cache, "TRITON_DUMP_PTXAS_LOG": "1",
           "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    units, pruned = [], []
    try:
        with stub_driver(arch), mock.patch.dict(os.environ, env):
            for launch in launches:
                more, dropped = expand(launch)
                units += more
                pruned += [p for p in dropped if p not in pruned]
            rows = compile_units(units, jobs, progress)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    launched = {id(u.fn) for u in units}
    kernels = jit_kernels(modules)
    return Report(
        triton=f"{triton.__version__} ({Path(triton.__file__).parent})", ptxas=ptxas_version(ptxas),
        arch=arch, scenarios=[f"{s}={tuple(SCENARIOS[s][:5])}" for s in scenarios], dtypes=dtypes,
        rows=rows, pruned=pruned,
        unlaunched=sorted(k for k, fn in kernels.items() if id(fn) not in launched),
        undriven=[op for op in public_ops(pkg) if op not in DRIVERS], seconds=round(time.time() - t0, 1),
        peak_rss_gb=round(max(resource.getrusage(who).ru_maxrss for who in (
            resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**20, 2))  # ru_maxrss: KB


def problems(report: Report, spill_budget: int = SPILL_BUDGET_BYTES) -> dict[str, list[str]]:
    """What fails the check, by kind; each entry names the row and what to change."""
    def where(r: Row) -> str:
        return f"{r.kernel} [{r.variant}] {r.config} (launched by {', '.join(r.ops)})"

    return {
        "compile errors": [f"{where(r)}: {r.error}" for r in report.rows if r.error],
        "spills": [f"{where(r)}: spills {r.spill_stores} B stored / {r.spill_loads} B loaded "
                   f"({r.regs} registers); budget {spill_budget} B"
                   for r in report.rows
                   if not r.error and r.at_real_shape() and r.spill_bytes > spill_budget],
        "shared memory": [f"{where(r)}: {r.smem / 1024:.1f} KB shared memory > "
                          f"{SM90.smem_per_block // 1024} KB per block"
                          for r in report.rows if not r.error and r.smem > SM90.smem_per_block],
        "unlaunched kernels": [f"{k}: no public op launched it (add a driver or delete it)"
                               for k in report.unlaunched],
        "undriven ops": [f"{op}: public op with no driver in benchmarks/sm90_check.py DRIVERS"
                         for op in report.undriven],
    }


# ----------------------------------------------------------------------------- output

COLUMNS = ("kernel", "variant", "config", "regs", "spill st/ld B", "smem KB",
           "CTA/SM (warps, limit)", "mma", "global loads", "ws", "modes", "flags", "shapes",
           "launched by")


def ops_label(ops: list[str]) -> str:
    """``grouped_gemm,moe_experts fwd; moe_experts bwd`` from ``op.phase`` names."""
    by_phase: dict[str, list[str]] = {}
    for op in ops:
        name, phase = op.rsplit(".", 1)
        by_phase.setdefault(phase, []).append(name)
    return "; ".join(f"{','.join(names)} {phase}" for phase, names in by_phase.items())


def modes_label(modes: list[str]) -> str:
    """The launch modes besides the default (``det``: deterministic); ``only ...`` when the
    default mode does not launch it (a config only that mode picks)."""
    others = ",".join("det" if m == "deterministic" else m for m in modes if m != "default")
    return others if "default" in modes or not others else f"only {others}"


def shapes_label(r: Row) -> str:
    """The scenarios (shapes) that compile the row; its dtype is in the variant."""
    return ",".join(dict.fromkeys(s.split("/")[0] for s in r.scenarios))


def table_cells(r: Row, spill_budget: int) -> list[str]:
    if r.error:
        return ([r.kernel, r.variant, r.config] + [""] * 8
                + ["COMPILE ERROR", shapes_label(r), ops_label(r.ops)])
    flags = [f for f, bad in (("SPILL", r.at_real_shape() and r.spill_bytes > spill_budget),
                              ("spill", not r.at_real_shape() and r.spill_bytes > spill_budget),
                              (">227KB", r.smem > SM90.smem_per_block),
                              ("mma.sync", r.mma == "mma.sync")) if bad]
    return [r.kernel, r.variant, r.config, str(r.regs), f"{r.spill_stores}/{r.spill_loads}",
            f"{r.smem / 1024:.1f}", f"{r.ctas_per_sm} ({r.warps_per_sm}w, {r.limiter})", r.mma,
            r.loads, "ws" if r.warp_specialized else "-", modes_label(r.modes),
            " ".join(flags), shapes_label(r), ops_label(r.ops)]


def format_report(report: Report, spill_budget: int = SPILL_BUDGET_BYTES) -> str:
    """The table, then the pruned configs, coverage and a one-line summary."""
    body = [list(COLUMNS)] + [table_cells(r, spill_budget) for r in report.rows]
    widths = [max(len(row[i]) for row in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.pruned:
        lines += ["", f"pruned by the autotuner (not compiled): {'; '.join(report.pruned)}"]
    found = problems(report, spill_budget)
    for kind, items in found.items():
        if items:
            lines += ["", f"FAIL {kind}:"] + [f"  - {item}" for item in items]
    n_spill = sum(r.spill_bytes > 0 for r in report.rows)
    n_smem = sum(r.smem > SM90.smem_per_block for r in report.rows)
    n_kernels, n_errors = len({r.kernel for r in report.rows}), sum(bool(r.error) for r in report.rows)
    lines += ["", f"triton {report.triton}, ptxas {report.ptxas}, sm_{report.arch}; "
              f"{', '.join(report.scenarios)} in {','.join(report.dtypes)}: {len(report.rows)} "
              f"binaries of {n_kernels} kernels, {n_errors} compile errors, {n_spill} spilling, "
              f"{n_smem} over {SM90.smem_per_block // 1024} KB shared memory, "
              f"{len(report.pruned)} configs pruned; {report.seconds:.0f} s, "
              f"peak memory {report.peak_rss_gb:.1f} GB"]
    return "\n".join(lines)


def reexec_with(site: str, argv: list[str]) -> None:
    """Run this script again with ``site`` first on the module path (another Triton)."""
    site = str(Path(site).resolve())
    if not (Path(site) / "triton" / "__init__.py").is_file():
        sys.exit(f"--triton-site {site}: no triton package there; make it with "
                 f"`pip install --target {site} triton==3.6.0`")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, str(REPO_ROOT),
                                                                    os.environ.get("PYTHONPATH")]))}
    env["SM90_CHECK_SITE"] = site
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="olmoe", help=f"comma list of {', '.join(SCENARIOS)}, or all")
    p.add_argument("--dtype", default="bf16", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for "
                   "(occupancy and the limits stay sm_90's)")
    p.add_argument("--spill-budget", type=int, default=SPILL_BUDGET_BYTES,
                   help="spill bytes allowed per kernel at a real shape")
    p.add_argument("--json", help="write the report (every row) as JSON here")
    p.add_argument("--triton-site", help="a folder with another Triton (pip install --target DIR "
                   "triton==3.6.0): re-run with it first on the path")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many forked processes")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="also record every op with this environment variable set (a launcher "
                   "switch, e.g. one that adds a kernel variant); repeatable")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-compile progress on stderr")
    args = p.parse_args(argv)
    args.scenarios = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    args.dtypes = args.dtype.split(",")
    if bad := [e for e in args.env if "=" not in e]:
        p.error(f"--env wants NAME=VALUE, got {', '.join(bad)}")
    for name, given, known in (("scenario", args.scenarios, SCENARIOS), ("dtype", args.dtypes, DTYPES)):
        if bad := [g for g in given if g not in known]:
            p.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(known)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status: 0 clean, 1 a problem (see ``problems``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.triton_site and os.environ.get("SM90_CHECK_SITE") != str(Path(args.triton_site).resolve()):
        reexec_with(args.triton_site, argv)
    progress = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    report = check(args.scenarios, args.dtypes, args.arch, args.jobs, tuple(args.env), progress)
    print(format_report(report, args.spill_budget))
    if args.json:
        from moe_vlm.atomic import atomic_write

        data = {**report.to_json(), "spill_budget": args.spill_budget,
                "problems": problems(report, args.spill_budget)}
        atomic_write(args.json, lambda f: json.dump(data, f, indent=1))
    return 1 if any(problems(report, args.spill_budget).values()) else 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as `python benchmarks/sm90_check.py`
        sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
