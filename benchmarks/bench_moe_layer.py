"""MoE expert compute: our backends side by side with a dense chain of the same active size.

For each config (D, F, E, K, T) and routing skew, times forward and forward+backward of
the routed-expert compute (permute, SwiGLU experts, weighted combine) for every backend
that runs here, plus one dense SwiGLU chain on T*K rows (no routing, no permute: the
ideal the MoE layer chases), and reports ms, active TFLOP/s and peak memory.
Active FLOPs: forward = 2 * 3 * D * F * T * K, forward+backward = 3x that.

    python benchmarks/bench_moe_layer.py                       # CPU: small configs
    python benchmarks/bench_moe_layer.py --configs mixtral-8x7b olmoe-1b-7b --skew uniform zipf

Rows are appended (with device, torch version and git commit) to
``benchmarks/results/moe_layer.jsonl`` and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from moe_vlm.model.experts import BACKENDS, grouped_mm_supported

CONFIGS = {  # name: (d_model, d_expert, experts, top_k, tokens)
    "cpu-small": (256, 512, 8, 2, 1024),
    "cpu-fine": (256, 128, 32, 8, 1024),
    "mixtral-8x7b": (4096, 14336, 8, 2, 8192),
    "deepseek-v2-lite": (2048, 1408, 64, 6, 16384),
    "olmoe-1b-7b": (2048, 1024, 64, 8, 16384),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 16384),
}


def make_routing(t: int, e: int, k: int, skew: str, device: torch.device,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat assignments (token_idx, expert_idx, weight) with K distinct experts per token,
    drawn uniformly or from a Zipf(1.2) popularity over experts."""
    if skew == "uniform":
        pop = torch.ones(e)
    elif skew == "zipf":
        pop = 1.0 / torch.arange(1, e + 1).float() ** 1.2
    else:
        raise ValueError(f"unknown skew {skew!r}; use uniform or zipf")
    experts = torch.multinomial(pop.expand(t, e), k, replacement=False, generator=gen)  # [T, K]
    weight = torch.rand(t, k, generator=gen)
    weight = weight / weight.sum(-1, keepdim=True)
    token_idx = torch.arange(t).repeat_interleave(k)
    return token_idx.to(device), experts.reshape(-1).to(device), weight.reshape(-1).to(device)


def bench(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds: triton's do_bench on CUDA, wall clock otherwise."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=max(50, reps * 10), return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return "unknown"


def run_config(name: str, skew: str, dtype: torch.dtype, device: torch.device, reps: int) -> list[dict]:
    d, f, e, k, t = CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    tok, exp, wgt = make_routing(t, e, k, skew, device, gen)
    x = (torch.randn(t, d, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    w_in = (torch.randn(e, d, 2 * f, generator=gen) * d**-0.5).to(device, dtype).requires_grad_()
    w_out = (torch.randn(e, f, d, generator=gen) * f**-0.5).to(device, dtype).requires_grad_()
    dense_in = w_in[0].detach().clone().requires_grad_()
    dense_out = w_out[0].detach().clone().requires_grad_()
    gy = torch.randn(t, d, generator=gen).to(device, dtype)
    gy_dense = gy.repeat(k, 1)

    def dense() -> torch.Tensor:  # one SwiGLU chain on T*K rows, same active FLOPs
        gate, up = (x.repeat(k, 1) @ dense_in).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ dense_out

    impls: dict[str, Callable[[], torch.Tensor]] = {}
    for backend in ("torch", "grouped_mm"):
        if backend == "grouped_mm" and grouped_mm_supported(device, dtype, d, f):
            continue
        fn = BACKENDS[backend]()
        impls[backend] = (lambda fn=fn: fn(x, tok, exp, wgt, w_in, w_out))
    impls["dense_chain"] = dense
    flop_fwd = 2 * 3 * d * f * t * k
    rows = []
    for impl, fn in impls.items():
        g = gy_dense if impl == "dense_chain" else gy

        def fwd_bwd(fn=fn, g=g) -> None:
            fn().backward(g)
            for p in (x, w_in, w_out, dense_in, dense_out):
                p.grad = None

        with torch.no_grad():
            ms_f = bench(fn, device, reps)
        ms_fb = bench(fwd_bwd, device, reps)
        rows.append({
            "config": name, "skew": skew, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
            "D": d, "F": f, "E": e, "K": k, "T": t,
            "fwd_ms": ms_f, "fwd_tflops": flop_fwd / (ms_f * 1e-3) / 1e12,
            "fwdbwd_ms": ms_fb, "fwdbwd_tflops": 3 * flop_fwd / (ms_fb * 1e-3) / 1e12,
            "peak_mem_gib": peak_mem_gib(fwd_bwd, device),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    ap.add_argument("--skew", nargs="+", default=["uniform"], choices=["uniform", "zipf"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.jsonl"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = args.configs or (["mixtral-8x7b", "deepseek-v2-lite", "olmoe-1b-7b", "qwen3-30b-a3b"]
                               if device.type == "cuda" else ["cpu-small", "cpu-fine"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = [r for c in configs for s in args.skew for r in run_config(c, s, dtype, device, args.reps)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        for r in rows:
            fh.write(json.dumps({**meta, **r}) + "\n")
    print(f"device: {meta['device']}  torch {meta['torch']}  commit {meta['commit']}  -> {out}\n")
    print("| config | skew | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"| {r['config']} | {r['skew']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.3f} | "
              f"{r['fwdbwd_ms']:.3f} | {r['fwdbwd_tflops']:.3f} | {mem} |")


if __name__ == "__main__":
    main()
