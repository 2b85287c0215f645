"""LLaVA JSON/JSONL data: samples, bad-row skipping and counting, streaming, eval split."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moe_vlm.config import ConfigError, DataConfig
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.data.images import ImageError, load_image
from moe_vlm.data.llava import BadRowWarning, LlavaDataset, NoUsableRows, build_llava_sources

TOK = ByteTokenizer()
K, SIZE, SEQ = 4, 16, 128
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
GOOD = [0, 1, 6, 7, 8]  # row numbers of the usable rows in ROWS
BAD = {2: "skipped_missing_image", 3: "skipped_corrupt_image", 4: "skipped_malformed",
       5: "skipped_too_long"}


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


ROWS = [
    {"id": "r0", "image": "a.png", "conversations": _turns("<image>\nWhat is this?", "A cat.")},
    {"id": "r1", "conversations": _turns("Say hi.", "hi")},
    {"id": "r2", "image": "missing.png", "conversations": _turns("<image>\nWhat?", "gone")},
    {"id": "r3", "image": "corrupt.png", "conversations": _turns("<image>\nWhat?", "broken")},
    {"id": "r4", "image": "a.png", "conversations": "oops"},
    {"id": "r5", "image": "b.png", "conversations": _turns("<image>\nDescribe.", "x" * 200)},
    {"id": "r6", "image": ["a.png", "c.png"],
     "conversations": _turns("<image> vs <image>", "different", "sure?", "yes")},
    {"id": 7, "image": "c.png", "conversations": _turns("Colour?", "grey")},
    {"id": "r8", "conversations": _turns("1+1?", "2", "2+2?", "4")},
]


@pytest.fixture
def data(tmp_path) -> Path:
    """A tmp folder with images (one corrupt), conversations.json and .jsonl."""
    img = tmp_path / "images"
    img.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(img / "a.png")
    Image.fromarray(rng.integers(0, 256, (10, 6, 3), dtype=np.uint8)).save(img / "b.png")
    Image.fromarray(rng.integers(0, 256, (7, 9), dtype=np.uint8), mode="L").save(img / "c.png")
    (img / "corrupt.png").write_bytes(random.Random(0).randbytes(300))
    (tmp_path / "conv.json").write_text(json.dumps(ROWS))
    (tmp_path / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def make(data: Path, name: str, streaming: bool = False, **kw) -> LlavaDataset:
    return LlavaDataset(data / name, data / "images", TOK, K, SIZE, MEAN, STD, SEQ, streaming, **kw)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def collect(it) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = list(it)
    return out, [str(w.message) for w in rec if issubclass(w.category, BadRowWarning)]


@pytest.mark.parametrize("name", ["conv.json", "conv.jsonl"])
def test_map_style_skips_and_counts_each_bad_row_once(data, name):
    ds = make(data, name)
    assert len(ds) == len(ROWS)
    samples, warned = collect(ds)
    assert len(samples) == len(GOOD)
    assert ds.stats == {k: 1 for k in BAD.values()}
    assert len(warned) == len(BAD)
    for (row, stat), msg in zip(sorted(BAD.items()), warned):
        assert f"row {row} " in msg and f"'r{row}'" in msg
        assert stat.split("_", 1)[1].replace("_image", "").replace("_", " ") in msg
    assert "missing.png" in warned[0] and "corrupt.png" in warned[1]
    # A bad index gives the next good row (wrapping); revisiting counts and warns nothing.
    again, warned_again = collect(ds[i] for i in range(-1, 2 * len(ROWS)))
    assert warned_again == [] and ds.stats == {k: 1 for k in BAD.values()}
    assert same(ds[2], ds[6]) and same(ds[5], ds[6]) and same(ds[9], ds[0]) and same(ds[-1], ds[8])
    for i, s in zip(GOOD, samples):
        assert same(ds[i], s)


def test_sample_format(data):
    ds = make(data, "conv.json")
    s0, s1, s6, s7 = ds[0], ds[1], ds[6], ds[7]
    for s in (s0, s1, s6, s7):
        assert s["input_ids"].dtype == s["labels"].dtype == s["answer_ids"].dtype == torch.long
        assert s["input_ids"].shape == s["labels"].shape == s["answer_ids"].shape
        assert s["input_ids"].numel() <= SEQ
        assert s["pixel_values"].dtype == torch.float32
        n_img = s["pixel_values"].shape[0]
        assert s["pixel_values"].shape == (n_img, 3, SIZE, SIZE)
        assert int((s["input_ids"] == TOK.image_id).sum()) == n_img * K
        assert not bool((s["labels"] == TOK.image_id).any())
    assert [s["pixel_values"].shape[0] for s in (s0, s1, s6, s7)] == [1, 0, 2, 1]
    assert TOK.decode(s0["labels"][s0["labels"] >= 0].tolist()) == "A cat."
    assert set(s6["answer_ids"].tolist()) == {-1, 0, 1}
    # Row 7 has no marker: the image is prepended to the first human turn.
    assert TOK.decode(s7["input_ids"].tolist()) == "USER: \nColour?\nASSISTANT: grey"


def test_pixel_values_match_hand_normalised_reference(data):
    s = make(data, "conv.json")[0]
    raw = np.asarray(Image.open(data / "images" / "a.png"), dtype=np.float64)  # [H, W, 3], 16x16
    ref = np.empty((3, SIZE, SIZE))
    for c in range(3):
        ref[c] = (raw[:, :, c] / 255.0 - MEAN[c]) / STD[c]
    assert torch.allclose(s["pixel_values"][0].double(), torch.from_numpy(ref), atol=1e-5)
    # Row 6: a.png then c.png (grey, resized 9x7 -> 16x16 and replicated to 3 channels).
    p6 = make(data, "conv.json")[6]["pixel_values"]
    assert torch.equal(p6[0], s["pixel_values"][0])
    grey = p6[1] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[1], grey[2], atol=1e-5)


def test_image_errors(data):
    with pytest.raises(ImageError, match="missing.*nope.png"):
        load_image(data / "images" / "nope.png", SIZE, MEAN, STD)
    with pytest.raises(ImageError, match="corrupt.*corrupt.png") as e:
        load_image(data / "images" / "corrupt.png", SIZE, MEAN, STD)
    assert isinstance(e.value, ValueError) and e.value.kind == "corrupt"


@pytest.mark.parametrize("name", ["conv.json", "conv.jsonl"])
def test_streaming_matches_map_style(data, name):
    mapped, _ = collect(make(data, name))
    stream = make(data, name, streaming=True)
    with pytest.raises(TypeError, match="streaming"):
        len(stream)
    first, warned = collect(stream)
    assert len(first) == len(mapped) and all(same(a, b) for a, b in zip(first, mapped))
    assert stream.stats == {k: 1 for k in BAD.values()} and len(warned) == len(BAD)
    second, warned = collect(stream)  # a second epoch: same samples, nothing recounted
    assert all(same(a, b) for a, b in zip(second, first)) and warned == []
    assert stream.stats == {k: 1 for k in BAD.values()}


def test_json_and_jsonl_agree(data):
    a, _ = collect(make(data, "conv.json"))
    b, _ = collect(make(data, "conv.jsonl"))
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def test_no_good_rows_raises(data):
    (data / "bad.jsonl").write_text("".join(json.dumps(ROWS[i]) + "\n" for i in BAD))
    ds = make(data, "bad.jsonl")
    with pytest.warns(BadRowWarning), pytest.raises(NoUsableRows, match="none of the 4 rows"):
        ds[0]
    assert sum(ds.stats.values()) == 4


def test_image_dir_required_only_with_images(data):
    with pytest.raises(ConfigError, match="data.image_dir"):
        LlavaDataset(data / "conv.json", None, TOK, K, SIZE, MEAN, STD, SEQ)
    with pytest.raises(FileNotFoundError, match="data.image_dir"):
        LlavaDataset(data / "conv.json", data / "nope", TOK, K, SIZE, MEAN, STD, SEQ)
    (data / "text.jsonl").write_text("".join(json.dumps(ROWS[i]) + "\n" for i in (1, 8)))
    ds = LlavaDataset(data / "text.jsonl", None, TOK, K, SIZE, MEAN, STD, SEQ)
    assert ds[0]["pixel_values"].shape == (0, 3, SIZE, SIZE)


def _cfg(data: Path, **kw) -> DataConfig:
    base = dict(name="llava", path=str(data / "conv.jsonl"), image_dir=str(data / "images"),
                seq_len=SEQ, n_eval_samples=2)
    return DataConfig(**{**base, **kw})


def _sources(cfg):
    return build_llava_sources(cfg, TOK, K, SIZE, MEAN, STD)


def test_eval_split_held_out_map_style(data):
    full = make(data, "conv.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        train, ev = _sources(_cfg(data))
        assert len(train) == len(ROWS) - 2 and len(ev) == 2
        assert same(ev[0], full[7]) and same(ev[1], full[8])
        got = list(train)
    assert len(got) == 3 and all(same(a, full[i]) for a, i in zip(got, (0, 1, 6)))
    assert same(train[6], full[6]) and same(train[7], full[0])  # wraps within the train rows


def test_eval_split_streaming_and_eval_path(data):
    full = make(data, "conv.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadRowWarning)
        train, ev = _sources(_cfg(data, streaming=True, n_eval_samples=3))
        # Eval = the first 3 rows, compacted: row 2 (missing image) is dropped.
        assert len(ev) == 2 and same(ev[0], full[0]) and same(ev[1], full[1])
        assert ev.stats["skipped_missing_image"] == 1
        got = list(train)
        assert len(got) == 3 and all(same(a, full[i]) for a, i in zip(got, (6, 7, 8)))
        (data / "eval.jsonl").write_text(json.dumps(ROWS[8]) + "\n" + json.dumps(ROWS[1]) + "\n")
        train, ev = _sources(_cfg(data, eval_path=str(data / "eval.jsonl")))
        assert len(train) == len(ROWS) and len(ev) == 2
        assert same(ev[0], full[8]) and same(ev[1], full[1])


def test_config_errors(data):
    with pytest.raises(ConfigError, match="data.path"):
        _sources(_cfg(data, path=None))
    with pytest.raises(FileNotFoundError, match="data.path"):
        _sources(_cfg(data, path=str(data / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="data.eval_path"):
        _sources(_cfg(data, eval_path=str(data / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="data.image_dir"):
        _sources(_cfg(data, image_dir=str(data / "nope")))
    with pytest.raises(ConfigError, match="data.n_eval_samples"):
        _sources(_cfg(data, n_eval_samples=len(ROWS)))


def test_datasets_cache_stays_out_of_home(data):
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)

    def snapshot() -> set:
        return set(cache.rglob("*")) if cache.exists() else set()

    before = snapshot()
    make(data, "conv.jsonl")
    collect(make(data, "conv.json", streaming=True))
    assert snapshot() == before
