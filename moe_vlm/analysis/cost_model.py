"""Communication cost model for expert parallelism (EP) with all-to-all dispatch/combine.

Legend: T tokens per rank, K experts per token (top-k), D model width, F expert width,
E routed experts, b bytes per element, ep ranks in the EP group, g GPUs per node,
n nodes the EP group spans, l = ep/n ranks of the group per node.
Units: bytes, seconds; bandwidths in **GB/s = 1e9 bytes/s** (gigaBYTES, per GPU, one
direction; the ``*_gbps`` field names mean GB/s, not Gb/s), latencies in microseconds.

What it answers: for one MoE layer, how long a rank spends in the all-to-alls of expert
parallelism against its expert compute, and from which ``ep`` adding ranks stops paying off.
Pure Python; it never imports ``torch.distributed`` (``benchmarks/bench_all_to_all.py``
measures the real exchange and prints this model's prediction beside it).

Volume of one all-to-all, per rank (``a2a_volume``)
---------------------------------------------------
Each rank routes N = T*K assignment rows of D elements. Experts are sharded E/ep per rank,
so under uniform routing a row goes to each rank with probability 1/ep::

    rows_out   = N * (ep - 1) / ep          # leaves the rank
    rows_intra = N * (l - 1) / ep           # to the other l-1 group ranks on this node
    rows_inter = N * (ep - l) / ep          # to the ep-l group ranks on other nodes
    bytes_*    = rows_* * D * b

The group fills nodes first: n = ceil(ep / g) nodes, l = ep / n ranks on each (``ep`` must
divide evenly over the nodes). The combine sends the expert outputs of the rows a rank
received back to their owners: the same volume in the other direction.

Time of one all-to-all (``a2a_time``)
-------------------------------------
::

    link_model="min"   (default) t_bw = bytes_out / B,  B = B_intra if n == 1 else B_inter
    link_model="split"           t_bw = max(bytes_intra / B_intra, bytes_inter / B_inter)
    t_lat = (l - 1) * lat_intra + (ep - l) * lat_inter          # one message per peer
    t_a2a = t_bw + t_lat

"min" says the all-to-all runs at the slowest link it uses (what NCCL all-to-all across
nodes shows: bus bandwidth near the NIC rate, NVLink traffic does not speed it up);
"split" lets NVLink and the NIC run fully concurrently (optimistic).

One training step of one MoE layer, per rank (``ep_step_time``)
---------------------------------------------------------------
::

    n_a2a   = 2 (forward: dispatch + combine) + 2 (backward: their gradients, same volume)
    comm    = n_a2a * t_a2a
    flops   = 2 * 3 * D * F * T * K   (forward: three GEMMs of D x F per row, as in
              benchmarks/bench_moe_layer.py), times 3 with the backward
    compute = flops / (expert_tflops * 1e12)
    total   = compute + comm - overlap * min(comm, compute)
    comm_fraction = comm / (comm + compute)

Under uniform routing a rank receives as many rows as it sends, so its expert compute is
that of its own T*K rows.

LSH compression (``lsh_ratio`` = rho, LSH-MoE; ``parallel.lsh``)
-----------------------------------------------------------------
Only bucket centroids cross the exchange and run through the experts, rho = centroid rows /
assignment rows (``lsh_compression`` in a run's metrics.jsonl)::

    rows_*  -> rho * rows_*          # every all-to-all (and its gradient) carries rho*N rows
    flops   -> rho * flops           # the experts compute on the centroids
    t_lat     unchanged              # one message per peer still

So LSH gains up to 1/rho where bandwidth and expert compute dominate, less where the
per-message latency does (large ep, few tokens per rank). Not modelled: the bucketing's own
cost (a [T, D] x [D, L*d'] projection, a sort of the N keys, the segment mean and the
residual: a few memory-bound passes over the [N, D] rows, like a permute), and its quality
cost, which is the loss to measure (``experiment=lsh_moe``). ``expert_tflops`` should be a measured grouped-GEMM rate
(``expert_tflops_from_bench`` reads ``benchmarks/results/moe_layer.jsonl``).

Sweeps (``ep_sweep``, ``break_even``)
-------------------------------------
Default **strong scaling** (the repo's batch sizes are global): a fixed global batch of
T_global tokens is split over ep data-parallel ranks, which are also the EP group, so
T = ceil(T_global / ep) and ``speedup = time(ep=1) / time(ep)``. Rows per expert stay
T_global*K/E at every ep (the same experts see the same tokens), which is why one
``expert_tflops`` for all ep is a fair assumption. ``scaling="weak"`` keeps T per rank
fixed instead; speedup is then the throughput ratio ``ep * time(1) / time(ep)``. Either
way speedup = tokens/s at ep over tokens/s at ep=1, and EP "stops paying off" at the last
ep where that still grows.

Assumptions (read before trusting a number)
-------------------------------------------
- Uniform routing: every rank gets exactly N/ep rows from every rank (expected values,
  fractional rows allowed). Skewed routing makes the busiest rank slower than this.
- No topology-aware deduplication: a token sent to two experts on the same remote node
  crosses the network twice (DeepSeek-V3's node-limited routing, which sends it once per
  node, is not modelled), and no hierarchical (intra-node, then inter-node) all-to-all.
- The all-to-all bandwidth is the minimum over the links used (``link_model="min"``), or
  links fully concurrent (``"split"``); no congestion, no rail-optimised topologies,
  per-GPU bandwidths are achievable unidirectional rates, not peaks.
- Latency: one fixed per-message cost per peer, paid sequentially (ep-1 messages).
- One MoE layer only: attention, dense/shared experts, router, permute, optimizer and the
  gradient reduction of weights are not counted. Capacity-factor padding is not modelled.
- Experts sharded evenly (ep divides E); one rank per GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

LINK_MODELS = ("min", "split")
SCALINGS = ("strong", "weak")
DEFAULT_EPS = (1, 2, 4, 8, 16, 32, 64)


# ----------------------------------------------------------------------------- validation

def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _check_ep(ep: Any, n_experts: int) -> None:
    _check_int("ep", ep)
    if n_experts % ep:
        raise ValueError(f"ep={ep} must divide n_experts={n_experts} (experts are sharded evenly)")


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster. Bandwidths are achievable per-GPU unidirectional rates in
    GB/s (1e9 bytes/s, not gigabits); latencies are per message, in microseconds."""

    gpus_per_node: int
    intra_node_gbps: float  # GB/s per GPU inside a node (NVLink / PCIe)
    inter_node_gbps: float  # GB/s per GPU across nodes (its share of the NICs)
    latency_us_intra: float  # us per message to a peer on the same node
    latency_us_inter: float  # us per message to a peer on another node
    name: str = "custom"
    gpu: str = ""  # substring of the device name in benchmark rows ("H100"), "" = any

    def __post_init__(self) -> None:
        _check_int("gpus_per_node", self.gpus_per_node)
        _check_positive("intra_node_gbps", self.intra_node_gbps)
        _check_positive("inter_node_gbps", self.inter_node_gbps)
        for name in ("latency_us_intra", "latency_us_inter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


# NVLink 4 (900 GB/s bidirectional, ~450 GB/s each way per GPU; NCCL reaches most of it),
# one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s.
H100_NVLINK_IB = Cluster(gpus_per_node=8, intra_node_gbps=450.0, inter_node_gbps=50.0,
                         latency_us_intra=2.0, latency_us_inter=4.0, name="h100", gpu="H100")
# NVLink 3 (600 GB/s bidirectional; ~240 GB/s achievable each way), 200 Gb/s HDR per GPU.
A100_NVLINK_IB = Cluster(gpus_per_node=8, intra_node_gbps=240.0, inter_node_gbps=25.0,
                         latency_us_intra=3.0, latency_us_inter=6.0, name="a100", gpu="A100")
# 4 GPUs on PCIe 4.0 x16 (~20 GB/s achievable) sharing one 100 GbE NIC (12.5 GB/s / 4).
PCIE_ETH = Cluster(gpus_per_node=4, intra_node_gbps=20.0, inter_node_gbps=3.0,
                   latency_us_intra=10.0, latency_us_inter=30.0, name="pcie", gpu="")
CLUSTERS: dict[str, Cluster] = {c.name: c for c in (H100_NVLINK_IB, A100_NVLINK_IB, PCIE_ETH)}


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer as one rank sees it (``tokens_per_rank`` = T). In ``ep_sweep`` the
    same class describes the global batch (T = T_global)."""

    tokens_per_rank: int  # T
    top_k: int  # K
    d_model: int  # D
    n_experts: int  # E routed experts
    d_expert: int  # F width of one expert
    bytes_per_elem: int = 2  # b: 2 for bf16/fp16 activations

    def __post_init__(self) -> None:
        for name in ("tokens_per_rank", "top_k", "d_model", "n_experts", "d_expert",
                     "bytes_per_elem"):
            _check_int(name, getattr(self, name))
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be <= n_experts={self.n_experts}")

    @property
    def rows(self) -> int:
        """N = T*K assignment rows this rank routes."""
        return self.tokens_per_rank * self.top_k

    @property
    def flops_fwd(self) -> float:
        """Active expert FLOPs of the forward on this rank's rows: 2*3*D*F*T*K."""
        return 2.0 * 3 * self.d_model * self.d_expert * self.rows


# ----------------------------------------------------------------------------- volume

@dataclass(frozen=True)
class A2AVolume:
    """Expected per-rank traffic of one all-to-all (dispatch; combine is the same)."""

    ep: int
    nodes_span: int  # n nodes the EP group spans
    ranks_per_node: int  # l = ep / n
    rows_out: float  # rows sent to other ranks: N*(ep-1)/ep
    rows_intra: float  # of those, to ranks on this node: N*(l-1)/ep
    rows_inter: float  # to ranks on other nodes: N*(ep-l)/ep
    bytes_total_out: float  # bytes
    bytes_intra: float  # bytes
    bytes_inter: float  # bytes
    compression: float = 1.0  # rho: rows sent / rows without LSH compression


def nodes_spanned(ep: int, gpus_per_node: int) -> int:
    """n = ceil(ep / g): the group fills whole nodes first."""
    _check_int("ep", ep)
    _check_int("gpus_per_node", gpus_per_node)
    return -(-ep // gpus_per_node)


def a2a_volume(shape: MoEShape, ep: int, nodes_span: int = 1,
               compression: float = 1.0) -> A2AVolume:
    """Expected bytes one rank sends in one all-to-all when ``ep`` ranks, spread evenly
    over ``nodes_span`` nodes (``ep / nodes_span`` on each), hold the experts.
    ``compression`` in (0, 1]: the share of the rows sent (LSH-MoE's centroids)."""
    _check_ep(ep, shape.n_experts)
    _check_ratio("compression", compression)
    _check_int("nodes_span", nodes_span)
    if nodes_span > ep or ep % nodes_span:
        raise ValueError(f"nodes_span={nodes_span} must divide ep={ep} "
                         "(the same number of group ranks on every node)")
    local = ep // nodes_span  # l
    n = shape.rows * compression  # N = T*K rows (rho*N centroids with LSH)
    rows_out = n * (ep - 1) / ep
    rows_intra = n * (local - 1) / ep
    rows_inter = n * (ep - local) / ep
    row_bytes = shape.d_model * shape.bytes_per_elem  # bytes per row
    return A2AVolume(ep=ep, nodes_span=nodes_span, ranks_per_node=local,
                     rows_out=rows_out, rows_intra=rows_intra, rows_inter=rows_inter,
                     bytes_total_out=rows_out * row_bytes, bytes_intra=rows_intra * row_bytes,
                     bytes_inter=rows_inter * row_bytes, compression=compression)


def a2a_time(vol: A2AVolume, cluster: Cluster, link_model: str = "min") -> tuple[float, float]:
    """(bandwidth seconds, latency seconds) of one all-to-all of volume ``vol``."""
    if link_model not in LINK_MODELS:
        raise ValueError(f"link_model must be one of {LINK_MODELS}, got {link_model!r}")
    b_intra = cluster.intra_node_gbps * 1e9  # bytes/s
    b_inter = cluster.inter_node_gbps * 1e9  # bytes/s
    if link_model == "min":
        bw = b_intra if vol.nodes_span == 1 else min(b_intra, b_inter)
        t_bw = vol.bytes_total_out / bw
    else:
        t_bw = max(vol.bytes_intra / b_intra, vol.bytes_inter / b_inter)
    peers_intra = vol.ranks_per_node - 1
    peers_inter = vol.ep - vol.ranks_per_node
    t_lat = (peers_intra * cluster.latency_us_intra + peers_inter * cluster.latency_us_inter) * 1e-6
    return t_bw, t_lat


# ----------------------------------------------------------------------------- step time

@dataclass(frozen=True)
class StepTime:
    """Predicted per-rank time of one MoE layer in one step (seconds)."""

    ep: int
    tokens_per_rank: int
    volume: A2AVolume  # one all-to-all
    n_all_to_all: int  # 2 forward only, 4 with the backward
    a2a_s: float  # one all-to-all: bandwidth + latency
    latency_s: float  # of which latency, per all-to-all
    comm_s: float  # n_all_to_all * a2a_s
    compute_s: float  # expert GEMMs
    total_s: float  # compute + comm - overlap * min(comm, compute)
    comm_fraction: float  # comm / (comm + compute), before any overlap
    bytes: float  # bytes this rank sends per step: n_all_to_all * bytes_total_out
    lsh_ratio: float = 1.0  # rho: rows sent and computed / rows without LSH


def ep_step_time(shape: MoEShape, ep: int, cluster: Cluster, expert_tflops: float,
                 include_backward: bool = True, overlap: float = 0.0,
                 link_model: str = "min", lsh_ratio: float = 1.0) -> StepTime:
    """Per-rank time of one MoE layer (dispatch, experts, combine; and their backward)
    with ``ep`` ranks holding ``E/ep`` experts each, spread over ``ceil(ep/g)`` nodes.

    ``expert_tflops``: achieved expert TFLOP/s of this GPU (forward+backward rate when
    ``include_backward``); ``overlap`` in [0, 1]: the share of min(comm, compute) hidden;
    ``lsh_ratio`` in (0, 1]: LSH-MoE's rows sent and computed per row without it."""
    _check_ep(ep, shape.n_experts)
    _check_positive("expert_tflops", expert_tflops)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be a number in [0, 1], got {overlap!r}")
    _check_ratio("lsh_ratio", lsh_ratio)
    vol = a2a_volume(shape, ep, nodes_spanned(ep, cluster.gpus_per_node), lsh_ratio)
    t_bw, t_lat = a2a_time(vol, cluster, link_model)
    n_a2a = 4 if include_backward else 2
    a2a_s = t_bw + t_lat if ep > 1 else 0.0
    comm = n_a2a * a2a_s
    flops = shape.flops_fwd * (3 if include_backward else 1) * lsh_ratio
    compute = flops / (expert_tflops * 1e12)
    total = compute + comm - overlap * min(comm, compute)
    return StepTime(ep=ep, tokens_per_rank=shape.tokens_per_rank, volume=vol,
                    n_all_to_all=n_a2a, a2a_s=a2a_s, latency_s=t_lat if ep > 1 else 0.0,
                    comm_s=comm, compute_s=compute, total_s=total,
                    comm_fraction=comm / (comm + compute), bytes=n_a2a * vol.bytes_total_out,
                    lsh_ratio=lsh_ratio)


# ----------------------------------------------------------------------------- sweeps

@dataclass(frozen=True)
class SweepRow:
    """One ep of a sweep: the step time and the gain over ep=1 (tokens/s ratio)."""

    ep: int
    nodes: int
    scaling: str
    step: StepTime
    speedup: float  # tokens/s at ep / tokens/s at ep=1
    efficiency: float  # speedup / ep

    def as_dict(self) -> dict[str, Any]:
        """Flat row for tables and result files (units in the key names)."""
        s, v = self.step, self.step.volume
        return {
            "ep": self.ep, "nodes": self.nodes, "scaling": self.scaling,
            "tokens_per_rank": s.tokens_per_rank, "rows_out": v.rows_out,
            "mb_out": v.bytes_total_out / 1e6, "mb_intra": v.bytes_intra / 1e6,
            "mb_inter": v.bytes_inter / 1e6, "a2a_ms": s.a2a_s * 1e3,
            "latency_ms": s.latency_s * 1e3, "n_all_to_all": s.n_all_to_all,
            "comm_ms": s.comm_s * 1e3, "compute_ms": s.compute_s * 1e3,
            "comm_fraction": s.comm_fraction, "step_ms": s.total_s * 1e3,
            "speedup": self.speedup, "efficiency": self.efficiency,
        }


def ep_sweep(shape_global: MoEShape, cluster: Cluster, expert_tflops: float,
             eps: Sequence[int] = DEFAULT_EPS, scaling: str = "strong",
             include_backward: bool = True, overlap: float = 0.0,
             link_model: str = "min", lsh_ratio: float = 1.0) -> list[SweepRow]:
    """``ep_step_time`` for each ep in ``eps`` (ascending; ep=1 is always computed as the
    baseline) and the speedup over ep=1.

    ``scaling="strong"`` (default): ``shape_global.tokens_per_rank`` is the global batch
    T_global, split over ep ranks (T = ceil(T_global/ep), the busiest rank).
    ``scaling="weak"``: it is the per-rank T at every ep. eps that do not divide
    n_experts are left out (an ep < 1 raises). ``lsh_ratio``: at every ep, the baseline
    ep=1 included (compare two sweeps for LSH's gain at each ep)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    for ep in eps:
        _check_int("ep", ep)
    valid = sorted({ep for ep in eps if shape_global.n_experts % ep == 0})

    def at(ep: int) -> StepTime:
        t = shape_global.tokens_per_rank
        tokens = -(-t // ep) if scaling == "strong" else t
        shape = MoEShape(tokens, shape_global.top_k, shape_global.d_model,
                         shape_global.n_experts, shape_global.d_expert, shape_global.bytes_per_elem)
        return ep_step_time(shape, ep, cluster, expert_tflops, include_backward, overlap,
                            link_model, lsh_ratio)

    base = at(1)
    rows = []
    for ep in valid:
        st = base if ep == 1 else at(ep)
        # tokens/s ratio: strong = same tokens in less time; weak = ep x the tokens
        speedup = base.total_s / st.total_s * (ep if scaling == "weak" else 1)
        rows.append(SweepRow(ep=ep, nodes=nodes_spanned(ep, cluster.gpus_per_node),
                             scaling=scaling, step=st, speedup=speedup,
                             efficiency=speedup / ep))
    return rows


@dataclass(frozen=True)
class BreakEven:
    """Where EP stops paying off in a sweep. The speedup need not be monotonic: crossing
    from one node to two can lose more than the next doublings win back, so the best ep of
    the sweep can lie beyond the first slowdown (usually at a poor efficiency)."""

    last_gain_ep: int  # largest ep up to which every step in ep raised the speedup
    last_gain_speedup: float
    next_ep: Optional[int]  # the ep after it (slower or no faster), None if beyond_sweep
    next_speedup: Optional[float]
    best_ep: int  # ep with the highest speedup in the sweep
    best_speedup: float
    best_efficiency: float  # best_speedup / best_ep
    comm_bound_ep: Optional[int]  # smallest ep with comm > compute, None if never
    beyond_sweep: bool  # speedup still rising at the last ep: the break-even lies beyond

    def describe(self) -> str:
        if self.beyond_sweep:
            head = (f"speedup still rising at the largest ep swept (ep={self.last_gain_ep}, "
                    f"{self.last_gain_speedup:.2f}x): the break-even lies beyond the sweep")
        else:
            head = (f"EP stops paying off after ep={self.last_gain_ep} "
                    f"({self.last_gain_speedup:.2f}x; ep={self.next_ep} reaches "
                    f"{self.next_speedup:.2f}x)")
            if self.best_ep != self.last_gain_ep:
                head += (f"; best in sweep ep={self.best_ep} at {self.best_speedup:.2f}x "
                         f"(efficiency {self.best_efficiency:.2f})")
        comm = (f"comm exceeds compute from ep={self.comm_bound_ep}"
                if self.comm_bound_ep is not None else "comm stays below compute")
        return f"{head}; {comm}"


def break_even(rows: Sequence[SweepRow]) -> BreakEven:
    """Scan ``ep_sweep`` rows in ascending ep: the last ep before the first one whose
    speedup does not exceed its predecessor's (or the last row), the best ep, and the
    first ep whose communication exceeds its compute."""
    if not rows:
        raise ValueError("rows must not be empty (no valid ep in the sweep)")
    rows = sorted(rows, key=lambda r: r.ep)
    last = len(rows) - 1
    for i in range(1, len(rows)):
        if rows[i].speedup <= rows[i - 1].speedup:
            last = i - 1
            break
    nxt = rows[last + 1] if last + 1 < len(rows) else None
    best = max(rows, key=lambda r: r.speedup)
    comm_bound = next((r.ep for r in rows if r.step.comm_s > r.step.compute_s), None)
    return BreakEven(last_gain_ep=rows[last].ep, last_gain_speedup=rows[last].speedup,
                     next_ep=nxt.ep if nxt else None, next_speedup=nxt.speedup if nxt else None,
                     best_ep=best.ep, best_speedup=best.speedup, best_efficiency=best.efficiency,
                     comm_bound_ep=comm_bound, beyond_sweep=nxt is None)


# ----------------------------------------------------------------------------- benchmarks

def expert_tflops_from_bench(path: str | Path, config: Optional[str] = None,
                             impl: str = "triton", fwdbwd: bool = True,
                             device: Optional[str] = None) -> Optional[float]:
    """Achieved expert TFLOP/s of the newest matching row of ``benchmarks/bench_moe_layer.py``
    output (``moe_layer.jsonl``): same ``impl``, ``config`` (any if None), uniform routing,
    granularity 1, ``device`` a case-insensitive substring of the row's device name (any if
    None), with a positive ``fwdbwd_tflops`` (``fwd_tflops`` when ``fwdbwd`` is False).
    None when the file or such a row is missing; unreadable lines are skipped."""
    p = Path(path)
    if not p.is_file():
        return None
    key = "fwdbwd_tflops" if fwdbwd else "fwd_tflops"
    best: Optional[tuple[str, int, float]] = None  # (time, line number, tflops)
    with open(p) as fh:
        for i, line in enumerate(fh):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or row.get("impl") != impl:
                continue
            if config is not None and row.get("config") != config:
                continue
            if row.get("skew", "uniform") != "uniform" or row.get("m", 1) not in (1, None):
                continue
            if device is not None and device.lower() not in str(row.get("device", "")).lower():
                continue
            val = row.get(key)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
                continue
            cand = (str(row.get("time", "")), i, float(val))
            if best is None or cand[:2] > best[:2]:
                best = cand
    return None if best is None else best[2]


# ----------------------------------------------------------------------------- tables

SWEEP_COLUMNS: list[tuple[str, str]] = [
    ("ep", "ep"), ("nodes", "nodes"), ("tokens_per_rank", "tokens/rank"),
    ("mb_intra", "MB out intra"), ("mb_inter", "MB out inter"), ("comm_ms", "comm ms"),
    ("compute_ms", "compute ms"), ("comm_fraction", "comm frac"), ("step_ms", "step ms"),
    ("speedup", "speedup"), ("efficiency", "efficiency"),
]


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v).replace("|", "/")


def format_table(rows: Sequence[SweepRow | Mapping[str, Any]],
                 columns: Sequence[str | tuple[str, str]] = SWEEP_COLUMNS) -> str:
    """A markdown table (no trailing newline) of sweep rows or dicts; ``columns`` are keys
    or ``(key, header)`` pairs. Numbers right-aligned, missing values ``-``."""
    dicts = [r.as_dict() if isinstance(r, SweepRow) else dict(r) for r in rows]
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    numeric = [any(isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)
                   for d in dicts) for k, _ in cols]
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_fmt(d.get(k)) for k, _ in cols) + " |" for d in dicts]
    return "\n".join(lines)

