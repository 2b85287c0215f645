"""Token permute and unpermute+combine alone: ours beside torch indexing, in TB/s.

    permute:    rows[perm[t*K + k]] = x[t]                        x [T, D] -> rows [N, D]
    unpermute:  y[t] = sum_k weights[t, k] * rows[perm[t*K + k]]   rows [N, D] -> y [T, D]

Legend: T tokens, D model width, K experts per token, E experts, N = T*K rows, s bytes
per element. Shapes (T, D, K, E) are those of each MoE config, data in ``--dtype``
(bf16 on CUDA), routing from ``triton_kernels.inputs.make_topk`` (uniform or Zipf).

Impls: ``ours`` (``triton_kernels.permute`` / ``unpermute``, weighted combine fused) and
``torch`` (``permute_reference``: stable argsort + ``x[idx]`` gather;
``unpermute_reference``: ``rows[perm]`` gather, weight, fp32 sum). Both permutes include
the index work (sort by expert); unpermute gets ``perm`` precomputed. Ours' forward is
checked against torch's (relative error column).

Effective bytes (what a minimal kernel must move, the metric of PERF.md's "gather of T*K
rows of D"; TB/s = bytes / time):
- permute forward:           2*N*D*s           (read N*D, write N*D)
- permute backward:          (N + T)*D*s       (read the N row gradients, write dx [T, D])
- unpermute forward:         (N + T)*D*s       (read N*D, write y [T, D])
- unpermute backward:        (T + 2*N)*D*s     (read dy [T, D] and the N rows for dweights,
                                                write drows [N, D])
Forward+backward TB/s use the sum of the forward and backward bytes.

    TRITON_INTERPRET=1 python benchmarks/bench_permute.py --configs cpu-tiny --reps 1
    python benchmarks/bench_permute.py                  # CUDA: PERF.md shapes, bf16

Rows are appended to ``benchmarks/results/permute.{jsonl,csv}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as `python benchmarks/bench_permute.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MOE_CONFIGS, base_parser, dtype_name, error_note, finish, free_memory, measure, start, tbps,
    triton_skip_reason,
)
from triton_kernels.inputs import make_topk  # noqa: E402
from triton_kernels.permute import (  # noqa: E402
    permute, permute_reference, unpermute, unpermute_reference,
)

# op: (forward bytes, backward bytes) in units of D*s, as functions of (N, T)
BYTES = {
    "permute": (lambda n, t: 2 * n, lambda n, t: n + t),
    "unpermute": (lambda n, t: n + t, lambda n, t: t + 2 * n),
}
FORMULA = {"permute": "fwd 2ND, bwd (N+T)D", "unpermute": "fwd (N+T)D, bwd (T+2N)D"}


def run_config(config: str, skew: str, dtype: torch.dtype, device: torch.device, reps: int,
               ours_why: str | None) -> list[dict[str, Any]]:
    """permute and unpermute, ours and torch, for one config's (T, D, K, E)."""
    d, _, e, k, t = MOE_CONFIGS[config]
    n = t * k
    gen = torch.Generator().manual_seed(1)
    experts, weights = make_topk(t, e, k, skew, seed=0, device=device)  # [T, K] int64, fp32
    weights = weights.requires_grad_()  # [T, K] fp32, as routers produce them
    x = torch.randn(t, d, generator=gen).to(device, dtype).requires_grad_()  # [T, D]
    rows_in = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()  # [N, D]
    _, perm, _ = permute_reference(x.detach(), experts, e)  # [N] int32 assignment -> row
    d_rows = torch.randn(n, d, generator=gen).to(device, dtype)  # [N, D] grad of permute
    d_y = torch.randn(t, d, generator=gen).to(device, dtype)  # [T, D] grad of unpermute

    fns: dict[tuple[str, str], Callable[[], Tensor]] = {
        ("permute", "ours"): lambda: permute(x, experts, e)[0],
        ("permute", "torch"): lambda: permute_reference(x, experts, e)[0],
        ("unpermute", "ours"): lambda: unpermute(rows_in, perm, weights),
        ("unpermute", "torch"): lambda: unpermute_reference(rows_in, perm, weights),
    }
    with torch.no_grad():  # outputs ours is checked against
        refs = {"permute": fns[("permute", "torch")]().float(),  # [N, D]
                "unpermute": fns[("unpermute", "torch")]().float()}  # [T, D]
    size = torch.empty((), dtype=dtype).element_size()
    out = []
    for (op, impl), fn in fns.items():
        fwd_b, bwd_b = (f(n, t) * d * size for f in BYTES[op])
        row: dict[str, Any] = {
            "config": config, "skew": skew, "op": op, "impl": impl, "dtype": dtype_name(dtype),
            "T": t, "D": d, "K": k, "E": e, "N": n, "fwd_bytes": fwd_b, "fwdbwd_bytes": fwd_b + bwd_b,
            "bytes": FORMULA[op], "note": "",
        }
        if impl == "ours" and ours_why:
            out.append({**row, "note": ours_why})
            continue
        try:
            dy, leaves = (d_rows, [x]) if op == "permute" else (d_y, [rows_in, weights])
            if impl == "ours":
                with torch.no_grad():
                    ref = refs[op]
                    row["rel_err"] = ((fn().float() - ref).norm() / ref.norm()).item()  # host sync
            row.update(measure(fn, dy, leaves, device, reps))
            row["fwd_tbps"] = tbps(fwd_b, row["fwd_ms"])
            row["fwdbwd_tbps"] = tbps(fwd_b + bwd_b, row["fwdbwd_ms"])
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["note"] = f"skipped: {error_note(exc)}"
        out.append(row)
        free_memory(device)
    return out


COLUMNS = [
    ("config", "config"), ("skew", "skew"), ("op", "op"), ("impl", "impl"),
    ("T", "T"), ("D", "D"), ("K", "K"), ("bytes", "bytes (N=T*K, x elt size)"),
    ("fwd_ms", "fwd ms"), ("fwd_tbps", "fwd TB/s"),
    ("fwdbwd_ms", "f+b ms"), ("fwdbwd_tbps", "f+b TB/s"),
    ("vs_torch_fwd", "fwd x torch"), ("vs_torch_fwdbwd", "f+b x torch"), ("rel_err", "rel err"),
    ("note", "note"),
]


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0], MOE_CONFIGS)
    args = ap.parse_args()
    device, dtype, configs, meta = start(args)
    ours_why = triton_skip_reason(device)
    rows: list[dict[str, Any]] = []
    for name in configs:
        for skew in args.skew:
            print(f"  {name} {skew}", flush=True)
            rows += run_config(name, skew, dtype, device, args.reps, ours_why)
    finish(rows, "permute", args, meta, "torch", ["config", "skew", "op"], COLUMNS,
           "TB/s = effective bytes / time. Bytes (N = T*K, times element size): permute fwd "
           "2*N*D, bwd (N+T)*D; unpermute fwd (N+T)*D, bwd (T+2N)*D; f+b uses the sum.")


if __name__ == "__main__":
    main()
