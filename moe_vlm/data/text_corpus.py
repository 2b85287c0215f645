"""Local text corpora for pre-training: files -> documents -> one token cache -> windows.

``data.path`` is a file, a directory (searched recursively) or a glob of ``.txt`` (one
document per file), ``.jsonl`` / ``.json`` (one document per row, the string at
``data.text_key``), ``.parquet`` (the ``data.text_key`` column), or a ``datasets``
dataset saved with ``save_to_disk``. Documents are tokenised once, in worker processes,
into a flat token file (uint16 when the vocabulary fits, else uint32; EOS after every
document) plus the document offsets, under ``data.cache_dir`` in a folder named by a hash
of the files (path, size, mtime), the tokenizer and the format version: the next run
with the same inputs starts at once, a changed file or tokenizer builds a new cache.
The token file is memory-mapped, so a corpus larger than memory trains the same way.

Held-out documents (``data.eval_fraction`` of them, chosen by a hash of the document's
file and index, so the choice does not depend on file order) never share a window with
training. Training samples are the split's tokens cut into windows of ``seq_len + 1``;
``DataBundle`` addresses them by (step, micro-batch) through a seeded permutation per
epoch, so a resume and every process layout read the same tokens.

Empty documents, rows that are not objects or lack the text, undecodable and unreadable
files are skipped and counted (``stats``), like the LLaVA reader's bad rows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from moe_vlm.errors import DataError

FORMAT_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
STAT_KEYS = ("skipped_empty_doc", "skipped_not_object", "skipped_no_text", "skipped_invalid_json",
             "skipped_undecodable_file", "skipped_unreadable_file")


def default_cache_dir() -> Path:
    """``$MOE_VLM_CACHE`` or ``~/.cache/moe_vlm``, then ``tokens/``."""
    return Path(os.environ.get("MOE_VLM_CACHE", Path.home() / ".cache" / "moe_vlm")) / "tokens"


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and (p / "dataset_info.json").is_file() and (p / "state.json").is_file()


def _is_corpus_entry(f: Path) -> bool:
    """A file with a corpus suffix, or a saved ``datasets`` folder."""
    return (f.is_file() and f.suffix in SUFFIXES) or _is_saved_dataset(f)


def discover(path: str, key: str = "data.path") -> list[Path]:
    """The corpus files (and saved ``datasets`` folders) ``path`` names, sorted; a
    ``DataError`` naming ``key`` when there are none."""
    p = Path(path).expanduser()
    if _is_saved_dataset(p):
        return [p]
    if p.is_file():
        found = [p]
    else:
        found = p.rglob("*") if p.is_dir() else map(Path, glob.glob(str(p), recursive=True))
        found = [f for f in found if _is_corpus_entry(f)]
    saved = {f for f in found if f.is_dir()}  # a saved dataset's own .json files are not documents
    found = sorted({f.resolve() for f in found if f in saved or saved.isdisjoint(f.parents)})
    bad = [f for f in found if f.is_file() and f.suffix not in SUFFIXES]
    if bad:
        raise DataError(f"{key}: {bad[0]}: unsupported suffix {bad[0].suffix!r}; use "
                        f"{', '.join(SUFFIXES)} or a datasets folder saved with save_to_disk")
    if not found:
        raise DataError(f"{key}: no {', '.join(SUFFIXES)} files (or saved datasets) at {path}")
    return found


def _texts(f: Path, text_key: str, stats: dict[str, int]) -> Iterator[str]:
    """The documents of one file; what cannot be used is counted in ``stats``."""
    def row_text(row: Any) -> Optional[str]:
        if not isinstance(row, dict):
            stats["skipped_not_object"] += 1
            return None
        t = row.get(text_key)
        if not isinstance(t, str):
            stats["skipped_no_text"] += 1
            return None
        return t

    try:
        if _is_saved_dataset(f):
            import datasets

            for row in datasets.load_from_disk(str(f)):
                t = row_text(row)
                if t is not None:
                    yield t
        elif f.suffix not in (".jsonl", ".json", ".parquet"):  # .txt, and stdlib's .py
            yield f.read_bytes().decode("utf-8")
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            if text_key not in table.column_names:
                stats["skipped_no_text"] += table.num_rows
                return
            for t in table.column(text_key).to_pylist():
                if isinstance(t, str):
                    yield t
                else:
                    stats["skipped_no_text"] += 1
        elif f.suffix == ".json" and (raw := f.read_bytes()).lstrip().startswith(b"["):
            for row in json.loads(raw):
                t = row_text(row)
                if t is not None:
                    yield t
        else:  # .jsonl (and a .json of one object per line)
            with open(f, "rb") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        stats["skipped_invalid_json"] += 1
                        continue
                    t = row_text(row)
                    if t is not None:
                        yield t
    except UnicodeDecodeError:
        stats["skipped_undecodable_file"] += 1
    except (OSError, ValueError) as e:  # unreadable, or a .json list / parquet that does not parse
        if isinstance(e, json.JSONDecodeError):
            stats["skipped_invalid_json"] += 1
        else:
            stats["skipped_unreadable_file"] += 1


def _tokenize_file(args: tuple[Path, str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Worker: (tokens with EOS after each document, document lengths, stats)."""
    f, text_key, tokenizer = args
    stats = dict.fromkeys(STAT_KEYS, 0)
    ids: list[int] = []
    lengths: list[int] = []
    for text in _texts(f, text_key, stats):
        if not text.strip():
            stats["skipped_empty_doc"] += 1
            continue
        doc = tokenizer.encode(text) + [tokenizer.eos_id]
        ids += doc
        lengths.append(len(doc))
    return np.asarray(ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64), stats


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What makes two tokenizers give the same ids: the byte tokenizer's fixed table, a
    BPE's or Hugging Face tokenizer's full serialisation."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is None:
        return f"{type(tokenizer).__name__}/{tokenizer.vocab_size}"
    backend = getattr(inner, "backend_tokenizer", inner)
    if hasattr(backend, "to_str"):
        text = backend.to_str()
    else:  # a slow HF tokenizer: its vocabulary
        text = json.dumps(sorted(inner.get_vocab().items()))
    return f"{type(tokenizer).__name__}/" + hashlib.sha256(text.encode()).hexdigest()


