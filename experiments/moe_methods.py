"""CPU ablations of the MoE training methods (README "MoE methods"): each method against
its baseline over seeds, every arm a pipeline of stages (dense pre-training, growth,
branches, merges, upcycling, the MoE run), each stage one ``moe-vlm`` command.

    python experiments/moe_methods.py                       # every study, seeds 0 1 2
    python experiments/moe_methods.py --studies rmoe mote --seeds 0 1 2
    python experiments/moe_methods.py --list                # the studies, arms and stages

A stage runs in ``--runs/<study>/seed<S>/<stage>``; stages of one seed with the same name
are shared by the arms of a study (the dense checkpoint two arms upcycle from is trained
once), and a finished stage is not run again (a train stage: its summary says completed;
a command stage: the runner's ``.done`` mark), so an interrupted sweep resumes. Every run
of seed S uses ``seed=S data.seed=1234+S``, so the arms of a seed see the same data and
the same held-out set; the table compares each arm with the study's baseline by the
paired (same-seed) difference, marked * when beyond seed noise (95% t-test).

Writes ``--out``.md (one table per study) and ``--out``.json (every arm's numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moe_vlm.analysis.paired import mean_std, paired_cell
from moe_vlm.atomic import atomic_write
from moe_vlm.data.synthetic_vlm import OLD_DEFAULT_JOB

TEXT = ["vision=none", "data=synthetic_text"]  # the text-only tiny jobs


@dataclass(frozen=True)
class Stage:
    """One ``moe-vlm`` command of a pipeline. ``args`` may name earlier stages' run
    directories as ``{stage}`` and the seed as ``{seed}`` / ``{data_seed}``.
    ``kind``: ``train`` (Hydra overrides; the run dir, seeds and step count are added),
    ``torchrun`` (the same under ``torchrun --nproc-per-node=nproc``), or any other
    ``moe-vlm`` command (``grow``, ``btx``, ``upcycle``), given ``--out`` the stage's dir."""

    name: str
    kind: str
    args: tuple[str, ...]
    steps: Optional[int] = None  # train/torchrun: train.max_steps (None: the study's)
    nproc: int = 2
    seed_offset: int = 0  # train/torchrun: seed=S+offset (data.seed stays 1234+S)


@dataclass(frozen=True)
class Study:
    """Arms (name -> stages, the last one measured) compared with ``baseline``."""

    title: str
    source: str  # the paper or system the method comes from
    baseline: str
    arms: dict[str, tuple[Stage, ...]]
    steps: int  # the measured stage's train.max_steps unless a stage sets its own
    vlm: bool = True  # report held-out accuracy (the synthetic VLM's questions)
    note: str = ""
    extra: tuple[str, ...] = ()  # summary.json keys to report per arm (numbers)


def _train(name: str, *overrides: str, steps: Optional[int] = None, seed_offset: int = 0) -> Stage:
    return Stage(name, "train", tuple(overrides), steps, seed_offset=seed_offset)


def _cmd(name: str, command: str, *args: str) -> Stage:
    return Stage(name, command, tuple(args))


STUDIES: dict[str, Study] = {}

# RMoE: the default job with its routers reading a GRU state carried across MoE layers
STUDIES["rmoe"] = Study(
    title="Layerwise recurrent router", source="RMoE, Qiu et al. 2024, arXiv 2408.06793",
    baseline="default", steps=1000,
    arms={"default": (_train("default"),), "rmoe": (_train("rmoe", "experiment=rmoe"),)},
    extra=("params_active",),
    note="The default VLM job as it was before issue 19 (1000 steps, no curriculum, one "
         "learning rate; the script pins it). `experiment=rmoe`: R=32 (projection and GRU "
         "state); it adds 3% active parameters and 7.5% FLOPs per token.")

