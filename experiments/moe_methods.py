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
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moe_vlm.analysis.paired import mean_std, paired_cell
from moe_vlm.atomic import atomic_write

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


def _train(name: str, *overrides: str, steps: Optional[int] = None) -> Stage:
    return Stage(name, "train", tuple(overrides), steps)


STUDIES: dict[str, Study] = {}


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


def run_stage(stage: Stage, d: Path, dirs: dict[str, Path], seed: int, steps: int) -> None:
    """Run one stage into ``d`` unless it finished before; raise when it fails."""
    if _finished(stage, d):
        return
    args = [_sub(a, dirs, seed) for a in stage.args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if stage.kind in ("train", "torchrun"):
        args += [f"seed={seed}", f"data.seed={1234 + seed}", f"run.dir={d}",
                 f"train.max_steps={stage.steps or steps}", "train.progress=false"]
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


def measure(run_dir: Path, study: Study) -> dict[str, Any]:
    """The last evaluation of a finished run (and the study's summary keys)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    last = [r for r in rows if "eval_loss" in r][-1]
    out: dict[str, Any] = {"steps": summary["steps"], "eval_loss": last["eval_loss"]}
    if study.vlm:
        out["eval_accuracy"] = last.get("eval_accuracy")
        out["chance_accuracy"] = summary.get("chance_accuracy")
    for key in study.extra:
        value: Any = summary
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
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
            results.append({"study": name, "arm": arm, "seed": seed,
                            **measure(dirs[stages[-1].name], study)})
    return results


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
        cells += [mean_std(col(k)) for k in study.extra]
        lines.append("| " + " | ".join(cells) + " |")
    if study.note:
        lines += ["", study.note]
    return "\n".join(lines) + "\n"


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
