"""The embedded synthetic corpus: deterministic, shifted labels, disjoint splits."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config import DataConfig, ConfigError
from moe_vlm.data import ByteTokenizer, SyntheticText, build_data


def test_deterministic_and_shifted():
    a, b = SyntheticText(64, 7, "train"), SyntheticText(64, 7, "train")
    for i in (0, 5, 1000):
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert x["input_ids"].shape == (64,) and x["labels"].shape == (64,)
        assert torch.equal(x["input_ids"][1:], x["labels"][:-1])
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
    assert not torch.equal(SyntheticText(64, 8, "train")[0]["input_ids"], a[0]["input_ids"])


def test_splits_differ_and_eval_is_bounded():
    d = build_data(DataConfig(seq_len=48, n_eval_samples=5))
    assert len(d.eval) == 5
    assert not torch.equal(d.train[0]["input_ids"], d.eval[0]["input_ids"])
    batches = list(d.eval_batches(2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]


def test_train_batch_addressing():
    d = build_data(DataConfig(seq_len=16))
    full = d.train_batch(step=3, micro=0, micro_batch_size=4, batch_size=4)
    half = d.train_batch(step=3, micro=1, micro_batch_size=2, batch_size=4)
    assert torch.equal(full["input_ids"][2:], half["input_ids"])
    assert torch.equal(full["input_ids"][0], d.train[12]["input_ids"])


def test_text_is_readable_and_tokenizer_round_trips():
    tok = ByteTokenizer()
    text = tok.decode(SyntheticText(200, 0, "train")[0]["input_ids"].tolist())
    assert "the " in text and ("Q:" in text or "=" in text)
    s = "héllo wörld"
    assert tok.decode(tok.encode(s, bos=True, eos=True)) == s


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="data.name"):
        build_data(DataConfig(name="nope"))


def test_synthetic_vlm_deterministic_learnable_format():
    from moe_vlm.config import DataConfig, VisionConfig
    from moe_vlm.data.synthetic_vlm import N_OPTIONS, synthetic_vlm_row

    vis = VisionConfig(name="vit")
    a = build_data(DataConfig(name="synthetic_vlm", seq_len=192, n_eval_samples=16), ByteTokenizer(), vis, 4)
    b = build_data(DataConfig(name="synthetic_vlm", seq_len=192, n_eval_samples=16), ByteTokenizer(), vis, 4)
    c = build_data(DataConfig(name="synthetic_vlm", seq_len=192, seed=99, n_eval_samples=16),
                   ByteTokenizer(), vis, 4)
    for i in (0, 3, 500):
        x, y = a.train[i], b.train[i]
        for k in x:
            assert torch.equal(x[k], y[k])
        assert x["pixel_values"].shape == (1, 3, 32, 32)
        assert int((x["input_ids"] == ByteTokenizer.image_id).sum()) == 4
    assert any(not torch.equal(a.train[i]["pixel_values"], c.train[i]["pixel_values"]) for i in range(4))
    assert not torch.equal(a.train[0]["pixel_values"], a.eval[0]["pixel_values"])
    kinds = [synthetic_vlm_row(1234, "eval", i)[2] for i in range(16)]
    assert any(kinds) and any(not k for k in kinds)  # questions and captions both occur
    assert 0 < a.chance_accuracy < 1
    assert set(t for k in kinds for t in k) <= set(N_OPTIONS)


def test_synthetic_vlm_count_questions_after_is_a_curriculum_by_sample_index():
    """data.count_questions_after=N: training samples 0..N-1 ask no "how many" question;
    from N on, and in the held-out set, the samples are exactly the usual ones."""
    from moe_vlm.config import VisionConfig

    vis = VisionConfig(name="vit")
    cfg = dict(name="synthetic_vlm", seq_len=192, n_eval_samples=16)
    plain = build_data(DataConfig(**cfg), ByteTokenizer(), vis, 4)
    cur = build_data(DataConfig(**cfg, count_questions_after=300), ByteTokenizer(), vis, 4)
    count = plain.answer_types.index("count")
    early = [cur.train[i] for i in range(300)]
    assert not any(bool((s["answer_types"] == count).any()) for s in early)
    assert sum(bool((plain.train[i]["answer_types"] == count).any()) for i in range(300)) > 50
    assert any(bool((s["answer_types"] >= 0).any()) for s in early)  # other questions remain
    for i in (300, 301, 777):
        for k, v in plain.train[i].items():
            assert torch.equal(v, cur.train[i][k])
    for i in range(16):
        for k, v in plain.eval[i].items():
            assert torch.equal(v, cur.eval[i][k])
    assert torch.equal(plain.train[5]["pixel_values"], cur.train[5]["pixel_values"])  # same scene


class _Finite:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([i]), "labels": torch.tensor([i])}


class _Stream:
    streaming = True

    def __iter__(self):
        return iter([{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(5)])


def test_bundle_finite_sources_are_permuted_per_epoch_and_streams_resume():
    from moe_vlm.data import DataBundle

    b = DataBundle(train=_Finite(6), eval=_Finite(2), tokenizer=ByteTokenizer(), seed=3)
    ids = [int(b.train_batch(s, 0, 3, 3)["input_ids"][i]) for s in range(4) for i in range(3)]
    assert sorted(ids[:6]) == list(range(6)) and sorted(ids[6:]) == list(range(6))
    assert ids[:6] != ids[6:]  # a fresh order each epoch
    again = DataBundle(train=_Finite(6), eval=_Finite(2), tokenizer=ByteTokenizer(), seed=3)
    assert int(again.train_batch(3, 0, 3, 3)["input_ids"][2]) == ids[-1]  # addressable, no state
    s = DataBundle(train=_Stream(), eval=_Finite(2), tokenizer=ByteTokenizer())
    seq = [int(s.train_batch(k, 0, 2, 2)["input_ids"][j]) for k in range(4) for j in range(2)]
    assert seq == [0, 1, 2, 3, 4, 0, 1, 2]  # in order, epoch after epoch
    assert s.train_batch(1, 0, 2, 2)["input_ids"].flatten().tolist() == [2, 3]  # jump back