def cache_key(files: Sequence[Path], tokenizer: Any, text_key: str) -> str:
    """Hash of the format version, the tokenizer, the text key and each file's path,
    size and mtime (a saved dataset: its folder's files)."""
    entries = []
    for f in files:
        for g in (sorted(f.rglob("*")) if f.is_dir() else [f]):
            if g.is_file():
                st = g.stat()
                entries.append([str(g), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": FORMAT_VERSION, "tok": tokenizer_fingerprint(tokenizer),
                       "key": text_key, "files": entries})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_cache(files: Sequence[Path], tokenizer: Any, text_key: str, cache_dir: Path,
                workers: int = 0, progress: bool = True) -> Path:
    """The cache folder for these inputs, tokenising them first if it does not exist yet:
    ``tokens.bin`` [T], ``doc_offsets.npy`` [n_docs + 1], ``doc_files.npy`` [n_docs]
    (index into ``files``) and ``meta.json``. Written to a temporary folder and renamed,
    so a killed build leaves no half cache."""
    out = Path(cache_dir) / cache_key(files, tokenizer, text_key)
    if (out / "meta.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab = int(tokenizer.vocab_size)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        stats = dict.fromkeys(STAT_KEYS, 0)
        offsets, doc_files, n_tok = [0], [], 0
        n_workers = workers or min(len(files), os.cpu_count() or 1)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(files), desc="tokenize", unit="file", dynamic_ncols=True)
        jobs = [(f, text_key, tokenizer) for f in files]
        with open(tmp / "tokens.bin", "wb") as fh:
            if n_workers > 1:
                with ProcessPoolExecutor(n_workers) as pool:
                    results = pool.map(_tokenize_file, jobs, chunksize=max(1, len(jobs) // (8 * n_workers)))
                    n_tok = _consume(results, fh, dtype, offsets, doc_files, stats, bar, n_tok)
            else:
                n_tok = _consume(map(_tokenize_file, jobs), fh, dtype, offsets, doc_files, stats, bar, n_tok)
        if bar is not None:
            bar.close()
        if n_tok == 0:
            raise DataError(f"data.path: no usable document in {len(files)} file(s) "
                            f"(first: {files[0]}); skipped: " +
                            ", ".join(f"{k}={v}" for k, v in stats.items() if v))
        np.save(tmp / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(tmp / "doc_files.npy", np.asarray(doc_files, dtype=np.int64))
        meta = {"version": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "n_tokens": n_tok,
                "n_docs": len(doc_files), "files": [str(f) for f in files], "stats": stats,
                "tokenizer": tokenizer_fingerprint(tokenizer), "text_key": text_key}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:  # another process built it meanwhile: keep theirs
            if not (out / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _consume(results: Any, fh: Any, dtype: Any, offsets: list[int], doc_files: list[int],
             stats: dict[str, int], bar: Any, n_tok: int) -> int:
    for i, (ids, lengths, st) in enumerate(results):
        fh.write(ids.astype(dtype).tobytes())
        for n in lengths.tolist():
            offsets.append(offsets[-1] + n)
            doc_files.append(i)
        n_tok += int(ids.size)
        for k, v in st.items():
            stats[k] += v
        if bar is not None:
            bar.update(1)
    return n_tok


def held_out(doc_files: np.ndarray, files: Sequence[str], fraction: float,
             eval_files: Optional[set[str]] = None) -> np.ndarray:
    """Boolean [n_docs]: is the document held out? ``eval_files`` (paths) holds out whole
    files; otherwise a hash of (file, index within the file) picks ``fraction`` of them."""
    if eval_files is not None:
        return np.array([files[i] in eval_files for i in doc_files.tolist()], dtype=bool)
    out = np.zeros(len(doc_files), dtype=bool)
    seen: dict[int, int] = {}  # file -> documents of it so far
    for j, fi in enumerate(doc_files.tolist()):
        k = seen[fi] = seen.get(fi, -1) + 1  # this document's index within its file
        h = hashlib.sha256(f"{Path(files[fi]).name}/{k}".encode()).digest()
        out[j] = int.from_bytes(h[:8], "little") < fraction * 2**64
    return out


class TokenWindows:
    """Map-style windows of ``seq_len + 1`` tokens over the documents ``docs`` of a token
    cache, concatenated in order: sample ``i`` -> ``input_ids`` and ``labels`` [seq_len].
    Reads only the slices a window needs from the memory map. With ``doc_ids`` a sample
    also carries ``doc_ids`` [seq_len]: the window-local index of each input's document
    (``data.doc_mask``)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray, seq_len: int,
                 limit: Optional[int] = None, doc_ids: bool = False):
        self.tokens, self.seq_len, self.doc_ids = tokens, seq_len, doc_ids
        self.starts = offsets[docs]  # [n] token start of each kept document
        lengths = offsets[docs + 1] - self.starts
        self.cum = np.concatenate([[0], np.cumsum(lengths)])  # [n + 1] virtual positions
        n = max(0, (int(self.cum[-1]) - 1) // seq_len)
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        lo, hi = i * self.seq_len, i * self.seq_len + self.seq_len + 1  # virtual [lo, hi)
        parts, pos = [], lo
        d = int(np.searchsorted(self.cum, lo, side="right")) - 1
        while pos < hi:
            take = min(hi, int(self.cum[d + 1])) - pos
            s = int(self.starts[d]) + pos - int(self.cum[d])
            parts.append(np.asarray(self.tokens[s:s + take], dtype=np.int64))
            pos += take
            d += 1
        ids = torch.from_numpy(np.concatenate(parts))  # [seq_len + 1]
        out = {"input_ids": ids[:-1], "labels": ids[1:]}
        if self.doc_ids:  # which document (0, 1, ... within the window) each input belongs to
            seg = np.repeat(np.arange(len(parts)), [len(p) for p in parts])  # [seq_len + 1]
            out["doc_ids"] = torch.from_numpy(seg[:-1])
        return out


class TextCorpus:
    """A built cache opened for reading: the memory-mapped tokens, the document table, and
    the train / held-out windows."""

    def __init__(self, cache: Path, seq_len: int, eval_fraction: float, n_eval: int,
                 eval_files: Optional[set[str]] = None, doc_ids: bool = False):
        meta = json.loads((cache / "meta.json").read_text())
        self.meta, self.stats = meta, {k: v for k, v in meta["stats"].items() if v}
        tokens = np.memmap(cache / "tokens.bin", dtype=meta["dtype"], mode="r")
        offsets = np.load(cache / "doc_offsets.npy")
        doc_files = np.load(cache / "doc_files.npy")
        ev = held_out(doc_files, meta["files"], eval_fraction, eval_files)
        if not ev.any():  # tiny corpora: hold out the last document
            ev[-1] = True
        if ev.all():
            raise DataError(f"data.eval_fraction: every one of the {len(ev)} documents is held "
                            "out; lower it or add documents")
        self.eval_docs, self.train_docs = np.flatnonzero(ev), np.flatnonzero(~ev)
        self.train = TokenWindows(tokens, offsets, self.train_docs, seq_len, doc_ids=doc_ids)
        self.eval = TokenWindows(tokens, offsets, self.eval_docs, seq_len, limit=n_eval, doc_ids=doc_ids)
        if len(self.train) == 0 or len(self.eval) == 0:
            raise DataError(f"data.path: the corpus ({meta['n_tokens']} tokens in "
                            f"{meta['n_docs']} documents) is too small for one training and one "
                            f"held-out window of data.seq_len={seq_len} + 1 tokens")


def stdlib_files() -> tuple[list[Path], set[str]]:
    """The running interpreter's standard library sources (``*.py``, no site-packages),
    and the fixed held-out files: 1 in 32 by a hash of the path relative to the library."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = sorted(f.resolve() for f in root.rglob("*.py")
                   if "site-packages" not in f.parts and "dist-packages" not in f.parts)
    if not files:
        raise DataError(f"data=stdlib: no standard library sources under {root}")
    held = {str(f) for f in files
            if hashlib.sha256(str(f.relative_to(root)).encode()).digest()[0] < 8}
    return files, held


def corpus_sample(files: Sequence[Path], eval_files: Optional[set[str]], text_key: str,
                  max_bytes: int = 5_000_000) -> Iterator[str]:
    """Documents to train a BPE on: the training files in order, up to ``max_bytes`` of
    text (held-out files excluded, so the tokenizer has not seen them)."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    seen = 0
    for f in files:
        if eval_files is not None and str(f) in eval_files:
            continue
        for text in _texts(f, text_key, stats):
            yield text
            seen += len(text)
            if seen >= max_bytes:
                return
