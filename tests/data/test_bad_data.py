"""Bad data files: each case is skipped and counted, or refused with one ``DataError``
that names the file (or config key) and why; never a raw traceback.

Table-driven: a case builds its files in ``tmp_path`` and says what must happen, either
``("skip", {stat: count})`` (the good row still comes through, in both modes) or
``("error", [substrings])`` (a ``DataError`` whose message contains each substring).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from moe_vlm.config import DataConfig
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.llava import BadRowWarning, build_llava_sources
from moe_vlm.data.tokenizers import build_tokenizer
from moe_vlm.errors import DataError, UserError

TOK = ByteTokenizer()
K, SIZE, SEQ = 4, 16, 128
MEAN, STD = [0.5] * 3, [0.25] * 3


def _turns(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


GOOD = {"id": "good", "image": "a.png", "conversations": _turns("<image>\nWhat?", "A cat.")}
TEXT = {"id": "text", "conversations": _turns("Hi?", "hi")}


def _line(row) -> str:
    return json.dumps(row) + "\n"


def _with_image(path: str) -> dict:
    return {"id": "img", "image": path, "conversations": _turns("<image>\nWhat?", "x")}


# -- how each case builds its files: (tmp_path) -> config overrides ---------------------

def _write(name: str, content: str | bytes) -> Callable[[Path], dict]:
    def build(d: Path) -> dict:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return {"path": str(d / name)}
    return build


def _eval_file(content: str | None) -> Callable[[Path], dict]:
    """A good data.path and a data.eval_path holding ``content`` (``None``: missing)."""
    def build(d: Path) -> dict:
        (d / "train.jsonl").write_text(_line(GOOD))
        if content is not None:
            (d / "eval.jsonl").write_text(content)
        return {"path": str(d / "train.jsonl"), "eval_path": str(d / "eval.jsonl")}
    return build


def _image_dir_is_file(d: Path) -> dict:
    (d / "rows.jsonl").write_text(_line(GOOD))
    (d / "not_a_dir").write_text("x")
    return {"path": str(d / "rows.jsonl"), "image_dir": str(d / "not_a_dir")}


def _symlink_out(d: Path) -> dict:
    os.symlink(d / "outside.png", d / "images" / "link.png")
    (d / "rows.jsonl").write_text(_line(GOOD) + _line(_with_image("link.png")))
    return {"path": str(d / "rows.jsonl")}


def _all_outside(d: Path) -> dict:
    (d / "rows.jsonl").write_text(_line(_with_image("../outside.png")))
    return {"path": str(d / "rows.jsonl")}


CASES = [
    # name, build, expected: ("skip", {stat: n}) or ("error", [substrings])
    ("malformed_json_line", _write("r.jsonl", _line(GOOD) + '{"id": 1, "conv\n'),
     ("skip", {"skipped_invalid_json": 1})),
    ("non_utf8_line", _write("r.jsonl", _line(GOOD).encode() + b'{"id": "\xff\xfe"}\n'),
     ("skip", {"skipped_invalid_json": 1})),
    ("lone_surrogate", _write("r.jsonl", _line(GOOD) + '{"conversations": [{"from": "human", '
                              '"value": "\\ud800"}, {"from": "gpt", "value": "x"}]}\n'),
     ("skip", {"skipped_invalid_json": 1})),
    ("jsonl_rows_not_objects", _write("r.jsonl", "[1, 2]\n" + _line(GOOD) + "3\n\"s\"\n"),
     ("skip", {"skipped_not_object": 3})),
    ("json_items_not_objects", _write("r.json", json.dumps([GOOD, [1], 3, None])),
     ("skip", {"skipped_not_object": 3})),
    ("blank_lines_between_rows", _write("r.jsonl", "\n" + _line(GOOD) + "\n  \n" + _line(TEXT)),
     ("skip", {})),
    ("dotdot_image", _write("r.jsonl", _line(GOOD) + _line(_with_image("../outside.png"))),
     ("skip", {"skipped_outside_image_dir": 1})),
    ("absolute_image", lambda d: _write("r.jsonl", _line(GOOD) + _line(
        _with_image(str(d / "outside.png"))))(d), ("skip", {"skipped_outside_image_dir": 1})),
    ("symlink_out_of_image_dir", _symlink_out, ("skip", {"skipped_outside_image_dir": 1})),
    ("no_valid_rows", _write("r.jsonl", "{oops\n[1]\n" + _line({"id": "x"})),
     ("error", ["data.path", "r.jsonl", "none of the 3 rows", "skipped_invalid_json=1",
                "skipped_not_object=1", "skipped_malformed=1"])),
    ("empty_file", _write("r.jsonl", ""), ("error", ["data.path", "r.jsonl", "no rows"])),
    ("blank_lines_only", _write("r.jsonl", "\n \n\t\n"), ("error", ["r.jsonl", "no rows"])),
    ("empty_json_list", _write("r.json", "[]"), ("error", ["r.json", "no rows"])),
    ("txt_suffix", _write("r.txt", _line(GOOD)), ("error", ["r.txt", "'.txt'", ".jsonl"])),
    ("json_holding_text", _write("r.json", "hello\nthis is not JSON\n"),
     ("error", ["data.path", "r.json", "skipped_invalid_json=2", "JSON list"])),
    ("broken_json_list", _write("r.json", "[" + json.dumps(GOOD) + ", {"),
     ("error", ["data.path", "r.json", "not a valid JSON list"])),
    ("all_images_outside", _all_outside,
     ("error", ["rows.jsonl", "outside data.image_dir", "data.allow_outside_image_dir=true"])),
    ("eval_path_empty", _eval_file(""), ("error", ["data.eval_path", "eval.jsonl", "no rows"])),
    ("eval_path_all_bad", _eval_file("{bad\n"),
     ("error", ["data.eval_path", "eval.jsonl", "skipped_invalid_json=1"])),
    ("eval_path_missing", _eval_file(None), ("error", ["data.eval_path", "eval.jsonl"])),
    ("path_missing", lambda d: {"path": str(d / "nope.jsonl")},
     ("error", ["data.path", "nope.jsonl", "no such file"])),
    ("path_is_dir", lambda d: {"path": str(d / "images")},
     ("error", ["data.path", "is a directory"])),
    ("image_dir_missing", lambda d: {**_write("r.jsonl", _line(GOOD))(d),
                                     "image_dir": str(d / "nope")},
     ("error", ["data.image_dir", "nope", "no such directory"])),
    ("image_dir_is_file", _image_dir_is_file, ("error", ["data.image_dir", "not a directory"])),
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``images/a.png`` inside the image dir, ``outside.png`` next to it (outside), and a
    good ``eval_ok.jsonl`` so that the train file is read whole (no held-out rows)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "eval_ok.jsonl").write_text(_line(TEXT))
    px = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / "images" / "a.png")
    Image.fromarray(px).save(tmp_path / "outside.png")
    return tmp_path


def _first_samples(cfg: DataConfig) -> tuple[list, dict]:
    """Build the sources, take every training sample of one pass; (samples, stats)."""
    train, _ = build_llava_sources(cfg, TOK, K, SIZE, MEAN, STD)
    samples = list(train)
    if not cfg.streaming:
        train[0]  # training indexes map-style data: that path must skip (or refuse) too
    return samples, train.stats


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("name,build,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_data(tree: Path, name: str, build, expected, streaming: bool) -> None:
    cfg = DataConfig(**{"name": "llava", "image_dir": str(tree / "images"), "seq_len": SEQ,
                        "eval_path": str(tree / "eval_ok.jsonl"), "streaming": streaming,
                        **build(tree)})
    kind, want = expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        if kind == "error":
            with pytest.raises(DataError) as e:
                _first_samples(cfg)
            assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
            msg = str(e.value)
            assert "\n" not in msg and all(s in msg for s in want), msg
            return
        samples, stats = _first_samples(cfg)
    assert len(samples) >= 1  # the good row survives
    assert {k: v for k, v in stats.items() if v} == want


def test_outside_image_dir_allowed_by_key(tree: Path) -> None:
    """``data.allow_outside_image_dir=true`` reads the images that are refused otherwise."""
    os.symlink(tree / "outside.png", tree / "images" / "link.png")
    rows = [_with_image(p) for p in ("../outside.png", str(tree / "outside.png"), "link.png")]
    (tree / "r.jsonl").write_text("".join(map(_line, rows)))
    cfg = DataConfig(name="llava", path=str(tree / "r.jsonl"), image_dir=str(tree / "images"),
                     seq_len=SEQ, eval_path=str(tree / "eval_ok.jsonl"),
                     allow_outside_image_dir=True)
    samples, stats = _first_samples(cfg)
    assert len(samples) == 3 and not any(stats.values())


TOKENIZER_CASES = [
    ("garbage_bytes", b"\x00\xff garbage"),
    ("wrong_shape_object", b'{"hello": 1}'),
    ("wrong_shape_list", b"[1, 2]"),
    ("empty", b""),
]


@pytest.mark.parametrize("name,content", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_corrupt_saved_bpe_tokenizer(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(DataError) as e:
        build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=300), tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value) and "delete it" in str(e.value)


@pytest.mark.parametrize("name,content", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_corrupt_hf_tokenizer_dir(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(content)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>"}))
    with pytest.raises(DataError) as e:
        build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "tok")))
    assert "data.tokenizer_path" in str(e.value) and str(tmp_path / "tok") in str(e.value)
    if not name.startswith("wrong_shape"):  # not JSON at all: the message names the file
        assert str(tmp_path / "tok" / "tokenizer.json") in str(e.value)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_reading_local_rows_opens_no_connection(tree: Path, monkeypatch, streaming: bool) -> None:
    """``datasets.load_dataset`` pings the Hub to count downloads, even for a local file
    (a 5 s DNS stall without a network, and a request nobody asked for): switched off, so
    no address is looked up and no socket connects while the rows are read."""
    import socket

    calls: list[tuple] = []

    def record(name: str):
        def refuse(*args, **kwargs):
            calls.append((name, args[:2]))
            raise OSError("network disabled in this test")
        return refuse

    monkeypatch.setattr(socket, "getaddrinfo", record("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", record("create_connection"))
    (tree / "rows.jsonl").write_text(_line(GOOD) + _line(TEXT))
    cfg = DataConfig(name="llava", image_dir=str(tree / "images"), seq_len=SEQ,
                     eval_path=str(tree / "eval_ok.jsonl"), streaming=streaming,
                     path=str(tree / "rows.jsonl"))
    samples, _ = _first_samples(cfg)
    assert len(samples) == 2 and calls == []
