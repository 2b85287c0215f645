"""Expert-parallel all-to-all (dispatch and combine), measured with torch.distributed.

Legend: T tokens per rank, K experts per token, D model width, E experts, N = T*K
assignment rows per rank, ep = ``--procs`` ranks, each holding E/ep experts.

Spawns ``--procs`` local processes (gloo on CPU tensors; NCCL with one GPU per rank when
CUDA has at least that many). Each rank routes its T tokens uniformly to K distinct experts
of E, sorts the N rows by owner rank (expert // (E/ep)) and, like the EP layer:

- ``counts``: exchanges the per-rank row counts, ``all_to_all_single`` of [ep] int64,
  then ``.tolist()`` (a host sync) to get the split sizes;
- ``dispatch``: ``all_to_all_single`` of the rows [N, D] with those uneven splits;
- ``combine``: the same exchange back (the received rows stand in for expert outputs).

One round trip is checked to return every row unchanged. Each op is timed per rank as the
median of ``--reps`` (a barrier before each, CUDA synchronised around it); the table shows
the slowest rank. ``MB out`` = bytes a rank sends to *other* ranks (mean over ranks);
``GB/s`` = that / the op's time (1e9 bytes/s, per rank, one direction). Beside it, the cost
model's expected bytes and time (``moe_vlm.analysis.cost_model``: bandwidth + one
latency per peer, all ranks on one node): on CPU only with ``--link-gbps`` (and
``--latency-us``), on CUDA from the preset matching the GPU name (or those flags).

    python benchmarks/bench_all_to_all.py --procs 2 --tokens 256 1024 4096
    python benchmarks/bench_all_to_all.py --procs 4 --link-gbps 5 --latency-us 50
    python benchmarks/bench_all_to_all.py --procs 8 --dtype bf16      # 8 GPUs: NCCL

A rank that hangs cannot hang the run: the process group has ``--timeout`` and the parent
kills every child once the same deadline passes (or once any child fails). Rows are
appended to ``benchmarks/results/all_to_all.{jsonl,csv}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

if __package__ in (None, ""):  # run as `python benchmarks/bench_all_to_all.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DTYPES, RESULTS_DIR, dtype_name, print_header, print_table, run_metadata, save_rows,
)
from moe_vlm.analysis.cost_model import (  # noqa: E402
    CLUSTERS, Cluster, MoEShape, a2a_time, a2a_volume,
)

OPS = ("counts", "dispatch", "combine")


def free_port() -> int:
    """A TCP port free right now on localhost (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- one rank

def _time_op(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` on this rank, a barrier before each call."""
    import torch.distributed as dist

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out_path: str) -> None:
    """One rank: for each T, build the routed rows, check a round trip, time the three ops,
    gather per-rank numbers; rank 0 writes them to ``out_path`` as JSON."""
    import torch.distributed as dist

    backend = cfg["backend"]
    if backend == "gloo":
        torch.set_num_threads(1)  # ranks share the host's cores
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=cfg["timeout"]))
    try:
        dtype = DTYPES[cfg["dtype"]]
        e, k, d = cfg["experts"], cfg["top_k"], cfg["d_model"]
        per_rank = e // world  # experts per rank
        results = []
        for t in cfg["tokens"]:
            g = torch.Generator().manual_seed(1000 * rank + t)
            experts_TK = torch.rand(t, e, generator=g).topk(k, dim=1).indices  # [T, K] distinct
            owner_N = (experts_TK.reshape(-1) // per_rank).to(device)  # [N] rank of each row
            order_N = torch.argsort(owner_N, stable=True)  # [N] rows grouped by owner
            x_TD = torch.randn(t, d, generator=g).to(device, dtype)  # [T, D]
            rows_ND = x_TD[order_N // k].contiguous()  # [N, D] in send order
            send_counts = torch.bincount(owner_N, minlength=world).to(torch.int64)  # [ep]
            recv_counts = torch.empty_like(send_counts)  # [ep]
            splits: dict[str, list[int]] = {}

            def counts() -> None:
                dist.all_to_all_single(recv_counts, send_counts)
                splits["send"] = send_counts.tolist()  # host sync
                splits["recv"] = recv_counts.tolist()  # host sync

            counts()
            recv_MD = torch.empty(sum(splits["recv"]), d, device=device, dtype=dtype)  # [M, D]
            back_ND = torch.empty_like(rows_ND)  # [N, D]

            def dispatch() -> None:
                dist.all_to_all_single(recv_MD, rows_ND, splits["recv"], splits["send"])

            def combine() -> None:
                dist.all_to_all_single(back_ND, recv_MD, splits["send"], splits["recv"])

            dispatch()
            combine()
            if not torch.equal(back_ND, rows_ND):
                raise RuntimeError(f"rank {rank}: dispatch + combine did not return the rows")
            ms = {op: _time_op(fn, device, cfg["reps"], cfg["warmup"])
                  for op, fn in zip(OPS, (counts, dispatch, combine))}
            row_bytes = d * dtype.itemsize  # bytes per row
            mine = [ms["counts"], ms["dispatch"], ms["combine"],
                    (sum(splits["send"]) - splits["send"][rank]) * row_bytes,  # bytes out
                    (sum(splits["recv"]) - splits["recv"][rank]) * row_bytes]  # bytes in
            local = torch.tensor(mine, dtype=torch.float64, device=device)  # [5]
            every = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(every, local)
            results.append({"T": t, "per_rank": [v.tolist() for v in every]})  # host sync
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump(results, fh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- parent

def run_ranks(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Start ``world`` spawned ranks and wait at most ``cfg['timeout']`` seconds (plus
    start-up slack); kill them all if one fails or time runs out."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="a2a_") as tmp:
        out_path = os.path.join(tmp, "ranks.json")
        procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, out_path), daemon=True)
                 for r in range(world)]
        deadline = time.monotonic() + cfg["timeout"] + 60  # + spawning and importing torch
        failed: Optional[str] = None
        try:
            for p in procs:
                p.start()
            while any(p.is_alive() for p in procs):
                bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if bad:
                    failed = f"rank {bad[0][0]} exited with code {bad[0][1]}"
                    break
                if time.monotonic() > deadline:
                    failed = f"timed out after {cfg['timeout'] + 60} s"
                    break
                time.sleep(0.05)
        finally:
            for p in procs:  # only our own children, by handle
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if failed is None:
            bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
            if bad:
                failed = f"rank {bad[0][0]} exited with code {bad[0][1]}"
        if failed is not None:
            raise RuntimeError(f"all-to-all run failed: {failed}")
        with open(out_path) as fh:
            return json.load(fh)


def prediction_cluster(args: argparse.Namespace, backend: str) -> Optional[Cluster]:
    """The link the model predicts with: ``--link-gbps``, else ``--cluster``, else on NCCL
    the preset whose GPU name matches; None on CPU without ``--link-gbps``."""
    if args.link_gbps is not None:
        lat = args.latency_us or 0.0
        return Cluster(gpus_per_node=args.procs, intra_node_gbps=args.link_gbps,
                       inter_node_gbps=args.link_gbps, latency_us_intra=lat,
                       latency_us_inter=lat, name="--link-gbps")
    if args.cluster is not None:
        return CLUSTERS[args.cluster]
    if backend == "nccl":
        name = torch.cuda.get_device_name(0)
        return next((c for c in CLUSTERS.values() if c.gpu and c.gpu in name), None)
    return None


COLUMNS = [
    ("T", "T"), ("K", "K"), ("D", "D"), ("ep", "ep"), ("mb_out", "MB out/rank"),
    ("model_mb_out", "model MB out"), ("counts_ms", "counts ms"),
    ("dispatch_ms", "dispatch ms"), ("dispatch_gbps", "dispatch GB/s"),
    ("combine_ms", "combine ms"), ("combine_gbps", "combine GB/s"),
    ("model_ms", "model ms"), ("dispatch_vs_model", "dispatch / model"),
]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2, help="ranks = EP group size")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024], help="T per rank")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64, help="E, divisible by --procs")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default: bf16 with NCCL, fp32 with gloo")
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                    help="auto: NCCL if CUDA has >= --procs GPUs, else gloo on CPU")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--link-gbps", type=float, default=None,
                    help="GB/s per rank for the model's prediction (needed on CPU)")
    ap.add_argument("--latency-us", type=float, default=None,
                    help="per-message latency for the prediction with --link-gbps (default 0)")
    ap.add_argument("--cluster", choices=list(CLUSTERS), default=None,
                    help="predict with this preset's intra-node link")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds: process-group timeout; children are killed 60 s after it")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR),
                    help="where all_to_all.jsonl and .csv are appended")
    args = ap.parse_args(argv)
    if args.procs < 1:
        ap.error("--procs must be >= 1")
    if args.experts % args.procs:
        ap.error(f"--experts {args.experts} must be divisible by --procs {args.procs}")
    if not 1 <= args.top_k <= args.experts:
        ap.error("--top-k must be in [1, --experts]")
    if min(args.tokens) < 1 or args.d_model < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--tokens, --d-model and --reps must be >= 1, --warmup >= 0")
    if args.link_gbps is not None and args.link_gbps <= 0:
        ap.error("--link-gbps must be > 0")
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if n_gpu >= args.procs else "gloo"
    if backend == "nccl" and n_gpu < args.procs:
        ap.error(f"NCCL needs one GPU per rank: {n_gpu} GPUs for {args.procs} ranks")
    dtype_key = args.dtype or ("bf16" if backend == "nccl" else "fp32")
    dtype = DTYPES[dtype_key]

    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    meta = run_metadata(device)
    print_header(meta, dtype)
    print(f"{args.procs} ranks, {backend}; E={args.experts} ({args.experts // args.procs} per "
          f"rank), K={args.top_k}, D={args.d_model}; median of {args.reps}", flush=True)
    cfg = {"backend": backend, "dtype": dtype_key, "experts": args.experts, "top_k": args.top_k,
           "d_model": args.d_model, "tokens": list(args.tokens), "reps": args.reps,
           "warmup": args.warmup, "timeout": args.timeout}
    t0 = time.perf_counter()
    try:
        results = run_ranks(args.procs, cfg)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"({time.perf_counter() - t0:.1f} s)\n", flush=True)

    cluster = prediction_cluster(args, backend)
    rows: list[dict[str, Any]] = []
    for res in results:
        per = res["per_rank"]  # [ep][counts_ms, dispatch_ms, combine_ms, bytes_out, bytes_in]
        slowest = [max(r[i] for r in per) for i in range(3)]  # ms, the slowest rank per op
        bytes_out = statistics.mean(r[3] for r in per)  # bytes, mean over ranks
        row: dict[str, Any] = {
            "T": res["T"], "K": args.top_k, "D": args.d_model, "E": args.experts,
            "ep": args.procs, "backend": backend, "dtype": dtype_name(dtype),
            "bytes_out": bytes_out, "mb_out": bytes_out / 1e6,
            "counts_ms": slowest[0], "dispatch_ms": slowest[1], "combine_ms": slowest[2],
            "dispatch_gbps": bytes_out / (slowest[1] * 1e-3) / 1e9 if slowest[1] else None,
            "combine_gbps": bytes_out / (slowest[2] * 1e-3) / 1e9 if slowest[2] else None,
            "dispatch_ms_ranks": [r[1] for r in per],
        }
        # d_expert does not enter the volume: 1 is a placeholder
        shape = MoEShape(res["T"], args.top_k, args.d_model, args.experts, 1, dtype.itemsize)
        vol = a2a_volume(shape, args.procs, nodes_span=1)
        row["model_mb_out"] = vol.bytes_total_out / 1e6
        if cluster is not None:
            t_bw, t_lat = a2a_time(vol, cluster)
            row.update(model_ms=(t_bw + t_lat) * 1e3 if args.procs > 1 else 0.0,
                       model_link=f"{cluster.name}: {cluster.intra_node_gbps:g} GB/s, "
                                  f"{cluster.latency_us_intra:g} us")
            if row["model_ms"]:
                row["dispatch_vs_model"] = row["dispatch_ms"] / row["model_ms"]
        rows.append(row)
    jsonl, csv_path = save_rows(rows, "all_to_all", args.out_dir, meta)
    print_table(rows, COLUMNS)
    if cluster is None:
        print("no model time: pass --link-gbps (GB/s per rank) [--latency-us] on CPU")
    else:
        print(f"model: {rows[0]['model_link']} per rank, ranks on one node")
    print(f"rows -> {jsonl}, {csv_path}", flush=True)


if __name__ == "__main__":
    main()
