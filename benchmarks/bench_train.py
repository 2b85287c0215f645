"""A whole training step (forward, backward, AdamW) of our decoder beside Hugging Face
transformers' Qwen3-MoE with the same shape and the same weights, in one run.

Legend: B batch, S sequence, D model width, L layers, E experts, K experts per token,
F expert width, V vocabulary.

Our model is built from the config dataclasses (no Hydra), exported with our HF export
(``moe_vlm.upcycling.hf.export_hf``) and loaded by ``transformers`` (``Qwen3MoeForCausalLM``),
so both sides start from identical weights; their logits are compared in fp32 on a short
input **before** anything is timed (the run stops if they differ). Then, per variant,
``--warmup`` steps (Triton autotuning and compilation happen there) and ``--steps`` timed
steps on random token ids:

- ``ours/<backend>/amp``: how ``moe-vlm train`` runs on CUDA: fp32 master weights, bf16
  autocast, AdamW (fused where the device has it);
- ``ours/<backend>/bf16``: bf16 weights and AdamW, like the HF anchor (same bytes per weight);
- ``hf/<impl>``: transformers' Qwen3-MoE, bf16 weights, each ``experts_implementation`` that
  version offers (``eager``: the per-expert loop; ``grouped_mm``; ``batched_mm``);
- ``ours/<backend>/compiled`` (``--compile``): each decoder block ``torch.compile``d (regional),
  by ``moe_vlm.parallel.parallelize.apply_compile`` as ``parallel.compile=true`` does;
- ``ours/<backend>/ac-<mode>`` (``--checkpointing moe full``): in the run's precision with
  ``parallel.activation_checkpointing=<mode>`` (the routed experts' compute, or whole
  blocks, recomputed in the backward: compare the peak memory).

On CPU everything runs in fp32 (bf16 rows are skipped) at a small shape.

Reported: ms per step, tokens/s, TFLOP/s and MFU from the same FLOP count for every row
(``6 * active params * tokens + 6 * L * D * S * tokens`` for causal attention, as
``../shared/bench/hf_e2e_bench.py`` counts them; the LM head is included), the peak memory
of a step, and the speed-up over the HF row named by ``--baseline``. MFU is against a dense
GEMM measured in the same run (bf16 8192^3 on CUDA, fp32 1024^3 on CPU), printed in the header.

    python benchmarks/bench_train.py                       # CPU: small shape, fp32
    python benchmarks/bench_train.py --shape anchor        # CUDA: the PERF.md end-to-end anchor

Rows are appended to ``benchmarks/results/train.{jsonl,csv}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

if __package__ in (None, ""):  # run as `python benchmarks/bench_train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR, error_note, free_memory, print_header, print_table, run_metadata, save_rows
)
from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig  # noqa: E402
from moe_vlm.model.decoder import build_model  # noqa: E402

# (B, S, D, L, heads, kv heads, head_dim, E, K, F, V)
SHAPES: dict[str, tuple[int, ...]] = {
    "anchor": (8, 2048, 1024, 8, 16, 4, 64, 64, 8, 512, 32000),  # PERF.md / hf_e2e_bench.py
    "cpu-small": (4, 128, 128, 2, 4, 2, 32, 8, 2, 64, 1024),
}
BACKENDS = ("torch", "grouped_mm", "triton")
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def configs(shape: str, backend: str) -> tuple[ModelConfig, MoEConfig, RoutingConfig]:
    """Our config for a Qwen3-MoE of ``shape``: q/k norm, untied head, softmax top-k with
    renormalised weights, aux loss 0.01, every layer MoE, no shared expert, dropless."""
    b, s, d, n_layers, h, kv, hd, e, k, f, v = SHAPES[shape]
    model = ModelConfig(name=shape, vocab_size=v, d_model=d, n_layers=n_layers, n_heads=h,
                        n_kv_heads=kv, head_dim=hd, d_ff=4 * d, max_seq_len=s, qk_norm=True,
                        tie_embeddings=False, rope_theta=10000.0, norm_eps=1e-6)
    moe = MoEConfig(n_experts=e, n_shared=0, d_expert=f, granularity=1, backend=backend)
    routing = RoutingConfig(name="qwen3_moe", gate="softmax_topk", top_k=k, renormalize=True,
                            aux_loss_coef=0.01, z_loss_coef=0.0)
    return model, moe, routing


def step_flops(shape: str) -> float:
    """Active FLOPs of one training step, counted as the HF anchor script counts them."""
    b, s, d, n_layers, h, kv, hd, e, k, f, v = SHAPES[shape]
    attn = d * h * hd * 2 + d * kv * hd * 2
    moe = k * 3 * d * f + d * e
    active = n_layers * (attn + moe) + d * v
    tokens = b * s
    return 6.0 * active * tokens + 6.0 * n_layers * d * s * tokens


def gemm_peak(device: torch.device) -> float:
    """FLOP/s of one dense GEMM measured now: the MFU denominator."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timed(lambda: a @ b, device, warmup=3, steps=10)
    return 2.0 * n ** 3 / (ms * 1e-3)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Mean milliseconds per call after ``warmup`` calls (a training step changes the
    weights, so each call is one real step; the mean is over ``steps`` back-to-back calls)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def ours_labels(ids: torch.Tensor) -> torch.Tensor:
    """Our forward takes next-token targets already shifted (HF shifts ``labels=ids`` inside)."""
    labels = torch.full_like(ids, -100)  # [B, S]
    labels[:, :-1] = ids[:, 1:]
    return labels


