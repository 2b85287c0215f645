"""Local text corpora (data=text) and the embedded standard-library corpus (data=stdlib):
formats, the token cache (reused; rebuilt when a file or the tokenizer changes), windows
addressed the same for every layout, a held-out split by document, bad files counted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_vlm.data.text_corpus as tc
from moe_vlm.config import load_config
from moe_vlm.data import build_data
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.errors import DataError

TOK = ByteTokenizer()


def doc(i: int) -> str:
    """A document whose every window is recognisably its own (``D<i>:`` repeated)."""
    return f"D{i:03d}: " + " ".join(f"w{i}x{j}" for j in range(40)) + "\n"


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(6):
        (d / f"t{i}.txt").write_text(doc(i))
    (d / "rows.jsonl").write_text("".join(json.dumps({"text": doc(100 + i)}) + "\n" for i in range(20)))
    (d / "sub" / "list.json").write_text(json.dumps([{"text": doc(200 + i)} for i in range(10)]))
    return d


def cfg_for(tmp_path, path, *extra):
    return load_config(["vision=none", "data=text", f"data.path={path}", "data.seq_len=32",
                        f"data.cache_dir={tmp_path / 'cache'}", "data.n_eval_samples=8",
                        "data.tokenize_workers=1", *extra]).data


def test_discover_file_folder_glob_and_refusals(corpus, tmp_path):
    assert len(tc.discover(str(corpus))) == 8
    assert [f.name for f in tc.discover(str(corpus / "*.txt"))] == [f"t{i}.txt" for i in range(6)]
    assert tc.discover(str(corpus / "rows.jsonl"))[0].name == "rows.jsonl"
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported suffix '.csv'"):
        tc.discover(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="data.path: no .txt"):
        tc.discover(str(tmp_path / "nothing_here" / "*.txt"))


def test_cache_is_reused_and_rebuilt_when_a_file_or_the_tokenizer_changes(corpus, tmp_path, monkeypatch):
    calls = []
    real = tc._tokenize_file
    monkeypatch.setattr(tc, "_tokenize_file", lambda job: calls.append(job[0]) or real(job))
    files = tc.discover(str(corpus))
    a = tc.build_cache(files, TOK, "text", tmp_path / "c", workers=1, progress=False)
    assert len(calls) == 8
    assert tc.build_cache(files, TOK, "text", tmp_path / "c", workers=1, progress=False) == a
    assert len(calls) == 8  # reused: nothing tokenised again
    f = corpus / "t0.txt"
    f.write_text(doc(0) + "more\n")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    b = tc.build_cache(files, TOK, "text", tmp_path / "c", workers=1, progress=False)
    assert b != a and len(calls) == 16
    from moe_vlm.data.tokenizers import BPETokenizer
    bpe = BPETokenizer.train((doc(i) for i in range(50)), 300)
    c = tc.build_cache(files, bpe, "text", tmp_path / "c", workers=1, progress=False)
    assert c not in (a, b)
    meta = json.loads((c / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["n_docs"] == 36


def test_parallel_tokenisation_gives_the_same_cache(corpus, tmp_path):
    files = tc.discover(str(corpus))
    one = tc.build_cache(files, TOK, "text", tmp_path / "a", workers=1, progress=False)
    two = tc.build_cache(files, TOK, "text", tmp_path / "b", workers=2, progress=False)
    assert (one / "tokens.bin").read_bytes() == (two / "tokens.bin").read_bytes()
    assert np.array_equal(np.load(one / "doc_offsets.npy"), np.load(two / "doc_offsets.npy"))


def test_windows_cover_the_split_in_order_and_held_out_shares_no_document(corpus, tmp_path):
    data = build_data(cfg_for(tmp_path, corpus, "data.eval_fraction=0.2"), TOK)
    train, ev = data.train, data.eval
    # Every window continues the previous one (labels are inputs shifted by one).
    for i in range(len(train) - 1):
        assert torch.equal(train[i]["labels"][-1:], train[i + 1]["input_ids"][:1])
    text = lambda src: "".join(TOK.decode(src[i]["input_ids"].tolist()) for i in range(len(src)))
    train_ids = {m for m in range(230) if f"D{m:03d}:" in text(train)}
    eval_ids = {m for m in range(230) if f"D{m:03d}:" in text(ev)}
    assert train_ids and eval_ids and not train_ids & eval_ids
    assert TOK.eos_id in torch.cat([train[i]["input_ids"] for i in range(len(train))]).tolist()


def test_batches_are_the_same_for_every_layout_and_call(corpus, tmp_path):
    data = build_data(cfg_for(tmp_path, corpus), TOK)
    whole = data.train_batch(3, 0, 8, 8)["input_ids"]
    parts = torch.cat([data.train_batch(3, m, 2, 8)["input_ids"] for m in range(4)])
    assert torch.equal(whole, parts)
    again = build_data(cfg_for(tmp_path, corpus), TOK).train_batch(3, 0, 8, 8)["input_ids"]
    assert torch.equal(whole, again)  # a resumed run reads the same tokens


def test_other_formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "fmt"
    d.mkdir()
    pq.write_table(pa.table({"body": [doc(i) for i in range(5)]}), d / "a.parquet")
    datasets.Dataset.from_dict({"body": [doc(10 + i) for i in range(5)]}).save_to_disk(str(d / "saved"))
    files = tc.discover(str(d))
    assert [f.name for f in files] == ["a.parquet", "saved"]
    meta = json.loads((tc.build_cache(files, TOK, "body", tmp_path / "c", 1, False) / "meta.json").read_text())
    assert meta["n_docs"] == 10


def test_bad_files_and_rows_are_skipped_and_counted(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(4):
        (d / f"good{i}.txt").write_text(doc(i) * 3)
    (d / "empty.txt").write_text("  \n")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "rows.jsonl").write_text('{"text": "ok row"}\n{broken\n[1, 2]\n{"title": "no text"}\n')
    (d / "list.json").write_text("[{]")
    data = build_data(cfg_for(tmp_path, d, "data.eval_fraction=0.4"), TOK)
    assert data.stats() == {"skipped_empty_doc": 1, "skipped_undecodable_file": 1,
                            "skipped_invalid_json": 2, "skipped_not_object": 1,
                            "skipped_no_text": 1}
    for i in range(4):
        (d / f"good{i}.txt").unlink()
    (d / "rows.jsonl").unlink()
    with pytest.raises(DataError, match="no usable document in 3 file"):
        build_data(cfg_for(tmp_path, d), TOK)


def test_stdlib_corpus_and_its_fixed_held_out_files():
    files, held = tc.stdlib_files()
    assert len(files) > 500 and any(f.name == "os.py" for f in files)
    assert 0 < len(held) < len(files) / 10
    assert tc.stdlib_files()[1] == held  # fixed, not drawn per run
    assert load_config(["vision=none", "data=stdlib"]).data.name == "stdlib"


@pytest.mark.parametrize("doc_mask", ["false", "true"])
def test_trains_on_a_text_corpus(corpus, tmp_path, doc_mask):
    from moe_vlm.train import train

    cfg = load_config(["vision=none", "data=text", f"data.path={corpus}", "data.seq_len=32",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.n_eval_samples=8",
                       "data.tokenize_workers=1", "train.max_steps=4", "train.batch_size=4",
                       "train.progress=false", f"run.dir={tmp_path / 'run'}",
                       f"data.doc_mask={doc_mask}"])
    s = train(cfg, cfg.run.dir)
    assert s["status"] == "completed" and s["final_eval_loss"] < s["initial_eval_loss"]


def test_doc_ids_mark_the_documents_of_a_window(corpus, tmp_path):
    data = build_data(cfg_for(tmp_path, corpus, "data.doc_mask=true"), TOK)
    for i in range(len(data.train)):
        s = data.train[i]
        ids, docs = s["input_ids"], s["doc_ids"]
        assert docs[0] == 0 and bool((docs.diff() >= 0).all()) and bool((docs.diff() <= 1).all())
        # a new document starts right after each EOS, and nowhere else
        new = (docs.diff() == 1).nonzero().flatten() + 1
        assert torch.equal(new, (ids[:-1] == TOK.eos_id).nonzero().flatten() + 1)
    assert data.train_batch(0, 0, 4, 4)["doc_ids"].shape == (4, 32)


def test_doc_mask_needs_a_text_corpus():
    from moe_vlm.errors import ConfigError
    with pytest.raises(ConfigError, match="data.doc_mask"):
        load_config(["data.doc_mask=true"])  # the default VLM job
