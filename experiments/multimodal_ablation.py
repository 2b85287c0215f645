"""Multimodal MoE methods against the default job, over seeds: held-out loss, accuracy by
question type, and how the experts' load splits by modality.

    python experiments/multimodal_ablation.py                           # every arm, seeds 0 1 2
    python experiments/multimodal_ablation.py --arms default unimoe --seeds 0 1 2 --steps 1000

Each (arm, seed) is one ``moe-vlm train`` run of the default job (synthetic image-text data,
the tiny MoE VLM) with the arm's overrides and ``seed=S data.seed=1234+S`` (so the arms of
one seed see the same data and the same held-out questions), in ``--runs/<arm>/seed<S>``; a
finished run is not trained again. The table compares each arm with ``default`` by the
paired (same-seed) difference: mean +- std over seeds, and whether it is beyond seed noise
(|mean| > t(0.975, n-1) * std / sqrt(n)).

Load by modality, per MoE layer, from the last logged step: ``overlap`` is
``sum_e min(p_image(e), p_text(e))`` of the two modalities' expert distributions (1: both
use the experts alike; 0: disjoint experts, as modality groups force), averaged over layers.

Writes ``--out``.md (the table) and ``--out``.json (every run's numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from moe_vlm.analysis.paired import mean_std, paired_cell
from moe_vlm.atomic import atomic_write
from moe_vlm.data.synthetic_vlm import OLD_DEFAULT_JOB, QUESTION_TYPES

ARMS: dict[str, list[str]] = {
    "default": [],
    "unimoe": ["experiment=unimoe"],  # modality expert groups
    "unimoe_routers": ["routing.modality=routers"],  # a router per modality
    "v2pe": ["experiment=v2pe"],
    "vit_moe": ["experiment=vit_moe"],
    "encoder_free": ["experiment=encoder_free"],
}


OLD_DEFAULT = OLD_DEFAULT_JOB  # the default job as the recorded tables were made with


def run_arm(arm: str, seed: int, steps: int, root: Path) -> dict[str, Any]:
    """Train (or read, if finished) one run; its final numbers."""
    from moe_vlm.config import load_config
    from moe_vlm.train import train
    from moe_vlm.train.rundir import read_jsonl

    run_dir = root / arm / f"seed{seed}"
    cfg = load_config([*ARMS[arm], f"seed={seed}", f"data.seed={1234 + seed}", *OLD_DEFAULT,
                       f"train.max_steps={steps}", "train.progress=false", f"run.dir={run_dir}"])
    summary = train(cfg, run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    last_eval = [r for r in rows if "eval_loss" in r][-1]
    routed = [r for r in rows if "routing" in r]
    out = {"arm": arm, "seed": seed, "steps": summary["steps"],
           "eval_loss": last_eval["eval_loss"], "eval_accuracy": last_eval.get("eval_accuracy"),
           "chance_accuracy": summary.get("chance_accuracy"),
           **{f"acc_{t}": last_eval.get(f"eval_accuracy_{t}") for t in QUESTION_TYPES}}
    if routed:
        out.update(modality_load(routed[-1]["routing"]))
    return out


def modality_load(routing: dict[str, dict]) -> dict[str, float]:
    """Mean over MoE layers of the image/text expert-distribution overlap and of the
    load imbalance (``max_violation``)."""
    overlaps, violations = [], []
    for layer in routing.values():
        violations.append(layer["max_violation"])
        img, txt = layer.get("tokens_per_expert_image"), layer.get("tokens_per_expert_text")
        if img and txt and sum(img) and sum(txt):
            overlaps.append(sum(min(a / sum(img), b / sum(txt)) for a, b in zip(img, txt)))
    out = {"max_violation": statistics.fmean(violations)} if violations else {}
    if overlaps:
        out["overlap"] = statistics.fmean(overlaps)
    return out


def table(results: list[dict]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in results))
    by_arm = {a: [r for r in results if r["arm"] == a] for a in arms}
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Seeds {seeds}, {results[0]['steps']} steps each; mean ± std over seeds. "
             "Δ: paired (same seed) difference from `default`; * = beyond seed noise (95%).", "",
             "| arm | eval loss | Δ loss | accuracy | Δ accuracy | "
             + " | ".join(QUESTION_TYPES) + " | image/text expert overlap | max violation |",
             "|---|---|---|---|---|" + "---|" * len(QUESTION_TYPES) + "---|---|"]
    base = by_arm.get("default", [])
    for a in arms:
        rows = by_arm[a]
        col = lambda k: [r[k] for r in rows if r.get(k) is not None]  # noqa: E731
        cells = [a, mean_std(col("eval_loss")), paired_cell(rows, base, "eval_loss") if a != "default" else "",
                 mean_std(col("eval_accuracy")),
                 paired_cell(rows, base, "eval_accuracy") if a != "default" else "",
                 *[mean_std(col(f"acc_{t}")) for t in QUESTION_TYPES],
                 mean_std(col("overlap")), mean_std(col("max_violation"))]
        lines.append("| " + " | ".join(cells) + " |")
    chance = [r["chance_accuracy"] for r in results if r.get("chance_accuracy")]
    if chance:
        lines += ["", f"Chance accuracy (uniform guessing per question type): {chance[0]:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000, help="the default job's length")
    ap.add_argument("--runs", default="outputs/multimodal_ablation", help="run directories")
    ap.add_argument("--out", default="experiments/results/multimodal_ablation")
    a = ap.parse_args(argv)
    if "default" not in a.arms:
        a.arms = ["default", *a.arms]
    results = [run_arm(arm, s, a.steps, Path(a.runs)) for arm in a.arms for s in a.seeds]
    md = table(results)
    atomic_write(f"{a.out}.md", lambda f: f.write(md))
    atomic_write(f"{a.out}.json", lambda f: json.dump(results, f, indent=1))
    print(md)
    return results


if __name__ == "__main__":
    main()
