"""Data mixtures: exact per-block proportions, stateless addressing (the same samples for
every layout and after a resume), each source's own samples, realised counts logged."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.data import build_data
from moe_vlm.data.mixture import BLOCK, MixtureTrain, block_counts
from moe_vlm.errors import ConfigError


class Numbers:
    """A stand-in source whose sample j is the number ``base + j``."""

    def __init__(self, base: int):
        self.base = base

    def _sample(self, j: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([self.base + j])}


def test_block_counts_add_up_and_follow_the_weights():
    assert block_counts([0.7, 0.3]) == [179, 77]
    assert sum(block_counts([1, 1, 1])) == BLOCK
    assert block_counts([2, 1, 1], 4) == [2, 1, 1]


def test_proportions_are_exact_and_each_source_is_read_in_order():
    mix = MixtureTrain(["a", "b", "c"], [Numbers(0), Numbers(10**6), Numbers(2 * 10**6)],
                       [0.5, 0.3, 0.2], seed=3)
    n = 4 * BLOCK
    got = [int(mix[g]["input_ids"]) for g in range(n)]
    per = [sorted(x for x in got if x // 10**6 == k) for k in range(3)]
    counts = block_counts([0.5, 0.3, 0.2])
    for k in range(3):  # every sample of each source exactly once, none skipped
        assert per[k] == [k * 10**6 + j for j in range(4 * counts[k])]
    assert mix.realised(n) == {"mixture_a": 4 * counts[0], "mixture_b": 4 * counts[1],
                               "mixture_c": 4 * counts[2]}
    assert sum(mix.realised(n + 37).values()) == n + 37
    # stateless: any order of access (a resume, another process's slice) gives the same
    fresh = MixtureTrain(["a", "b", "c"], [Numbers(0), Numbers(10**6), Numbers(2 * 10**6)],
                         [0.5, 0.3, 0.2], seed=3)
    assert [int(fresh[g]["input_ids"]) for g in reversed(range(n))] == got[::-1]


def test_text_and_image_text_mixture_batches(tmp_path):
    cfg = load_config(["experiment=native_mm", "data.n_eval_samples=4",
                       f"data.cache_dir={tmp_path / 'cache'}"])
    from moe_vlm.data import build_tokenizer_for
    from moe_vlm.model.vlm import build_vlm

    tok = build_tokenizer_for(cfg.data)
    model = build_vlm(cfg, tok.image_id, device="cpu", seed=0)
    data = build_data(cfg.data, tok, model.vision.cfg, model.n_image_tokens)
    batch = data.train_batch(0, 0, 16, 16)
    has_img = (batch["input_ids"] == tok.image_id).any(1)
    assert 0 < int(has_img.sum()) < 16  # both sources in one batch
    out = model(batch["input_ids"], batch["labels"], batch.get("pixel_values"), batch["token_mask"])
    assert torch.isfinite(out.loss)
    assert set(data.stats(16)) >= {"mixture_stdlib", "mixture_synthetic_vlm"}
    assert len(data.eval) == 8  # both held-out sets


@pytest.mark.parametrize("overrides, says", [
    (["data=mixture", "vision=none", "+data.mixture.books=1"], "unknown source 'books'"),
    (["data=mixture", "vision=none", "data.mixture.stdlib=-1"], "must be >= 0"),
    (["data=mixture", "vision=none", "data.mixture.synthetic_vlm=0", "data.mixture.stdlib=0"],
     "at least one source"),
    (["data=mixture", "vision=none"], "vision tower"),
    (["data=mixture", "vision=none", "data.mixture.synthetic_vlm=0", "data.mixture.text=1"],
     "data.path"),
])
def test_bad_mixtures_are_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(overrides)


def test_a_mixture_without_sources_is_refused():
    from dataclasses import replace

    from moe_vlm.config import validate

    cfg = load_config(["vision=none", "data=synthetic_text"])
    with pytest.raises(ConfigError, match="at least one source"):
        validate(replace(cfg, data=replace(cfg.data, name="mixture", mixture={})))


def test_text_only_mixture_by_weights(tmp_path):
    cfg = load_config(["data=mixture", "vision=none", "data.mixture.synthetic_vlm=0",
                       "data.mixture.synthetic_text=0.25", "data.mixture.stdlib=0.75",
                       f"data.cache_dir={tmp_path / 'cache'}"])
    data = build_data(cfg.data)
    assert data.stats(BLOCK) == {**data.corpus_stats, "mixture_synthetic_text": 64,
                                 "mixture_stdlib": 192}


def test_mixture_eval_reports_each_source(tmp_path):
    from moe_vlm.model import build_model
    from moe_vlm.train.evaluate import evaluate

    cfg = load_config(["data=mixture", "vision=none", "data.mixture.synthetic_vlm=0",
                       "data.mixture.synthetic_text=0.5", "data.mixture.stdlib=0.5",
                       "data.n_eval_samples=6", f"data.cache_dir={tmp_path / 'cache'}"])
    data = build_data(cfg.data)
    model = build_model(cfg.model, cfg.moe, cfg.routing, seed=0)
    res = evaluate(model, data, 4, torch.device("cpu"), None)
    assert set(res) == {"eval_loss", "eval_loss_synthetic_text", "eval_loss_stdlib"}
    # the overall loss is the token-weighted mean of the parts (equal token counts here)
    assert res["eval_loss"] == pytest.approx(
        (res["eval_loss_synthetic_text"] + res["eval_loss_stdlib"]) / 2, rel=1e-9)


def test_mixture_sums_the_sources_skip_counts(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"document {i} " * 200)
    (corpus / "empty.txt").write_text("  \n")  # skipped and counted
    common = ["vision=none", f"data.cache_dir={tmp_path / 'cache'}", f"data.path={corpus}"]
    text = build_data(load_config(["data=text", *common]).data).corpus_stats
    stdlib = build_data(load_config(["data=stdlib", *common]).data).corpus_stats
    mix = build_data(load_config(["data=mixture", "data.mixture.synthetic_vlm=0",
                                  "data.mixture.text=0.5", "data.mixture.stdlib=0.5", *common]).data)
    assert text["skipped_empty_doc"] == 1
    assert mix.corpus_stats == {k: text.get(k, 0) + stdlib.get(k, 0) for k in {*text, *stdlib}}
