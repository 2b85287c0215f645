"""Expert-parallel step time from the cost model (no GPU needed): where EP stops paying off.

Legend: T tokens, D model width, F expert width, E experts, K experts per token, ep ranks
in the EP group.

For each config (the PERF.md shapes of ``benchmarks/common.py``; its T is the global batch
in tokens) and each ep in 1, 2, 4, ... up to ``--nodes`` x GPUs per node (and dividing E),
prints ``moe_vlm.analysis.cost_model``'s prediction for one MoE layer, per rank: tokens,
MB sent per all-to-all (to ranks on the same node / on other nodes), communication (4
all-to-alls with the backward), expert compute, comm fraction, step time, speedup over
ep=1 and efficiency, then the break-even line. Formulas and assumptions: the docstring
of ``moe_vlm/analysis/cost_model.py``.

Expert TFLOP/s: ``--expert-tflops``, else the newest matching row (config, ``--impl``,
forward+backward, device name containing the cluster's GPU) of ``--bench-file``
(``benchmarks/results/moe_layer.jsonl``), else an assumed rate per cluster preset
(printed as such).

    python benchmarks/ep_cost_model.py --configs olmoe-1b-7b --cluster h100 --nodes 8
    python benchmarks/ep_cost_model.py --configs mixtral-8x7b qwen3-30b-a3b --overlap 0.5
    python benchmarks/ep_cost_model.py --configs olmoe-1b-7b --lsh-ratio 0.3

``--lsh-ratio R`` (LSH-MoE, ``parallel.lsh``; R = a run's ``lsh_compression``) adds, at each
ep, the step with only R of the rows sent and computed (latency unchanged; the bucketing's
own cost not counted) and LSH's gain over the same ep without it: the larger the share of
bandwidth and expert compute in the step, the closer the gain to 1/R.

Rows are appended to ``benchmarks/results/ep_cost_model.{jsonl,csv}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch

if __package__ in (None, ""):  # run as `python benchmarks/ep_cost_model.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    GPU_CONFIGS, MOE_CONFIGS, RESULTS_DIR, run_metadata, save_rows,
)
from moe_vlm.analysis.cost_model import (  # noqa: E402
    CLUSTERS, LINK_MODELS, SCALINGS, MoEShape, break_even, ep_sweep, expert_tflops_from_bench,
    format_table,
)

# Assumed expert (grouped GEMM, bf16) forward+backward TFLOP/s when nothing was measured:
# about 40% of the dense bf16 peak (H100 SXM 989, A100 312); forward-only is not higher
# by much for these shapes, so the same numbers serve --fwd-only.
ASSUMED_TFLOPS = {"h100": 400.0, "a100": 150.0, "pcie": 100.0}

COLUMNS = [
    ("ep", "ep"), ("nodes", "nodes"), ("tokens_per_rank", "tokens/rank"),
    ("mb_intra", "MB out intra /a2a"), ("mb_inter", "MB out inter /a2a"),
    ("comm_ms", "comm ms"), ("latency_share", "of which latency"),
    ("compute_ms", "compute ms"), ("comm_fraction", "comm frac"), ("step_ms", "step ms"),
    ("speedup", "speedup"), ("efficiency", "efficiency"),
]
LSH_COLUMNS = [("lsh_comm_ms", "LSH comm ms"), ("lsh_step_ms", "LSH step ms"),
               ("lsh_gain", "LSH gain")]


def resolve_tflops(args: argparse.Namespace, config: str) -> tuple[float, str]:
    """(expert TFLOP/s, where it came from)."""
    if args.expert_tflops is not None:
        return args.expert_tflops, "--expert-tflops"
    cluster = CLUSTERS[args.cluster]
    got: Optional[float] = None
    if cluster.gpu:  # never take a CPU row for a GPU cluster
        got = expert_tflops_from_bench(args.bench_file, config=config, impl=args.impl,
                                       fwdbwd=not args.fwd_only, device=cluster.gpu)
    if got is not None:
        return got, f"measured: {args.bench_file} ({args.impl}, {cluster.gpu})"
    return ASSUMED_TFLOPS[args.cluster], (f"assumed for {args.cluster} (no {args.impl} row on "
                                          f"{cluster.gpu or 'this cluster'} in {args.bench_file})")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=list(MOE_CONFIGS), default=["olmoe-1b-7b"],
                    help=f"MoE shapes (GPU ones: {' '.join(GPU_CONFIGS)}); T = global tokens")
    ap.add_argument("--cluster", choices=list(CLUSTERS), default="h100")
    ap.add_argument("--nodes", type=int, default=8, help="largest ep = nodes x GPUs per node")
    ap.add_argument("--eps", nargs="+", type=int, default=None,
                    help="default: powers of two up to nodes x GPUs per node")
    ap.add_argument("--expert-tflops", type=float, default=None)
    ap.add_argument("--bench-file", default=str(RESULTS_DIR / "moe_layer.jsonl"))
    ap.add_argument("--impl", default="triton", help="impl of the bench rows to read")
    ap.add_argument("--fwd-only", action="store_true", help="forward only: 2 all-to-alls")
    ap.add_argument("--overlap", type=float, default=0.0,
                    help="share of min(comm, compute) hidden by overlap, in [0, 1]")
    ap.add_argument("--link-model", choices=LINK_MODELS, default="min")
    ap.add_argument("--scaling", choices=SCALINGS, default="strong")
    ap.add_argument("--bytes-per-elem", type=int, default=2, help="activation bytes (bf16: 2)")
    ap.add_argument("--lsh-ratio", type=float, default=None,
                    help="LSH-MoE compression in (0, 1] (rows sent / rows): adds LSH columns")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR),
                    help="where ep_cost_model.jsonl and .csv are appended")
    args = ap.parse_args(argv)
    cluster = CLUSTERS[args.cluster]
    if args.nodes < 1:
        ap.error("--nodes must be >= 1")
    if args.lsh_ratio is not None and not 0 < args.lsh_ratio <= 1:
        ap.error("--lsh-ratio must be in (0, 1]")
    max_ep = args.nodes * cluster.gpus_per_node
    eps = args.eps or [2**i for i in range(max_ep.bit_length()) if 2**i <= max_ep]

    meta = run_metadata(torch.device("cpu"))  # a model: the machine it ran on does not matter
    print(f"cluster {cluster.name}: {cluster.gpus_per_node} GPUs/node, intra "
          f"{cluster.intra_node_gbps:g} GB/s, inter {cluster.inter_node_gbps:g} GB/s per GPU, "
          f"latency {cluster.latency_us_intra:g}/{cluster.latency_us_inter:g} us per message; "
          f"{args.nodes} nodes; link model {args.link_model}; {args.scaling} scaling; "
          f"overlap {args.overlap:g}; commit {meta['commit']}\n", flush=True)
    saved: list[dict[str, Any]] = []
    for name in args.configs:
        d, f, e, k, t = MOE_CONFIGS[name]
        tflops, source = resolve_tflops(args, name)
        shape = MoEShape(tokens_per_rank=t, top_k=k, d_model=d, n_experts=e, d_expert=f,
                         bytes_per_elem=args.bytes_per_elem)
        rows = ep_sweep(shape, cluster, tflops, eps=eps, scaling=args.scaling,
                        include_backward=not args.fwd_only, overlap=args.overlap,
                        link_model=args.link_model)
        lsh = {} if args.lsh_ratio is None else {
            r.ep: r for r in ep_sweep(shape, cluster, tflops, eps=eps, scaling=args.scaling,
                                      include_backward=not args.fwd_only, overlap=args.overlap,
                                      link_model=args.link_model, lsh_ratio=args.lsh_ratio)}
        left_out = sorted(set(eps) - {r.ep for r in rows})
        be = break_even(rows)
        batch = "global" if args.scaling == "strong" else "per rank"
        print(f"## {name}: D={d} F={f} E={e} K={k}, T={t} tokens ({batch}); expert "
              f"{tflops:g} TFLOP/s ({source})")
        if left_out:
            print(f"(ep {' '.join(map(str, left_out))} left out: does not divide E={e})")
        dicts = []
        for r in rows:
            row = {"config": name, "cluster": cluster.name, "link_model": args.link_model,
                   "overlap": args.overlap, "fwdbwd": not args.fwd_only, "expert_tflops": tflops,
                   "tflops_source": source, "D": d, "F": f, "E": e, "K": k, "T": t, **r.as_dict()}
            row["latency_share"] = (r.step.latency_s * r.step.n_all_to_all / r.step.comm_s
                                    if r.step.comm_s else None)
            row["break_even_ep"] = be.last_gain_ep
            if lsh:
                ls = lsh[r.ep].step
                row.update(lsh_ratio=args.lsh_ratio, lsh_comm_ms=ls.comm_s * 1e3,
                           lsh_step_ms=ls.total_s * 1e3, lsh_gain=r.step.total_s / ls.total_s)
            dicts.append(row)
        print(format_table(dicts, COLUMNS + (LSH_COLUMNS if lsh else [])))
        print(f"\nbreak-even: {be.describe()}", flush=True)
        if lsh:
            print(f"with LSH (ratio {args.lsh_ratio:g}): {break_even(list(lsh.values())).describe()}")
        print(flush=True)
        saved += dicts
    jsonl, csv_path = save_rows(saved, "ep_cost_model", args.out_dir, meta)
    print(f"MB out = per rank per all-to-all (the step does {4 if not args.fwd_only else 2}); "
          f"times per rank per MoE layer.\nrows -> {jsonl}, {csv_path}")


if __name__ == "__main__":
    main()
