"""MoE expert compute (permute, SwiGLU experts, weighted combine): every backend side by side.

    y[t] = sum_{(t, e, w)} w * (silu(x[t] @ Wg[e]) * (x[t] @ Wu[e])) @ Wo[e]

Legend: T tokens, D model width, F expert width, E experts, K experts per token,
N = T*K assignments; ``w_in [E, D, 2F]`` (gate | up), ``w_out [E, F, D]``.
For each config and routing skew (uniform or Zipf(1.2) over experts, same routing for every
impl that takes it), times forward and forward+backward (dx, dw_in, dw_out and the
routing-weight gradient) of:

- ``torch``: per-expert loop (HF eager style; one host sync per expert);
- ``grouped_mm``: sort permute + ``torch._grouped_mm`` + scatter-add (torchtitan style);
- ``triton``: ours, ``moe_vlm`` backend ``triton`` (``triton_kernels.moe_experts``);
- ``dense_chain``: one SwiGLU chain on T*K rows of the same active size (no routing);
- ``sonicmoe`` / ``megablocks``: published layers, when importable. Their modules run
  their **own router** (router GEMM + top-k inside the timed region, routing not ours), so
  they only run under ``uniform`` (an untrained router routes near-uniformly).

Reported: ms, active TFLOP/s (forward 2*3*D*F*T*K, forward+backward 3x; router work is
never counted), peak extra memory of one forward+backward (CUDA, inputs excluded), the
speedup over ``grouped_mm`` in the same run and, for the routed impls, the relative error
of the forward against ``grouped_mm`` (or ``torch`` where it cannot run).

``--granularity [m ...]`` sweeps fine-grained experts at the same active FLOPs: expert
width F/m, E*m experts, K*m active (m in 1 2 4 8 16 by default; m with F/m < 16, F not
divisible by m or K*m > E*m is skipped). Its base config: ``--configs`` or olmoe-1b-7b
(CUDA) / cpu-small (CPU).

    TRITON_INTERPRET=1 python benchmarks/bench_moe_layer.py --configs cpu-tiny --reps 1
    python benchmarks/bench_moe_layer.py --skew uniform zipf           # CUDA: PERF.md shapes
    python benchmarks/bench_moe_layer.py --granularity                 # CUDA: olmoe, m=1..16

Peers that fail (JIT, OOM, missing CUDA) are recorded as skipped rows with the error; the
run goes on. Rows are appended to ``benchmarks/results/moe_layer.{jsonl,csv}``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):  # run as `python benchmarks/bench_moe_layer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MOE_CONFIGS, base_parser, dtype_name, error_note, finish, free_memory, measure, start,
    tflops, triton_skip_reason
)
# moe_vlm.model.experts pulls only torch-level modules of moe_vlm (no Hydra/OmegaConf/datasets)
from moe_vlm.model.dispatch import routed_experts  # noqa: E402
from moe_vlm.model.experts import grouped_mm_supported  # noqa: E402
from triton_kernels.inputs import flat_assignments, make_moe  # noqa: E402

IMPLS = ("torch", "grouped_mm", "triton", "dense_chain", "sonicmoe", "megablocks")
PEERS = {"sonicmoe": "sonicmoe", "megablocks": "megablocks"}  # impl -> module to import
GRANULARITIES = (1, 2, 4, 8, 16)


@dataclasses.dataclass
class Impl:
    """What ``measure`` times for one impl. ``fwd`` returns y [T, D] (or [N, D] for the
    dense chain, with ``dy`` to match); ``leaves`` get their grads dropped per call."""

    fwd: Callable[[], Tensor]
    dy: Tensor
    leaves: list[Tensor]
    fwd_nograd: Optional[Callable[[], Tensor]] = None
    note: str = ""
    check: bool = False  # compare the forward against the reference output


def granular(cfg: tuple[int, int, int, int, int], m: int) -> tuple[tuple[int, ...] | None, str]:
    """(D, F/m, E*m, K*m, T) at granularity m, or None and why it is skipped."""
    d, f, e, k, t = cfg
    if f % m:
        return None, f"F={f} not divisible by m={m}"
    if f // m < 16:
        return None, f"F/m = {f // m} < 16"
    if k * m > e * m:
        return None, f"K*m = {k * m} > E*m = {e * m}"
    return (d, f // m, e * m, k * m, t), ""


# ----------------------------------------------------------------------------- peers

def peer_skip_reason(impl: str, skew: str, device: torch.device) -> Optional[str]:
    module = PEERS[impl]
    if importlib.util.find_spec(module) is None:
        return f"skipped: {module} not installed"
    if device.type != "cuda":
        return f"skipped: {module} needs CUDA"
    if skew != "uniform":
        return f"skipped: {module} runs its own router; skew {skew!r} cannot be imposed"
    return None


def build_sonicmoe(d: int, f: int, e: int, k: int, x: Tensor, dy: Tensor) -> Impl:
    """SonicMoE 0.1.x: ``MoE(E, K, D, F, SWIGLU)``, ``forward(x) -> (y, aux_loss)``."""
    from sonicmoe import MoE
    from sonicmoe.enums import ActivationType

    mod = MoE(e, k, d, f, ActivationType.SWIGLU, add_bias=False, std=0.02).to(x.device, x.dtype)
    return Impl(fwd=lambda: mod(x)[0], dy=dy, leaves=[x, *mod.parameters()],
                fwd_nograd=lambda: mod(x, is_inference_mode=True)[0],
                note="own router (router timed, not counted); first call JIT-compiles")


def build_megablocks(d: int, f: int, e: int, k: int, x: Tensor, dy: Tensor) -> Impl:
    """MegaBlocks dMoE (dropless) with a GLU expert (``activation_fn=silu``: SwiGLU).
    Tries ``mlp_impl='grouped'`` (needs the grouped_gemm package), then ``'sparse'``
    (needs stk); only the ``Arguments`` fields this version has are passed."""
    from megablocks.layers import dmoe
    from megablocks.layers.arguments import Arguments

    fields = {fl.name for fl in dataclasses.fields(Arguments)}
    if "mlp_type" not in fields:
        raise RuntimeError("this megablocks has no mlp_type (no GLU experts): not comparable")
    want: dict[str, Any] = dict(
        hidden_size=d, ffn_hidden_size=f, moe_num_experts=e, moe_top_k=k, bias=False,
        return_bias=False, mlp_type="glu", activation_fn=F.silu,
        fp16=x.dtype == torch.float16, bf16=x.dtype == torch.bfloat16, device=x.device,
        moe_normalize_expert_weights=1, moe_loss_weight=0.0,  # weights sum to 1; no aux loss kept
    )
    errors = []
    for mlp_impl in ("grouped", "sparse"):
        try:
            args = Arguments(**{n: v for n, v in {**want, "mlp_impl": mlp_impl}.items() if n in fields})
            mod = dmoe.dMoE(args).to(x.device, x.dtype)
            x3 = x.view(x.shape[0], 1, x.shape[1])  # [T, 1, D]: megablocks takes [S, B, D]

            def fwd(mod=mod, x3=x3) -> Tensor:
                out = mod(x3)
                out = out[0] if isinstance(out, tuple) else out
                return out.reshape(x.shape)  # [T, D]

            fwd()  # fail here, not inside the timing, if this mlp_impl cannot run
            return Impl(fwd=fwd, dy=dy, leaves=[x, *mod.parameters()],
                        note=f"own router (router timed, not counted); dMoE glu/{mlp_impl}")
        except Exception as exc:  # noqa: BLE001 - try the next mlp_impl
            errors.append(f"{mlp_impl}: {error_note(exc, 120)}")
    raise RuntimeError("; ".join(errors))


# ----------------------------------------------------------------------------- one config

def run_config(name: str, cfg: tuple[int, ...], m: int, skew: str, dtype: torch.dtype,
               device: torch.device, reps: int, impls: list[str]) -> list[dict[str, Any]]:
    """Every selected impl on one (D, F, E, K, T), routing skew and granularity m."""
    d, f, e, k, t = cfg
    p = make_moe(t, d, f, e, k, skew, dtype, device, seed=0, requires_grad=True)
    x, w_in, w_out, dy = p["x"], p["w_in"], p["w_out"], p["dy"]  # [T,D] [E,D,2F] [E,F,D] [T,D]
    tok, exp, wgt = flat_assignments(p["experts"], p["weights"])  # [N] each
    leaves = [x, w_in, w_out, p["weights"]]

    def backend(bname: str) -> Impl:
        return Impl(fwd=lambda: routed_experts(x, tok, exp, wgt, w_in, w_out, bname), dy=dy,
                    leaves=leaves,
                    check=True, note="one host sync per expert" if bname == "torch" else "")

    def dense() -> Impl:  # one SwiGLU chain on T*K rows: same active FLOPs, no routing
        w1 = w_in[0].detach().clone().requires_grad_()  # [D, 2F]
        w2 = w_out[0].detach().clone().requires_grad_()  # [F, D]

        def fwd() -> Tensor:
            gate, up = (x.repeat(k, 1) @ w1).chunk(2, dim=-1)  # [N, F] each
            return (F.silu(gate) * up) @ w2  # [N, D]
        return Impl(fwd=fwd, dy=dy.repeat(k, 1), leaves=[x, w1, w2], note="no routing/permute")

    gmm_why = grouped_mm_supported(device, dtype, d, f)
    skip: dict[str, Optional[str]] = {
        "grouped_mm": f"skipped: {gmm_why}" if gmm_why else None,
        "triton": triton_skip_reason(device),
        **{peer: peer_skip_reason(peer, skew, device) for peer in PEERS},
    }
    builders: dict[str, Callable[[], Impl]] = {
        "torch": lambda: backend("torch"), "grouped_mm": lambda: backend("grouped_mm"),
        "triton": lambda: backend("triton"), "dense_chain": dense,
        "sonicmoe": lambda: build_sonicmoe(d, f, e, k, x, dy),
        "megablocks": lambda: build_megablocks(d, f, e, k, x, dy),
    }
    ref_impl = "grouped_mm" if not skip["grouped_mm"] and "grouped_mm" in impls else "torch"
    flop = 2 * 3 * d * f * t * k
    base = {"config": name, "skew": skew, "m": m, "dtype": dtype_name(dtype),
            "D": d, "F": f, "E": e, "K": k, "T": t}
    rows, ref = [], None
    # the reference impl goes first so the others can be checked against it
    for impl in sorted(impls, key=lambda i: i != ref_impl):
        row: dict[str, Any] = {**base, "impl": impl, "note": ""}
        if skip.get(impl):
            print(f"    {impl}: {skip[impl]}", flush=True)
            rows.append({**row, "note": skip[impl]})
            continue
        t0 = time.perf_counter()
        try:
            spec = builders[impl]()
            row["note"] = spec.note
            if spec.check:
                with torch.no_grad():
                    y = spec.fwd().float()  # [T, D]
                if impl == ref_impl:
                    ref = y
                elif ref is not None:
                    row["rel_err"] = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()  # sync
                del y
            row.update(measure(spec.fwd, spec.dy, spec.leaves, device, reps, spec.fwd_nograd))
            row["fwd_tflops"] = tflops(flop, row["fwd_ms"])
            row["fwdbwd_tflops"] = tflops(3 * flop, row["fwdbwd_ms"])
            del spec
            print(f"    {impl}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwdbwd_ms']:.3f} ms "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failing impl never aborts the run
            row["note"] = f"skipped: {error_note(exc)}"
            print(f"    {impl}: {row['note']}", flush=True)
        for leaf in leaves:
            leaf.grad = None
        rows.append(row)
        free_memory(device)
    del p, x, w_in, w_out, dy, tok, exp, wgt, leaves, ref
    free_memory(device)
    return sorted(rows, key=lambda r: impls.index(r["impl"]))


COLUMNS = [
    ("config", "config"), ("skew", "skew"), ("m", "m"), ("impl", "impl"),
    ("fwd_ms", "fwd ms"), ("fwd_tflops", "fwd TFLOP/s"),
    ("fwdbwd_ms", "f+b ms"), ("fwdbwd_tflops", "f+b TFLOP/s"),
    ("vs_grouped_mm_fwd", "fwd x grouped_mm"), ("vs_grouped_mm_fwdbwd", "f+b x grouped_mm"),
    ("peak_extra_gib", "peak extra GiB (f+b)"), ("rel_err", "rel err"), ("note", "note"),
]


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0], MOE_CONFIGS)
    ap.add_argument("--granularity", nargs="*", type=int, default=None, metavar="M",
                    help=f"sweep expert granularity m (default {' '.join(map(str, GRANULARITIES))}) "
                         "on the base config(s)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    args = ap.parse_args()
    device, dtype, configs, meta = start(args)
    if args.granularity is not None:
        ms = args.granularity or list(GRANULARITIES)
        configs = args.configs or ["olmoe-1b-7b" if device.type == "cuda" else "cpu-small"]
    else:
        ms = [1]
    rows: list[dict[str, Any]] = []
    for name in configs:
        for m in ms:
            cfg, why = granular(MOE_CONFIGS[name], m)
            if cfg is None:
                print(f"  {name} m={m}: skipped ({why})", flush=True)
                continue
            for skew in args.skew:
                print(f"  {name} m={m} {skew}: D={cfg[0]} F={cfg[1]} E={cfg[2]} K={cfg[3]} "
                      f"T={cfg[4]}", flush=True)
                rows += run_config(name, cfg, m, skew, dtype, device, args.reps, args.impls)
    finish(rows, "moe_layer", args, meta, "grouped_mm", ["config", "skew", "m"], COLUMNS,
           "Active TFLOP/s: forward 2*3*D*F*T*K, forward+backward 3x (router FLOPs of peers "
           "not counted). 'x grouped_mm' = grouped_mm time / this time (same run).")


if __name__ == "__main__":
    main()