# MoTE: every arm upcycles one dense VLM (the default job, dense) around its FFN as a frozen
# shared expert; fp_e2 and mote_e20 hold equal routed-expert bytes (bf16 vs 1.58 bit)
_DENSE_VLM = _train("dense", "model.moe_every=0", steps=600)
_MOTE = ("experiment=mote", "upcycle.source={dense}")
STUDIES["mote"] = Study(
    title="Ternary vs full-precision routed experts at equal expert memory",
    source="MoTE, Wang et al. 2025, arXiv 2506.14435", baseline="fp_e2", steps=400,
    arms={"fp_e2": (_DENSE_VLM, _train("fp_e2", *_MOTE, "moe.ternary=false", "moe.n_experts=2")),
          "mote_e20": (_DENSE_VLM, _train("mote_e20", *_MOTE, "moe.n_experts=20")),
          "mote_e2": (_DENSE_VLM, _train("mote_e2", *_MOTE, "moe.n_experts=2")),
          "fp_e20": (_DENSE_VLM, _train("fp_e20", *_MOTE, "moe.ternary=false", "moe.n_experts=20"))},
    extra=("expert_bytes",),
    note="The default VLM job made dense (600 steps), then each arm 400 steps from it "
         "(`experiment=mote`: top-1, the dense FFN as a frozen shared expert, routers and "
         "routed experts trained). `expert_bytes`: routed experts as stored (bf16, or log2(3) "
         "bits plus a bf16 scale per expert matrix) plus the shared expert at bf16; fp_e2 and "
         "mote_e20 are the equal-memory pair, mote_e2 and fp_e20 the equal-count ones.")

# LSH-MoE: one process with the micro-batch of one of 2 EP ranks buckets exactly as
# `torchrun --nproc-per-node=2 ... parallel.ep=2` does (buckets form per process)
_LSH = ("train.micro_batch_size=8",)
STUDIES["lsh"] = Study(
    title="LSH-compressed all-to-all: loss cost of sending bucket centroids",
    source="LSH-MoE, Nie et al., NeurIPS 2024", baseline="exact", steps=500,
    arms={"exact": (_train("exact", *_LSH),),
          "lsh_2x4": (_train("lsh_2x4", *_LSH, "experiment=lsh_moe"),),
          "lsh_2x4_nocomp": (_train("lsh_2x4_nocomp", *_LSH, "experiment=lsh_moe",
                                    "parallel.lsh_compensate=false"),),
          "lsh_4x8_nocomp": (_train("lsh_4x8_nocomp", *_LSH, "experiment=lsh_moe",
                                    "parallel.lsh_hashes=4", "parallel.lsh_dim=8",
                                    "parallel.lsh_compensate=false"),)},
    extra=("lsh_compression",),
    note="The default VLM job with micro-batches of 8 (what each of 2 expert-parallel ranks "
         "buckets); evaluation runs the exact layer. `lsh_compression`: rows sent / rows "
         "without LSH, mean over the run's logging steps. `_2x4`: 2 cross-polytope hashes of "
         "4 dimensions; `nocomp`: without the residual compensation.")

# Router replay: the default job trained on the routing recorded from another init (seed
# S+100, same data) against free routing; the spread over seeds says how much of the
# seed-to-seed noise the routing carries
STUDIES["replay"] = Study(
    title="Router replay: training on another run's recorded routing",
    source="Megatron-Core router replay", baseline="free", steps=500,
    arms={"free": (_train("free"),),
          "replay": (_train("record", "routing.replay=record", "routing.replay_path={record}_routing",
                            seed_offset=100),
                     _train("replay", "routing.replay=replay", "routing.replay_path={record}_routing"))},
    extra=("final_train_loss",),
    note="The default VLM job. replay: each seed S trains with the experts chosen in a run of "
         "seed S+100 on the same data (`routing.replay=record`, then `replay`): only which "
         "experts each token reaches is fixed; the weights and the balance loss stay this "
         "run's. Evaluation routes freely, i.e. by a router that never chose during training, "
         "so a replayed run's eval loss measures that mismatch; `final_train_loss` (the last "
         "logged step's batch, the same batch in both arms of a seed) is the controlled one.")

