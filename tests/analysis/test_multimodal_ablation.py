"""experiments/multimodal_ablation.py's summaries: the modality overlap of expert loads,
and the table's paired differences (seed noise marked only beyond it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ablation(experiment_script):
    return experiment_script("multimodal_ablation")


def test_overlap_of_expert_loads(ablation):
    same = {"layer_1": {"max_violation": 0.5, "tokens_per_expert_image": [1, 1, 2, 0],
                        "tokens_per_expert_text": [2, 2, 4, 0]}}
    disjoint = {"layer_1": {"max_violation": 1.0, "tokens_per_expert_image": [3, 0, 1, 0],
                            "tokens_per_expert_text": [0, 5, 0, 5]}}
    assert ablation.modality_load(same) == {"max_violation": 0.5, "overlap": pytest.approx(1.0)}
    assert ablation.modality_load(disjoint)["overlap"] == 0.0


def test_table_pairs_arms_by_seed(ablation):
    rows = []
    for seed, (base, arm) in enumerate([(2.0, 1.5), (2.2, 1.6), (1.9, 1.45)]):
        rows.append({"arm": "default", "seed": seed, "steps": 10, "eval_loss": base,
                     "eval_accuracy": 0.5})
        rows.append({"arm": "x", "seed": seed, "steps": 10, "eval_loss": arm,
                     "eval_accuracy": 0.5 + 0.01 * (seed - 1)})
    md = ablation.table(rows)
    x = next(line for line in md.splitlines() if line.startswith("| x |"))
    cells = [c.strip() for c in x.split("|")]
    assert cells[3].startswith("-0.517") and cells[3].endswith("*")  # beyond noise
    assert cells[5] == "+0.000 ± 0.010"  # no mean difference: not marked
