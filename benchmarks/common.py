"""Shared benchmark helpers: configs, timing, peak memory, run metadata, result files, tables.

Legend: T tokens, D model width, F expert width, E experts, K experts per token.

- ``bench``: median milliseconds (``triton.testing.do_bench`` on CUDA, wall clock on CPU).
- ``peak_extra_mem_gib``: the CUDA peak *above* what was allocated before the call, so the
  inputs (weights, activations made beforehand) are not counted.
- ``run_metadata``: device, torch/triton versions, git commit, time: stamped on every row.
- ``save_rows``: append rows to ``<out-dir>/<name>.jsonl`` and ``<out-dir>/<name>.csv``.
- ``print_table``: a markdown table from dict rows and a column list.
- ``base_parser``: the ``--configs/--dtype/--reps/--out-dir/--skew`` flags every script shares.

From ``moe_vlm`` it imports two standard-library-only modules: ``moe_vlm.atomic`` (the
atomic file writer) and, when a table is printed, ``moe_vlm.analysis.cost_model`` (its
``format_table``); no Hydra and no model code, so these helpers run on a bare GPU image
(``tests/test_benchmarks.py`` checks it). Importing this module runs nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from moe_vlm.atomic import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# name: (D d_model, F d_expert, E experts, K top_k, T tokens). The four GPU shapes are PERF.md's.
MOE_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "cpu-tiny": (64, 64, 4, 2, 64),  # under TRITON_INTERPRET=1: seconds per impl
    "cpu-small": (256, 512, 8, 2, 1024),
    "cpu-fine": (256, 128, 32, 8, 1024),
    "mixtral-8x7b": (4096, 14336, 8, 2, 8192),
    "deepseek-v2-lite": (2048, 1408, 64, 6, 16384),
    "olmoe-1b-7b": (2048, 1024, 64, 8, 16384),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 16384),
}
GPU_CONFIGS = ["mixtral-8x7b", "deepseek-v2-lite", "olmoe-1b-7b", "qwen3-30b-a3b"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- environment

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_skip_reason(device: torch.device) -> Optional[str]:
    """None if our Triton kernels can run on ``device``, else why not (for a skipped row)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"skipped: triton not installed ({e})"
    if device.type == "cpu" and not interpreting():
        return "skipped: Triton on CPU needs TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"skipped: Triton kernels do not run on {device.type}"
    return None


def default_configs(device: torch.device) -> list[str]:
    """PERF.md shapes on CUDA; tiny under the interpreter; small otherwise on CPU."""
    if device.type == "cuda":
        return list(GPU_CONFIGS)
    return ["cpu-tiny"] if interpreting() else ["cpu-small", "cpu-fine"]


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """``--dtype`` default: bf16 on CUDA, fp32 on CPU."""
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def base_parser(description: str, configs: Iterable[str]) -> argparse.ArgumentParser:
    """The flags every benchmark script shares."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=list(configs), default=None,
                    help="default: the PERF.md shapes on CUDA, cpu-tiny under TRITON_INTERPRET=1, "
                         "else cpu-small cpu-fine")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--reps", type=int, default=5,
                    help="CPU: timed repetitions; CUDA: do_bench runs for max(100, 20*reps) ms")
    ap.add_argument("--skew", nargs="+", default=["uniform"], choices=["uniform", "zipf"],
                    help="routing / group-size distribution over experts")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR),
                    help="where <name>.jsonl and <name>.csv are appended")
    return ap


# ----------------------------------------------------------------------------- measuring

def bench(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (L2 flushed
    between calls), wall clock after one warm-up call on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=max(100, 20 * reps), return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mem_gib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one ``fn()`` call *above* what was allocated before it (GiB), so
    inputs already in memory are not counted; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def measure(fwd: Callable[[], torch.Tensor], dy: torch.Tensor, leaves: Sequence[torch.Tensor],
            device: torch.device, reps: int,
            fwd_nograd: Optional[Callable[[], torch.Tensor]] = None) -> dict[str, Optional[float]]:
    """Time one op: ``fwd_ms`` (forward under ``no_grad``; ``fwd_nograd`` if given, e.g. an
    inference mode), ``fwdbwd_ms`` (forward, ``backward(dy)``, grads of ``leaves`` dropped
    so nothing accumulates) and ``peak_extra_gib`` of one forward+backward."""
    def fwd_bwd() -> None:
        fwd().backward(dy)
        for p in leaves:
            p.grad = None

    with torch.no_grad():
        ms_f = bench(fwd_nograd or fwd, device, reps)
    ms_fb = bench(fwd_bwd, device, reps)
    return {"fwd_ms": ms_f, "fwdbwd_ms": ms_fb, "peak_extra_gib": peak_extra_mem_gib(fwd_bwd, device)}


def tflops(flop: float, ms: Optional[float]) -> Optional[float]:
    return None if not ms else flop / (ms * 1e-3) / 1e12


def tbps(nbytes: float, ms: Optional[float]) -> Optional[float]:
    return None if not ms else nbytes / (ms * 1e-3) / 1e12


def add_speedups(rows: Sequence[dict[str, Any]], base_impl: str, group_keys: Sequence[str],
                 metrics: Sequence[str] = ("fwd_ms", "fwdbwd_ms")) -> None:
    """In place: ``vs_<base>_<metric>`` = base time / this time among rows sharing
    ``group_keys`` (> 1 means faster than ``base_impl`` in the same run)."""
    base = {tuple(r.get(k) for k in group_keys): r for r in rows if r.get("impl") == base_impl}
    for r in rows:
        b = base.get(tuple(r.get(k) for k in group_keys))
        for m in metrics:
            key = f"vs_{base_impl}_{m.removesuffix('_ms')}"
            r[key] = (b[m] / r[m]) if b and b.get(m) and r.get(m) else None


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def error_note(e: BaseException, limit: int = 300) -> str:
    """One line for a skipped row: exception type and the start of its message."""
    msg = " ".join(str(e).split())
    return f"error: {type(e).__name__}: {msg[:limit]}"


# ----------------------------------------------------------------------------- metadata

def git_commit() -> str:
    """Short hash of HEAD, or "unknown" outside a git checkout."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=REPO_ROOT, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - not a checkout, or no git
        return "unknown"


