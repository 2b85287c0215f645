"""Tokenizer factory: byte / trained BPE (saved beside the run) / local Hugging Face dir."""

from __future__ import annotations

import pytest

from moe_vlm.config import ConfigError, DataConfig
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.tokenizers import build_tokenizer

TEXTS = ["", "the red cube is small and at the left.", "héllo wörld", "日本語のテキスト",
         "emoji 🤖🧠 and combining e\u0301", "tabs\tand\r\nnewlines\n\n  spaces  ",
         "\x00\x01 control", "literal <image> and <eos> and <pad> stay text",
         "Q: what color is the cone? A: blue.\n"]


def _check_interface(tok, pad_is_eos: bool = False) -> None:
    specials = [tok.eos_id, tok.image_id] + ([tok.bos_id] if tok.bos_id is not None else [])
    specials += [] if pad_is_eos else [tok.pad_id]
    assert len(set(specials)) == len(specials), specials
    assert all(0 <= i < tok.vocab_size for i in specials + [tok.pad_id])
    for s in TEXTS:
        ids = tok.encode(s, bos=True, eos=True)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids) == s, (s, ids)
        plain = tok.encode(s)
        assert tok.image_id not in plain and tok.eos_id not in plain


def test_byte():
    tok = build_tokenizer(DataConfig(tokenizer="byte"))
    assert isinstance(tok, ByteTokenizer)
    _check_interface(tok)
    assert tok.encode("ab", bos=True) == [tok.bos_id, 97, 98]


def test_bpe_trains_deterministically_saves_and_reloads(tmp_path):
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=400)
    a = build_tokenizer(cfg, tmp_path / "a")
    b = build_tokenizer(cfg, tmp_path / "b")
    fa, fb = tmp_path / "a" / "tokenizer.json", tmp_path / "b" / "tokenizer.json"
    assert fa.is_file() and fa.read_bytes() == fb.read_bytes()
    assert not list((tmp_path / "a").glob(".*tmp"))  # atomic write left no temp file
    assert a.vocab_size == 400
    _check_interface(a)
    # Subword merges happened: corpus text is much shorter than its bytes.
    s = "the green ball is big and at the middle. Q: where is the green ball? A: middle."
    assert len(a.encode(s)) < len(s.encode()) / 2
    reloaded = build_tokenizer(cfg, tmp_path / "a")
    for text in TEXTS + [s]:
        assert reloaded.encode(text, bos=True, eos=True) == a.encode(text, bos=True, eos=True)


def test_bpe_loads_existing_file_instead_of_retraining(tmp_path):
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=300)
    custom = build_tokenizer(cfg, tmp_path, corpus=["zebra quokka " * 5] * 100)
    assert len(custom.encode("zebra quokka")) <= 3
    again = build_tokenizer(cfg, tmp_path)  # default corpus would not know "zebra"
    assert again.encode("zebra quokka") == custom.encode("zebra quokka")
    fresh = build_tokenizer(cfg)  # run_dir=None: trains on the default corpus, saves nothing
    assert fresh.encode("zebra quokka") != custom.encode("zebra quokka")


def test_bpe_vocab_too_small():
    with pytest.raises(ConfigError, match="data.bpe_vocab_size"):
        build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=100))


def _save_hf_tokenizer(path, bos: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|end|>"] + (["<|start|>"] if bos else [])
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["the cat sat on the mat"] * 50, trainer=trainer)
    kw = {"bos_token": "<|start|>"} if bos else {}
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|end|>", **kw).save_pretrained(str(path))


@pytest.mark.parametrize("bos", [True, False])
def test_hf_local_dir(tmp_path, bos):
    _save_hf_tokenizer(tmp_path / "tok", bos)
    tok = build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "tok")))
    _check_interface(tok, pad_is_eos=True)
    assert tok.image_id is not None and tok.image_id == tok.vocab_size - 1  # added at the end
    assert tok.pad_id == tok.eos_id  # no pad token: falls back to eos
    ids = tok.encode("the cat", bos=True)
    if bos:
        assert tok.bos_id is not None and ids[0] == tok.bos_id
    else:
        assert tok.bos_id is None and ids == tok.encode("the cat")
    assert tok.decode([tok.image_id] + tok.encode("the cat")) == "the cat"


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer(DataConfig(tokenizer="sentencepiece"))
    with pytest.raises(ConfigError, match="data.tokenizer_path"):
        build_tokenizer(DataConfig(tokenizer="hf"))
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path"):
        build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "nope")))