# Grow then upcycle (AquilaMoE's scale-up, then scale-out), text-only tiny models: the
# 64-wide dense model grown to 128 (exact, bert2BERT FPI) against a 128-wide one from scratch
_BIG = ("model.d_model=128", "model.d_ff=512", "model.n_heads=8", "model.n_kv_heads=4")
_MOE = ("experiment=upcycle_ablation", *_BIG, "moe.d_expert=512")
STUDIES["grow"] = Study(
    title="Scale up (grow a small dense model) then scale out (upcycle) vs the large dense model",
    source="AquilaMoE EfficientScale, arXiv 2408.06567; bert2BERT FPI", baseline="big_dense",
    steps=300, vlm=False,
    arms={"big_dense": (_train("b_dense", "experiment=upcycle_dense", *_BIG),
                        _train("b_moe", *_MOE, "upcycle.method=split", "upcycle.source={b_dense}")),
          "grown": (_train("a_small", "experiment=upcycle_dense", steps=150),
                    _cmd("a_grown", "grow", "--from", "{a_small}", *_BIG),
                    _train("a_dense", "experiment=upcycle_dense", *_BIG, "train.init_from={a_grown}",
                           steps=150),
                    _train("a_moe", *_MOE, "upcycle.method=split", "upcycle.source={a_dense}")),
          "moe_scratch": (_train("c_moe", *_MOE, "upcycle.method=none", steps=600),)},
    extra=("compute",),  # pipeline_compute
    note="Text-only. big_dense: the 128-wide dense model 300 steps, split-upcycled (16 experts "
         "of 128, top-4), 300 MoE steps. grown: the 64-wide model 150 steps, grown x2 in width "
         "(function-preserving), 150 dense steps, the same upcycling and MoE steps. moe_scratch: "
         "the MoE 600 steps from scratch. Equal tokens in every arm; `compute` (training FLOPs "
         "of the whole pipeline) shows what each arm spent.")

# Branch-Train-MiX vs sparse upcycling of the dense model trained on the same tokens
_MIX = ("experiment=dense_baseline", "vision=none", "data=mixture", "data.mixture.synthetic_vlm=0",
        "data.mixture.synthetic_text=0.5", "data.mixture.stdlib=0.5")
_BRANCH = ("experiment=dense_baseline", "vision=none", "data.seq_len=192", "train.init_from={seed_dense}")
_SEED = _train("seed_dense", *_MIX, steps=150)
STUDIES["btx"] = Study(
    title="Branch-Train-MiX vs sparse upcycling at equal tokens",
    source="BTX, Sukhbaatar et al. 2024, arXiv 2403.07816", baseline="upcycle",
    steps=200, vlm=False,
    arms={"upcycle": (_SEED, _train("dense_cont", *_MIX, "train.init_from={seed_dense}", steps=200),
                      _cmd("upcycled", "upcycle", "--from", "{dense_cont}", "--method", "copy",
                           "moe.n_experts=2", "routing.top_k=2", "moe.granularity=1",
                           "moe.n_shared=0", "routing.renormalize=true"),
                      _train("upcycle_mix", "experiment=btx", "train.init_from={upcycled}")),
          "btx": (_SEED, _train("branch_text", *_BRANCH, "data=synthetic_text", steps=100),
                  _train("branch_code", *_BRANCH, "data=stdlib", steps=100),
                  _cmd("btx_merged", "btx", "--from", "{branch_text}", "{branch_code}"),
                  _train("btx_mix", "experiment=btx", "train.init_from={btx_merged}"))},
    extra=("eval_loss_synthetic_text", "eval_loss_stdlib"),
    note="Text-only: a dense seed model (150 steps on a synthetic_text + stdlib mixture), then "
         "either two branches of 100 steps on one source each, merged (`moe-vlm btx`), or the "
         "seed continued 200 steps on the mixture and copy-upcycled; both MoEs (2 experts, "
         "top-2) train 200 steps on the mixture (`experiment=btx`).")