def git_dirty() -> Optional[bool]:
    """True when the working tree differs from HEAD (numbers may not match the commit)."""
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                      text=True, cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
        return bool(out.strip())
    except Exception:  # noqa: BLE001
        return None


def run_metadata(device: torch.device) -> dict[str, Any]:
    """Stamped on every saved row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpret": interpreting(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def print_header(meta: dict[str, Any], dtype: torch.dtype) -> None:
    dirty = " (+uncommitted changes)" if meta.get("dirty") else ""
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"dtype {dtype_name(dtype)}  commit {meta['commit']}{dirty}", flush=True)


# ----------------------------------------------------------------------------- result files

def _csv_text(columns: Sequence[str], rows: Iterable[dict[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", restval="")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def save_rows(rows: Sequence[dict[str, Any]], name: str, out_dir: str | Path,
              meta: dict[str, Any]) -> tuple[Path, Path]:
    """Append ``meta | row`` for each row to ``<out_dir>/<name>.jsonl`` and ``.csv``.

    The CSV gets a header when new (written atomically). If earlier runs wrote other
    columns, the CSV is rewritten atomically with the union of columns (old rows keep
    theirs, blanks elsewhere), so no column is ever silently dropped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = [{**meta, **r} for r in rows]
    jsonl, csv_path = out / f"{name}.jsonl", out / f"{name}.csv"
    with open(jsonl, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in full))
    columns: list[str] = []
    for r in full:
        columns += [k for k in r if k not in columns]
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        atomic_write(csv_path, lambda f: f.write(_csv_text(columns, full, header=True)))
        return jsonl, csv_path
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        old_cols = list(reader.fieldnames or [])
        if set(columns) <= set(old_cols):
            old_rows = None
        else:
            old_rows = list(reader)
    if old_rows is None:  # same (or fewer) columns: plain append in the file's order
        with open(csv_path, "a", newline="") as fh:
            fh.write(_csv_text(old_cols, full, header=False))
    else:
        merged = old_cols + [c for c in columns if c not in old_cols]
        atomic_write(csv_path, lambda f: f.write(_csv_text(merged, old_rows + full, header=True)))
    return jsonl, csv_path


# ----------------------------------------------------------------------------- tables

def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]]) -> None:
    """Markdown table; ``columns`` are row keys or ``(key, header)`` pairs. Numbers are
    right-aligned, missing values print as ``-``."""
    from moe_vlm.analysis.cost_model import format_table

    print(format_table(rows, columns), flush=True)
    print(flush=True)


# ----------------------------------------------------------------------------- run frame

def start(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str], dict[str, Any]]:
    """Device, dtype, configs and run metadata from the common flags; prints the header."""
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    meta = run_metadata(device)
    print_header(meta, dtype)
    return device, dtype, args.configs or default_configs(device), meta


def finish(rows: list[dict[str, Any]], name: str, args: argparse.Namespace, meta: dict[str, Any],
           base_impl: str, group_keys: Sequence[str], columns: Sequence[str | tuple[str, str]],
           footnote: str) -> None:
    """Speed-up columns against ``base_impl``, rows saved, footnote and table printed."""
    add_speedups(rows, base_impl, group_keys)
    jsonl, csv_path = save_rows(rows, name, args.out_dir, meta)
    print(f"\n{footnote}\nrows -> {jsonl}, {csv_path}\n")
    print_table(rows, columns)
