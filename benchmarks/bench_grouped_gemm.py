"""Grouped GEMM alone: ours beside torch._grouped_mm, a per-expert loop and one dense GEMM.

    y[r] = x[r] @ w[e(r)]     x [R, K], w [E, K, N], offsets [E] (cumulative group ends)

Legend: T tokens, D model width, F expert width, E experts (groups), K top-k of the config,
R = T*K rows; the GEMM's own reduction width is called ``Kdim`` in rows to avoid the clash.
For each MoE config the two GEMMs of its expert layer are timed:
GEMM1 (R rows, Kdim = D, N = 2F: gate | up) and GEMM2 (R rows, Kdim = F, N = D), with group
sizes drawn uniform or Zipf(1.2) over experts (``triton_kernels.inputs.skew_counts``).

Impls, in the same run: ``ours`` (``triton_kernels.grouped_gemm``), ``grouped_mm``
(``torch._grouped_mm``), ``loop`` (a torch matmul per group slice; group bounds read on the
host once before timing, so its per-call host sync is *not* timed), ``dense`` (one GEMM of
all R rows against one expert's weight: the ceiling, no grouping).
Measured: forward (``y``) and forward+backward (``y``, ``dx = dy @ w^T`` per group,
``dw[e] = x_e^T @ dy_e``) medians; FLOPs 2*R*Kdim*N forward, 3x that forward+backward;
peak extra memory of one forward+backward; relative error of the forward against
``grouped_gemm_reference`` (fp32 accumulation).

    TRITON_INTERPRET=1 python benchmarks/bench_grouped_gemm.py --configs cpu-tiny --reps 1
    python benchmarks/bench_grouped_gemm.py --skew uniform zipf          # CUDA: PERF.md shapes

Rows are appended to ``benchmarks/results/grouped_gemm.{jsonl,csv}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as `python benchmarks/bench_grouped_gemm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MOE_CONFIGS, base_parser, dtype_name, error_note, finish, free_memory, measure, start,
    tflops, triton_skip_reason
)
from moe_vlm.model.experts import grouped_mm_supported  # noqa: E402  (torch only, no Hydra)
from triton_kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference  # noqa: E402
from triton_kernels.inputs import make_grouped_gemm, skew_counts  # noqa: E402

IMPLS = ("ours", "grouped_mm", "loop", "dense")


def gemm_shapes(d: int, f: int, k: int, t: int) -> list[tuple[str, int, int, int]]:
    """The two GEMMs of a SwiGLU MoE layer: (name, R, Kdim, N)."""
    rows = t * k
    return [("gemm1", rows, d, 2 * f), ("gemm2", rows, f, d)]


def loop_gemm(x: Tensor, w: Tensor, bounds: list[int]) -> Tensor:
    """Per-group torch matmuls over the row slices ``[bounds[e-1], bounds[e])``."""
    outs, start = [], 0
    for e, end in enumerate(bounds):
        outs.append(x[start:end] @ w[e])  # [n_e, N]
        start = end
    return torch.cat(outs)  # [R, N]


def rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()  # host sync


def run_gemm(config: str, skew: str, gemm: str, rows: int, kdim: int, n: int, e: int,
             dtype: torch.dtype, device: torch.device, reps: int, gmm_why: str | None,
             ours_why: str | None, impls: list[str]) -> list[dict[str, Any]]:
    """All impls for one GEMM shape and group-size draw."""
    counts = skew_counts(rows, e, skew, seed=0)  # [E]
    x, w, offsets = make_grouped_gemm(counts, kdim, n, dtype, device)  # [R, Kdim], [E, Kdim, N], [E]
    x.requires_grad_()
    w.requires_grad_()
    w0 = w[0].detach().clone().requires_grad_()  # [Kdim, N] dense ceiling's weight
    bounds = offsets.tolist()  # host sync, outside timing
    dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(1)).to(device, dtype)  # [R, N]
    with torch.no_grad():
        ref = grouped_gemm_reference(x, w, offsets)  # [R, N]

    fns: dict[str, Callable[[], Tensor]] = {
        "ours": lambda: grouped_gemm(x, w, offsets),
        "grouped_mm": lambda: torch._grouped_mm(x, w, offs=offsets),
        "loop": lambda: loop_gemm(x, w, bounds),
        "dense": lambda: x @ w0,
    }
    skip = {"ours": ours_why, "grouped_mm": gmm_why}
    flop = 2 * rows * kdim * n
    base = {"config": config, "skew": skew, "gemm": gemm, "shape": f"{rows}x{kdim}x{n}",
            "R": rows, "Kdim": kdim, "N": n, "E": e, "dtype": dtype_name(dtype),
            "max_group": int(counts.max()), "empty_groups": int((counts == 0).sum())}
    out = []
    for impl in impls:
        fn = fns[impl]
        row: dict[str, Any] = {**base, "impl": impl, "note": ""}
        if skip.get(impl):
            out.append({**row, "note": skip[impl]})
            continue
        try:
            if impl != "dense":
                with torch.no_grad():
                    row["rel_err"] = rel_err(fn(), ref)
            row.update(measure(fn, dy, [x, w, w0], device, reps))
            row["fwd_tflops"] = tflops(flop, row["fwd_ms"])
            row["fwdbwd_tflops"] = tflops(3 * flop, row["fwdbwd_ms"])
            if impl == "dense":
                row["note"] = "ceiling: one GEMM of R rows, no groups"
            elif impl == "loop":
                row["note"] = "group bounds precomputed (host sync not timed)"
        except Exception as exc:  # noqa: BLE001 - record and go on with the other impls
            row["note"] = f"skipped: {error_note(exc)}"
        out.append(row)
        free_memory(device)
    del x, w, w0, dy, ref
    free_memory(device)
    return out


COLUMNS = [
    ("config", "config"), ("skew", "skew"), ("gemm", "gemm"), ("shape", "R x Kdim x N"),
    ("impl", "impl"), ("fwd_ms", "fwd ms"), ("fwd_tflops", "fwd TFLOP/s"),
    ("fwdbwd_ms", "f+b ms"), ("fwdbwd_tflops", "f+b TFLOP/s"),
    ("vs_grouped_mm_fwdbwd", "f+b x grouped_mm"), ("peak_extra_gib", "peak extra GiB"),
    ("rel_err", "rel err"), ("note", "note"),
]


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0], MOE_CONFIGS)
    ap.add_argument("--gemms", nargs="+", default=["gemm1", "gemm2"], choices=["gemm1", "gemm2"])
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    args = ap.parse_args()
    device, dtype, configs, meta = start(args)
    ours_why = triton_skip_reason(device)
    rows: list[dict[str, Any]] = []
    for name in configs:
        d, f, e, k, t = MOE_CONFIGS[name]
        gmm_why = grouped_mm_supported(device, dtype, d, f)
        for skew in args.skew:
            for gemm, r, kdim, n in gemm_shapes(d, f, k, t):
                if gemm not in args.gemms:
                    continue
                print(f"  {name} {skew} {gemm} ({r}x{kdim}x{n}, E={e})", flush=True)
                rows += run_gemm(name, skew, gemm, r, kdim, n, e, dtype, device, args.reps,
                                 f"skipped: {gmm_why}" if gmm_why else None, ours_why, args.impls)
    finish(rows, "grouped_gemm", args, meta, "grouped_mm", ["config", "skew", "gemm"], COLUMNS,
           "TFLOP/s: forward 2*R*Kdim*N, forward+backward 3x.")


if __name__ == "__main__":
    main()