def _sub(text: str, dirs: dict[str, Path], seed: int) -> str:
    out = text.replace("{seed}", str(seed)).replace("{data_seed}", str(1234 + seed))
    for name, d in dirs.items():
        out = out.replace("{" + name + "}", str(d))
    return out


def _finished(stage: Stage, d: Path) -> bool:
    if stage.kind in ("train", "torchrun"):
        try:
            return json.loads((d / "summary.json").read_text()).get("status") == "completed"
        except (OSError, ValueError):
            return False
    return (d / ".done").exists()


OLD_DEFAULT = OLD_DEFAULT_JOB  # the default job as the recorded tables were made with


def run_stage(stage: Stage, d: Path, dirs: dict[str, Path], seed: int, steps: int) -> None:
    """Run one stage into ``d`` unless it finished before; raise when it fails."""
    if _finished(stage, d):
        return
    args = [_sub(a, dirs, seed) for a in stage.args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if stage.kind in ("train", "torchrun"):
        args += [f"seed={seed + stage.seed_offset}", f"data.seed={1234 + seed}", f"run.dir={d}",
                 f"train.max_steps={stage.steps or steps}", "train.progress=false",
                 *OLD_DEFAULT]
        if stage.kind == "train":
            cmd = [sys.executable, "-m", "moe_vlm.commands", "train", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={stage.nproc}", "-m", "moe_vlm.train", *args]
    else:
        cmd = [sys.executable, "-m", "moe_vlm.commands", stage.kind, *args, "--out", str(d)]
    d.parent.mkdir(parents=True, exist_ok=True)
    log = d.parent / f"{stage.name}.log"
    print(f"  {stage.name}: {' '.join(cmd[2:])}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"stage {stage.name} failed (exit {rc}); see {log}")
    if stage.kind not in ("train", "torchrun"):
        (d / ".done").write_text("")


# study keys that are per-step metrics of metrics.jsonl, reported as their mean
EXTRA_MEANS = {"lsh_compression": "lsh_compression"}


def measure(run_dir: Path, study: Study) -> dict[str, Any]:
    """The last evaluation of a finished run, and the study's extra keys: from that
    evaluation row, else ``summary.json``, or (``EXTRA_MEANS``) a metric's mean over the run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    last = [r for r in rows if "eval_loss" in r][-1]
    out: dict[str, Any] = {"steps": summary["steps"], "eval_loss": last["eval_loss"]}
    if study.vlm:
        out["eval_accuracy"] = last.get("eval_accuracy")
        out["chance_accuracy"] = summary.get("chance_accuracy")
    logged = [r[EXTRA_MEANS[k]] for k in study.extra if k in EXTRA_MEANS
              for r in rows if isinstance(r.get(EXTRA_MEANS[k]), (int, float))]
    for key in study.extra:
        value: Any = last.get(key, summary.get(key))
        if key in EXTRA_MEANS:  # a per-step metric: its mean over the logging steps
            value = sum(logged) / len(logged) if logged else None
        if isinstance(value, (int, float)):
            out[key] = value
    return out


def run_study(name: str, seeds: list[int], root: Path) -> list[dict[str, Any]]:
    study = STUDIES[name]
    results = []
    for seed in seeds:
        sroot = root / name / f"seed{seed}"
        dirs: dict[str, Path] = {}
        for arm, stages in study.arms.items():
            print(f"{name} / {arm} / seed {seed}", flush=True)
            for stage in stages:
                dirs[stage.name] = sroot / stage.name
                run_stage(stage, dirs[stage.name], dirs, seed, study.steps)
            row = {"study": name, "arm": arm, "seed": seed, **measure(dirs[stages[-1].name], study)}
            if "compute" in study.extra:
                row["compute"] = pipeline_compute([dirs[s.name] for s in stages
                                                   if s.kind in ("train", "torchrun")])
            results.append(row)
    return results


def pipeline_compute(run_dirs: list[Path]) -> float:
    """Training FLOPs of an arm's runs together: sum of flops_per_token x tokens_seen."""
    total = 0.0
    for d in run_dirs:
        s = json.loads((d / "summary.json").read_text())
        total += float(s["flops_per_token"]) * float(s["tokens_seen"])
    return total


def table(name: str, results: list[dict[str, Any]]) -> str:
    """One study's markdown table: mean ± std per arm and the paired difference from
    the baseline."""
    study = STUDIES[name]
    rows = [r for r in results if r["study"] == name]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by_arm = {a: [r for r in rows if r["arm"] == a] for a in arms}
    seeds = sorted({r["seed"] for r in rows})
    base = by_arm.get(study.baseline, [])
    head = ["arm", "eval loss", "Δ loss"] + (["accuracy", "Δ accuracy"] if study.vlm else [])
    head += list(study.extra)
    lines = [f"**{study.title}** ({study.source}). Seeds {seeds}; mean ± std over seeds; "
             f"Δ: paired (same seed) difference from `{study.baseline}`; * = beyond seed "
             "noise (95%).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        rs = by_arm[a]
        col = lambda k: [r[k] for r in rs if r.get(k) is not None]  # noqa: E731
        is_base = a == study.baseline
        cells = [a, mean_std(col("eval_loss")), "" if is_base else paired_cell(rs, base, "eval_loss")]
        if study.vlm:
            cells += [mean_std(col("eval_accuracy")),
                      "" if is_base else paired_cell(rs, base, "eval_accuracy")]
        for k in study.extra:  # losses also get their paired difference
            diff = "" if is_base or "loss" not in k else f" ({paired_cell(rs, base, k)})"
            cells.append(_extra_cell(col(k)) + diff)
        lines.append("| " + " | ".join(cells) + " |")
    if study.note:
        lines += ["", study.note]
    return "\n".join(lines) + "\n"


def _extra_cell(values: list[float]) -> str:
    """mean ± std, in scientific notation for large numbers (bytes, FLOPs)."""
    if values and max(abs(v) for v in values) >= 1e4:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3e} ± {sd:.1e}"
    return mean_std(values)


def describe() -> str:
    """Every study's arms and stages (``--list``)."""
    out = []
    for name, st in STUDIES.items():
        out.append(f"{name}: {st.title} ({st.source}); baseline {st.baseline}, {st.steps} steps")
        for arm, stages in st.arms.items():
            out.append(f"  {arm}:")
            out += [f"    {s.name} [{s.kind}] {' '.join(s.args)}"
                    + (f" (steps {s.steps})" if s.steps else "") for s in stages]
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", default="outputs/moe_methods", help="run directories")
    ap.add_argument("--out", default="experiments/results/moe_methods")
    ap.add_argument("--list", action="store_true", help="print the studies and exit")
    a = ap.parse_args(argv)
    if a.list:
        print(describe())
        return []
    out_json = Path(f"{a.out}.json")
    kept = []  # other studies' rows from an earlier call stay in the files
    if out_json.exists():
        kept = [r for r in json.loads(out_json.read_text()) if r["study"] not in a.studies]
    results = kept + [r for s in a.studies for r in run_study(s, a.seeds, Path(a.runs))]
    results = [r for r in results if r["study"] in STUDIES]
    md = "\n".join(table(s, results) for s in STUDIES if any(r["study"] == s for r in results))
    atomic_write(f"{a.out}.md", lambda f: f.write(md))
    atomic_write(str(out_json), lambda f: json.dump(results, f, indent=1))
    print(md)
    return results


if __name__ == "__main__":
    main()
