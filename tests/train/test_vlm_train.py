"""VLM training: staged freezing, init_from, modality routing metrics and the heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_vlm.analysis.modality import modality_load, plot_modality_heatmap
from moe_vlm.config import ConfigError, load_config
from moe_vlm.errors import UserError
from moe_vlm.train import train
from moe_vlm.train.rundir import read_jsonl

# The tower pre-training (data.vision_pretrain_steps) is tested in test_vision_pretrain.py
VLM_FAST = ["train.batch_size=4", "data.n_eval_samples=8", "train.progress=false",
            "data.vision_pretrain_steps=0",
            "train.warmup_steps=2", "train.eval_every=100", "train.log_every=1"]


def _cfg(run_dir: Path, *overrides: str):
    return load_config([*VLM_FAST, f"run.dir={run_dir}", *overrides])


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=False)["model"]


def test_stages_freeze_exactly_their_groups(tmp_path):
    base = _cfg(tmp_path / "base", "train.max_steps=2")
    train(base, base.run.dir)
    start = _weights(tmp_path / "base", 2)
    stages = {"align": lambda k: k.startswith("projector."),
              "sft": lambda k: not k.startswith("vision."),
              "moe": lambda k: any(f".ffn.{g}." in k for g in ("router", "experts", "shared"))}
    prev = tmp_path / "base"
    for stage, trains in stages.items():
        run = tmp_path / stage
        cfg = _cfg(run, f"experiment={stage}", "train.max_steps=2", f"train.init_from={prev}")
        s = train(cfg, cfg.run.dir)
        assert s["init_from"] == str(prev)
        before = _weights(prev, 2)
        after = _weights(run, 2)
        for k, v in before.items():
            if not v.is_floating_point() or k.endswith("router.bias"):
                continue
            if trains(k):
                assert not torch.equal(v, after[k]), f"{stage}: {k} did not train"
            else:
                assert torch.equal(v, after[k]), f"{stage}: frozen {k} changed"
        assert s["params_trainable"] < s["params_total"]
        prev = run
    assert not torch.equal(start["projector.fc1.weight"], _weights(prev, 2)["projector.fc1.weight"])


def test_init_from_mismatch_is_a_clear_error(tmp_path):
    a = _cfg(tmp_path / "a", "train.max_steps=1")
    train(a, a.run.dir)
    b = _cfg(tmp_path / "b", "train.max_steps=1", "moe.n_experts=4", f"train.init_from={tmp_path / 'a'}")
    with pytest.raises(ValueError, match="does not fit this model"):
        train(b, b.run.dir)
    c = _cfg(tmp_path / "c", "train.max_steps=1", f"train.init_from={tmp_path / 'nope'}")
    with pytest.raises(UserError, match="train.init_from"):
        train(c, c.run.dir)


def test_unknown_trainable_group(tmp_path):
    cfg = _cfg(tmp_path / "r", "train.max_steps=1", "train.trainable=[projector,wings]")
    with pytest.raises(ConfigError, match="train.trainable"):
        train(cfg, cfg.run.dir)


def test_modality_metrics_and_heatmap(tmp_path):
    cfg = _cfg(tmp_path / "r", "train.max_steps=3")
    s = train(cfg, cfg.run.dir)
    run = Path(cfg.run.dir)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "routing" in r]
    layer = rows[-1]["routing"]["layer_0"]
    img, txt, tot = (torch.tensor(layer[k]) for k in
                     ("tokens_per_expert_image", "tokens_per_expert_text", "tokens_per_expert"))
    assert img.sum() > 0 and txt.sum() > 0
    assert torch.all(img + txt <= tot)  # padding is neither image nor text
    k = 4  # deepseekmoe at granularity 4 on top_k 1
    assert img.sum() == 4 * 4 * k  # 4 samples x 4 image tokens (2x2 merge) x k assignments
    load = modality_load(run)
    assert set(load) == {"layer_0", "layer_1"} and load["layer_0"].shape == (2, 32)
    png = plot_modality_heatmap(run)
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert s["chance_accuracy"] > 0 and "eval_accuracy" in s and "caption_loss" in s
    summary = json.loads((run / "summary.json").read_text())
    assert {"eval_accuracy", "chance_accuracy", "initial_eval_accuracy"} <= set(summary)


def test_bpe_tokenizer_trained_saved_and_reused_on_resume(tmp_path):
    run = tmp_path / "r"
    cfg = _cfg(run, "data.tokenizer=bpe", "data.bpe_vocab_size=400", "model.vocab_size=400",
               "train.max_steps=4", "train.ckpt_every=2", "train.stop_after_steps=2")
    s1 = train(cfg, cfg.run.dir)
    tok_file = run / "tokenizer.json"
    assert tok_file.is_file() and s1["steps"] == 2
    before = tok_file.read_bytes()
    from moe_vlm.data.tokenizers import BPETokenizer
    tok = BPETokenizer.load(tok_file)
    assert len(tok.encode("what color is the shape at the top left?")) < 25  # merges learned
    s2 = train(_cfg(run, "data.tokenizer=bpe", "data.bpe_vocab_size=400", "model.vocab_size=400",
                    "train.max_steps=4", "train.ckpt_every=2"), run)
    assert s2["status"] == "completed" and s2["resumed_from"] == 2
    assert tok_file.read_bytes() == before


def test_tokenizer_larger_than_model_vocab_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path / "r", "data.tokenizer=bpe", "data.bpe_vocab_size=400", "train.max_steps=1")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(cfg, cfg.run.dir)


def test_accuracy_by_question_type(tmp_path):
    """``eval_accuracy_<type>`` for each question type of the synthetic set: their
    answer-weighted mean is ``eval_accuracy``; summary.json keeps the last breakdown."""
    from moe_vlm.data.build import build_data
    from moe_vlm.data.synthetic_vlm import QUESTION_TYPES

    cfg = load_config(["train.max_steps=2", "train.batch_size=4", "data.n_eval_samples=16",
                       "train.progress=false", f"run.dir={tmp_path / 'run'}"])
    train(cfg, cfg.run.dir)
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    by_type = {t: row[f"eval_accuracy_{t}"] for t in QUESTION_TYPES if f"eval_accuracy_{t}" in row}
    assert len(by_type) >= 3
    ev = build_data(cfg.data, None, cfg.vision, 4).eval  # the same questions as the run's
    counts = {t: 0 for t in by_type}
    for i in range(len(ev)):
        for t in ev.question_types(i):
            counts[t] += 1
    mean = sum(by_type[t] * counts[t] for t in by_type) / sum(counts.values())
    assert mean == pytest.approx(row["eval_accuracy"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_accuracy_breakdown"] == by_type
