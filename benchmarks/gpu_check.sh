#!/usr/bin/env bash
# One prepared run on one CUDA GPU (sized for an H200 lent for a few minutes): does the
# training path work on the device, are the kernels right at real sizes, how fast are they.
#
#   bash benchmarks/gpu_check.sh            # from the repo root; GPU_CHECK_BUDGET=500 (seconds)
#
# Stages, most important first; each gets at most its own limit and what is left of the
# budget, and a failing stage is recorded and the run goes on:
#   1. train: 20 steps of the default job (the tiny VLM) on CUDA in bf16, one run per expert
#      backend (torch, grouped_mm, triton): a device bug shows in the first minute;
#   2. tests: the `gpu`-marked tests (kernels at real MoE sizes, forward and gradients);
#   3. bench_moe_layer: the routed-expert compute at the PERF.md shapes, ours beside
#      grouped_mm, the per-expert loop and the dense chain (SonicMoE when importable);
#   4. bench_train: a whole training step at the PERF.md end-to-end anchor shape, ours beside
#      transformers' Qwen3-MoE with the same weights;
#   5. bench_permute: permute and unpermute+combine against torch indexing (TB/s);
#   6. bench_train --compile: each block torch.compile'd (exploratory);
#   7. bench_train --checkpointing moe full: the step's time and peak memory with activation
#      checkpointing of the experts or of whole blocks.
# Everything lands in benchmarks/results/ (gpu_check/<stage>.log, and the benchmarks'
# .jsonl/.csv); with $OUT set, also $OUT/gpu_check.tar.gz and $OUT/summary.md.
# Missing Python packages (hydra-core, omegaconf, antlr4 on a bare GPU image) are installed
# from wheels in .whl/ when that folder exists (README: "GPU check").
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RES=$ROOT/benchmarks/results
LOGS=$RES/gpu_check
BUDGET=${GPU_CHECK_BUDGET:-500}
T0=$(date +%s)
SUMMARY=$LOGS/summary.md
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False); this script" \
         "needs one NVIDIA GPU. On a CPU use the benchmarks' CPU modes (README: Benchmarks)." >&2
    exit 2
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
if ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null; then
    echo "gpu_check.sh: hydra-core/omegaconf missing: put their wheels in .whl/ (README: GPU check)" >&2
    exit 2
fi

mkdir -p "$LOGS"
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
    echo '```'
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---:|"
} > "$SUMMARY"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# stage NAME LIMIT_S CMD...: run with min(limit, budget left) seconds; log; one summary row.
stage() {
    local name=$1 limit=$2; shift 2
    local rem; rem=$(left)
    if [ "$rem" -lt 15 ]; then
        echo "| $name | skipped: budget spent | 0 |" >> "$SUMMARY"; return
    fi
    [ "$limit" -gt "$rem" ] && limit=$rem
    echo "=== $name (limit ${limit}s, ${rem}s of budget left)"
    local t=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1; rc=$?
    local dt=$(( $(date +%s) - t )) status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timed out after ${limit}s"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
    echo "| $name | $status | $dt |" >> "$SUMMARY"
    tail -n 25 "$LOGS/$name.log"
}

RUNS=$(mktemp -d)
for be in torch grouped_mm triton; do
    limit=60; [ $be = triton ] && limit=150   # triton: first compilation and autotuning
    stage "train_$be" $limit "$PY" -m moe_vlm.commands train train.device=cuda train.precision=bf16 \
        moe.backend=$be train.max_steps=20 train.log_every=5 train.eval_every=10 \
        train.ckpt_every=20 train.progress=false run.dir="$RUNS/$be"
    [ -f "$RUNS/$be/summary.json" ] && cp "$RUNS/$be/summary.json" "$LOGS/train_${be}_summary.json"
    [ -f "$RUNS/$be/metrics.jsonl" ] && cp "$RUNS/$be/metrics.jsonl" "$LOGS/train_${be}_metrics.jsonl"
done
# Most of the tests' time is Triton compiling and autotuning (one test 43 s alone on the
# first run): with pytest-xdist, 4 workers compile side by side.
XDIST=""; "$PY" -c 'import xdist' 2>/dev/null && XDIST="-n 4"
stage tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider $XDIST tests --timeout 140
stage bench_moe_layer 120 "$PY" benchmarks/bench_moe_layer.py --skew uniform zipf --reps 3
stage bench_train 150 "$PY" benchmarks/bench_train.py --shape anchor --hf-impls eager grouped_mm
stage bench_permute 40 "$PY" benchmarks/bench_permute.py --reps 3
stage bench_train_compile 90 "$PY" benchmarks/bench_train.py --shape anchor --compile \
    --backends grouped_mm triton --hf-impls --warmup 2 --steps 5
stage bench_train_ac 60 "$PY" benchmarks/bench_train.py --shape anchor --checkpointing moe full \
    --backends triton --hf-impls --warmup 2 --steps 5

{
    echo
    for f in bench_moe_layer bench_train bench_permute bench_train_compile bench_train_ac; do
        [ -f "$LOGS/$f.log" ] || continue
        echo "## $f"; echo; grep '^|' "$LOGS/$f.log"; echo
    done
    echo "total $(( $(date +%s) - T0 )) s"
} >> "$SUMMARY"
cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/gpu_check.tar.gz" -C "$RES" . && cp "$SUMMARY" "$OUT/summary.md"
fi
