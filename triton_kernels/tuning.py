"""Launch tuning of the grouped-GEMM kernels: autotune spaces, shared-memory pruning,
occupancy-sized persistent grids, the fp32 dot precision and the TMA switch.

Why each piece exists (numbers from ``sm90_compile_check.py`` at the OLMoE shape, sm_90):
- Spaces: a SwiGLU tile holds two fp32 accumulators, so it takes smaller tiles or more
  warps than a plain one (128x128x32 on 4 warps spilled ~1.1 KB per thread). The weight
  gradient's output tile is (BLOCK_K, BLOCK_N): BLOCK_K < 64 on 4 warps has no wgmma shape
  and fell back to mma.sync, so its space keeps BLOCK_K >= 64. 4-byte inputs halve the
  reduction block; fp32 in ieee precision (FMA dots) has a space of its own.
- Pruning: a config whose pipeline buffers exceed the device's per-block shared memory
  compiles, then fails to load; ``pruner`` drops it before the autotuner compiles it.
- Grid: a persistent kernel launched with one program per SM runs a 4-warp config at 4
  warps per SM; ``persistent_grid`` launches as many programs per SM as fit (registers,
  shared memory, warps), estimated from the config.
- Precision: fp32 inputs follow PyTorch's TF32 knob (``torch.backends.cuda.matmul``).
- TMA: ``TRITON_KERNELS_TMA`` adds the tensor-descriptor variant (``tma.py``) to a space.

Legend: BM/BN/BK the block sizes of ``BLOCK_M/N/K``, w warps, s pipeline stages.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton

from triton_kernels._utils import interpreting


# ----------------------------------------------------------------------------- device

@dataclass(frozen=True)
class DeviceLimits:
    """Per-SM and per-block limits that decide what fits (bytes, 32-bit registers)."""

    n_sm: int
    smem_block: int  # the opt-in limit of one block's dynamic shared memory
    smem_sm: int  # shared memory of one SM (blocks also pay ``smem_reserved`` each)
    regs_sm: int = 65536
    threads_sm: int = 2048
    ctas_sm: int = 32
    smem_reserved: int = 1024


H100 = DeviceLimits(n_sm=132, smem_block=232448, smem_sm=233472)  # H100/H200 SXM, sm_90


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    p = torch.cuda.get_device_properties(index)
    return DeviceLimits(
        n_sm=p.multi_processor_count,
        smem_block=getattr(p, "shared_memory_per_block_optin", H100.smem_block),
        smem_sm=getattr(p, "shared_memory_per_multiprocessor", H100.smem_sm),
        regs_sm=getattr(p, "regs_per_multiprocessor", H100.regs_sm),
        threads_sm=getattr(p, "max_threads_per_multi_processor", H100.threads_sm))


def device_limits(device: torch.device) -> DeviceLimits:
    """The CUDA device's limits (read once per device); H100/H200 numbers elsewhere (the
    interpreter, and ahead-of-time compile checks on CPU tensors)."""
    if device.type == "cuda":
        return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return H100


# ----------------------------------------------------------------------------- spaces

def _cfg(m: int, n: int, k: int, w: int, s: int, tma: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "USE_TMA": tma},
                         num_warps=w, num_stages=s)


# (BM, BN, BK, w, s). The first of each space is the deterministic-mode choice: a
# mid-sized tile that compiles to wgmma without spills for every dtype and variant.
# 128x256 on 8 warps spills with pointer loads (Triton 3.9: 20 B per thread); 256x128 holds
# the same accumulator without, and TMA (fewer address registers) fits 128x256 too.
GG_SHAPES = [(128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
             (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4)]
SWIGLU_SHAPES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 8, 4),
                 (64, 64, 64, 4, 4), (128, 128, 32, 8, 4)]
# dw: the output tile is (BK, BN); BM is the reduction over a group's rows.
DW_SHAPES = [(64, 128, 128, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
             (64, 256, 128, 8, 3), (64, 64, 64, 4, 4)]
TMA_ONLY_SHAPES = {"gg": [(128, 256, 64, 8, 3)], "swiglu": [], "dw": []}
# fp32 with ieee precision runs FMA dots whose operands sit in registers: at most 32
# accumulator registers per thread compile without spills (64 spilled 16-400 B; 64x128
# on 8 warps spilled 8 B gathered and transposed under Triton 3.6).
FMA_SHAPES = {"gg": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 4)],
              "swiglu": [(64, 64, 32, 8, 3), (64, 128, 32, 16, 3), (32, 64, 32, 4, 4)],
              "dw": [(64, 128, 64, 8, 3), (32, 64, 64, 4, 4), (32, 128, 128, 16, 3)]}

SPACES = {"gg": GG_SHAPES, "swiglu": SWIGLU_SHAPES, "dw": DW_SHAPES}


def tma_mode() -> str:
    """``TRITON_KERNELS_TMA``: ``0`` (default) pointer loads (cp.async) only; ``auto`` the
    autotuner also tries the TMA variant; ``1`` TMA only. Wherever the operands allow
    TMA at all (``tma.gg_tma_ok``, ``tma.dw_tma_ok``); read at each launch."""
    v = os.environ.get("TRITON_KERNELS_TMA", "0").strip().lower()
    if v in ("", "0", "off", "false"):
        return "off"
    if v == "auto":
        return "auto"
    if v in ("1", "on", "true"):
        return "on"
    raise ValueError(f"TRITON_KERNELS_TMA must be 0, auto or 1, got {v!r}")


def _for_elem(space: str, shape: tuple, elem: int) -> tuple:
    """The shapes are written for 16-bit inputs. 4-byte inputs halve the reduction block
    (BK, or BM for dw) so each stage holds the same bytes: 128-byte rows, the swizzle
    width, and the shared memory and operand registers of the 16-bit config."""
    m, n, k, w, s = shape
    if elem == 4:
        if space == "dw":
            m = max(16, m // 2)
        else:
            k = max(16, k // 2)
    return m, n, k, w, s


def configs(space: str, elem: int = 2, fma: bool = False, tma: str = "off") -> list[triton.Config]:
    """The autotune space ``space`` (gg, swiglu, dw) for inputs of ``elem`` bytes (``fma``:
    fp32 dots in ieee precision); ``tma`` off / auto / on picks the pointer configs, both,
    or the TMA twins of the tiles."""
    if fma:
        shapes = FMA_SHAPES[space]
        extra = []
    else:
        shapes = [_for_elem(space, s, elem) for s in SPACES[space]]
        extra = [_for_elem(space, s, elem) for s in TMA_ONLY_SHAPES[space]]
    if elem == 4 and not fma:
        # fp32 operand tiles leave no room for 2 x 128 accumulator registers per thread
        # (SwiGLU 128x128 on 8 warps, 128x64 on 4 spilled 24-600 B per thread): keep <= 64;
        # and a 16-wide K block (64-byte rows) sat at 254-255 registers, and spilled with
        # TMA on 4 warps: keep >= 32
        shapes = [s for s in shapes if s[2] >= 32 or space == "dw"]
        if space == "swiglu":
            shapes = [s for s in shapes if 2 * s[0] * s[1] // (32 * s[3]) <= 64]
    ptr = [_cfg(*s) for s in shapes]
    tmas = [_cfg(*s, tma=True) for s in shapes + extra]
    return {"off": ptr, "auto": ptr + tmas, "on": tmas}[tma]


# ----------------------------------------------------------------------------- estimates

def smem_bytes(space: str, kw: dict, num_stages: int, elem: int) -> int:
    """Shared memory of the operand ring: ``num_stages`` buffers of each streamed tile
    (SwiGLU streams two weight tiles). Matches Triton's allocation for these kernels
    within ~1 KB (the barriers and the gathered-index buffers; the epilogue reuses the
    ring)."""
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    if space == "dw":
        per_stage = bk * bm + bm * bn  # A^T [BK, BM], B [BM, BN]
    else:
        per_stage = bm * bk + bk * bn * (2 if space == "swiglu" else 1)
    return num_stages * per_stage * elem + 1024


def regs_per_thread(space: str, kw: dict, num_warps: int) -> int:
    """An upper estimate of registers per thread: the fp32 accumulators spread over the
    threads plus what the compile check shows besides them (~130 for the forward's
    epilogue and addressing, ~64 for dw); 255 at most."""
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    tile = bk * bn if space == "dw" else bm * bn * (2 if space == "swiglu" else 1)
    extra = 64 if space == "dw" else 128
    return min(255, tile // (32 * num_warps) + extra)


def ctas_per_sm(regs: int, smem: int, num_warps: int, lim: DeviceLimits = H100) -> int:
    """Resident blocks per SM (the occupancy calculator's rules: registers are given per
    warp in units of 256, shared memory per block plus the reserved 1 KB)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (lim.regs_sm // per_warp) // num_warps
    by_smem = lim.smem_sm // (smem + lim.smem_reserved)
    by_threads = lim.threads_sm // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, lim.ctas_sm))


def config_ctas(space: str, cfg: triton.Config, elem: int, lim: DeviceLimits = H100) -> int:
    """Blocks of ``cfg`` that fit on one SM."""
    return ctas_per_sm(regs_per_thread(space, cfg.kwargs, cfg.num_warps),
                       smem_bytes(space, cfg.kwargs, cfg.num_stages, elem), cfg.num_warps, lim)


def _elem(named: dict) -> int:
    t = named.get("a_ptr")
    return t.element_size() if isinstance(t, torch.Tensor) else 2


def _device(named: dict) -> torch.device:
    t = named.get("a_ptr")
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def pruner(space: str, lim: Optional[DeviceLimits] = None) -> Callable:
    """``early_config_prune`` for ``triton.autotune``: drops the configs whose shared memory
    (for this launch's dtype) exceeds the per-block limit of the launch's device (or
    ``lim``), so the autotuner never compiles them; keeps the order, and the smallest
    config if none fits. On H100/H200 every config of our spaces fits (the largest needs
    160 KB of 227); smaller parts (sm_80: 163 KB, sm_86/89: 99 KB) lose the big ones."""

    def prune(cfgs: list[triton.Config], named: dict, **_kw) -> list[triton.Config]:
        elem = _elem(named)
        lim_ = lim or device_limits(_device(named))
        need = {id(c): smem_bytes(space, c.kwargs, c.num_stages, elem) for c in cfgs}
        fit = [c for c in cfgs if need[id(c)] <= lim_.smem_block]
        return fit or [min(cfgs, key=lambda c: need[id(c)])]

    return prune


def _match(cfgs: list[triton.Config], meta: dict) -> Optional[triton.Config]:
    for c in cfgs:
        if all(meta.get(k) == v for k, v in c.kwargs.items()):
            return c
    return None


def persistent_grid(space: str, cfgs: list[triton.Config], device: torch.device,
                    max_tiles: Callable[[dict], int], lim: Optional[DeviceLimits] = None
                    ) -> Callable[[dict], tuple[int]]:
    """``grid(META)`` for a persistent kernel: SMs x the blocks of META's config that fit
    on one SM, capped by ``max_tiles(META)`` (an upper bound of the tiles to walk). The
    config is found in ``cfgs`` by META's block sizes (unique within a space): the grid
    callback sees the kernel's arguments, not ``num_warps``. On the CPU (the interpreter)
    4 programs; ``lim`` overrides the CUDA device's limits."""

    def grid(meta: dict) -> tuple[int]:
        tiles = max(1, max_tiles(meta))
        if device.type != "cuda":
            return (min(4, tiles),)
        lim_ = lim or device_limits(device)
        cfg = _match(cfgs, meta)
        per_sm = config_ctas(space, cfg, _elem(meta), lim_) if cfg is not None else 1
        return (min(lim_.n_sm * per_sm, tiles),)

    return grid


# ----------------------------------------------------------------------------- precision

def tf32_allowed() -> bool:
    """PyTorch's knob for fp32 matmuls on CUDA: ``torch.backends.cuda.matmul.fp32_precision``
    (torch >= 2.9; it also reflects ``torch.set_float32_matmul_precision('high'|'medium')``
    and ``torch.backends.cuda.matmul.allow_tf32 = True``), else the legacy getter."""
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if prec is not None:
        if prec == "none":  # inherits the global setting
            prec = getattr(torch.backends, "fp32_precision", "none")
        return prec == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def dot_args(dtype: torch.dtype) -> dict:
    """Kernel constexprs for ``tl.dot``. fp32 inputs: ``tf32`` where PyTorch's knob allows
    it (read here, at launch), else ``ieee``; always ``ieee`` in the interpreter, whose bf16
    dot is broken (so 16-bit operands are upcast there: ``DOT_FP32``). 16-bit inputs run
    their own tensor-core path whatever PRECISION says (``tf32``, Triton's default)."""
    interp = interpreting()
    fp32 = dtype == torch.float32
    ieee = interp or (fp32 and not tf32_allowed())
    return {"DOT_FP32": interp and not fp32, "PRECISION": "ieee" if ieee else "tf32"}