def hf_model(src: Path, impl: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    kw: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": dtype}
    if impl != "eager":
        kw["experts_implementation"] = impl
    m = AutoModelForCausalLM.from_pretrained(str(src), **kw).to(device)
    m.config.output_router_logits = True  # the aux loss, as ours computes it
    return m.train()


def check_logits(ours: torch.nn.Module, src: Path, shape: str, device: torch.device) -> float:
    """Relative error of HF's fp32 logits against ours on a short input; raises if they differ."""
    v = SHAPES[shape][-1]
    ids = torch.randint(0, v, (2, 64), device=device, generator=None)
    hf = hf_model(src, "eager", torch.float32, device).eval()
    with torch.no_grad():
        a = ours.eval()(ids).logits.float()
        b = hf(input_ids=ids).logits.float()
    ours.train()
    rel = ((a - b).norm() / b.norm()).item()
    del hf
    free_memory(device)
    if not rel < 1e-4:
        raise SystemExit(f"bench_train: our logits and transformers' differ (relative error "
                         f"{rel:.2e}); not timing models that compute different functions")
    return rel


def optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)


def ours_step(model: torch.nn.Module, ids: torch.Tensor, amp: Optional[torch.dtype],
              device: torch.device) -> Callable[[], None]:
    labels = ours_labels(ids)
    opt = optimizer(model, device)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

    def step() -> None:
        with ctx():
            loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_step(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> Callable[[], None]:
    opt = optimizer(model, device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure_row(name: str, make: Callable[[], Callable[[], None]], device: torch.device,
                args: argparse.Namespace, flops: float, peak: float, tokens: int) -> dict[str, Any]:
    row: dict[str, Any] = {"impl": name, "shape": args.shape}
    try:
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = make()
        t_first = time.perf_counter()
        step()  # first step alone: autotuning / compilation time, reported separately
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["first_step_s"] = time.perf_counter() - t_first
        ms = timed(step, device, args.warmup, args.steps)
        row.update(ms_per_step=ms, tokens_per_s=tokens / (ms * 1e-3),
                   tflops=flops / (ms * 1e-3) / 1e12, mfu=flops / (ms * 1e-3) / peak)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as e:  # noqa: BLE001 - a failing variant is a row, the run goes on
        row["note"] = error_note(e)
    print(f"  {name:28s} " + (f"{row['ms_per_step']:9.1f} ms/step  MFU {100 * row['mfu']:5.1f}%"
                              if "ms_per_step" in row else row["note"]), flush=True)
    free_memory(device)
    return row


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default=None,
                    help="default: anchor on CUDA, cpu-small on CPU")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                    help="our expert backends (default: all that run here; triton on CUDA or "
                         "under TRITON_INTERPRET=1)")
    ap.add_argument("--hf-impls", nargs="*", choices=HF_IMPLS, default=list(HF_IMPLS))
    ap.add_argument("--compile", action="store_true", help="also time ours with each block compiled")
    ap.add_argument("--checkpointing", nargs="*", choices=["moe", "full"], default=[],
                    help="also time ours with these activation checkpointing modes")
    ap.add_argument("--baseline", default="hf/grouped_mm", help="row the speed-ups are against")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = args.shape or ("anchor" if device.type == "cuda" else "cpu-small")
    interp = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    backends = args.backends or [b for b in BACKENDS if b != "triton" or device.type == "cuda" or interp]
    meta = run_metadata(device)
    print_header(meta, torch.bfloat16 if device.type == "cuda" else torch.float32)
    peak = gemm_peak(device)
    b, s = SHAPES[args.shape][:2]
    tokens, flops = b * s, step_flops(args.shape)
    print(f"shape {args.shape}: B={b} S={s} tokens/step={tokens}  active step TFLOP "
          f"{flops / 1e12:.2f}  measured GEMM peak {peak / 1e12:.1f} TFLOP/s", flush=True)

    torch.manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape][-1], (b, s), device=device)  # [B, S]
    model_cfg, moe_cfg, routing_cfg = configs(args.shape, backends[0])
    src_model = build_model(model_cfg, moe_cfg, routing_cfg, device="cpu", seed=0)
    state = {k: v.detach().clone() for k, v in src_model.state_dict().items()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        from moe_vlm.upcycling.hf import export_hf
        src = export_hf(state, model_cfg, moe_cfg, routing_cfg, Path(tmp) / "hf")
        rel = check_logits(src_model.to(device), src, args.shape, device)
        print(f"logits: ours vs transformers (fp32, same weights) relative error {rel:.1e}", flush=True)
        del src_model
        free_memory(device)

        def ours(backend: str, dtype: torch.dtype, amp: Optional[torch.dtype], compiled: bool,
                 ac: str = "none"):
            def make() -> Callable[[], None]:
                cfgs = configs(args.shape, backend)
                m = build_model(*cfgs, device=device, seed=0)
                m.load_state_dict(state)
                m.to(dtype)
                if ac != "none":  # as parallel.activation_checkpointing does
                    from moe_vlm.parallel.parallelize import apply_activation_checkpointing
                    apply_activation_checkpointing(m, ac)
                if compiled:  # as parallel.compile does (refuses what does not trace)
                    from moe_vlm.parallel.parallelize import apply_compile
                    apply_compile(m, amp)
                return ours_step(m.train(), ids, amp, device)
            return make

        cuda = device.type == "cuda"
        variants: list[tuple[str, Callable[[], Callable[[], None]]]] = []
        for be in backends:
            if cuda:
                variants.append((f"ours/{be}/amp", ours(be, torch.float32, torch.bfloat16, False)))
                variants.append((f"ours/{be}/bf16", ours(be, torch.bfloat16, None, False)))
            else:
                variants.append((f"ours/{be}/fp32", ours(be, torch.float32, None, False)))
            if args.compile:
                dt, amp = (torch.bfloat16, None) if cuda else (torch.float32, None)
                variants.append((f"ours/{be}/compiled", ours(be, dt, amp, True)))
            for mode in args.checkpointing:
                amp = torch.bfloat16 if cuda else None
                variants.append((f"ours/{be}/ac-{mode}", ours(be, torch.float32, amp, False, mode)))
        for impl in args.hf_impls:
            dt = torch.bfloat16 if cuda else torch.float32
            variants.append((f"hf/{impl}", lambda impl=impl, dt=dt: hf_step(
                hf_model(src, impl, dt, device), ids, device)))
        for name, make in variants:
            rows.append(measure_row(name, make, device, args, flops, peak, tokens))

    base = next((r for r in rows if r["impl"] == args.baseline and r.get("ms_per_step")), None)
    for r in rows:
        r["logits_rel_err"] = rel
        r["gemm_peak_tflops"] = peak / 1e12
        r[f"vs_{args.baseline}"] = (base["ms_per_step"] / r["ms_per_step"]
                                    if base and r.get("ms_per_step") else None)
    print_table(rows, ["impl", ("ms_per_step", "ms/step"), ("tokens_per_s", "tokens/s"),
                       ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_gib", "peak GiB"),
                       ("first_step_s", "first step s"), (f"vs_{args.baseline}", "vs " + args.baseline),
                       "note"])
    save_rows(rows, "train", args.out_dir, {**meta, "shape_dims": list(SHAPES[args.shape]),
                                            "warmup": args.warmup, "steps": args.steps})
    return rows


if __name__ == "__main__":
    main()
