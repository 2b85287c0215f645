"""LLaVA-format conversation data (JSON list or JSONL) -> samples in the ``sample.py`` format.

Shapes: S tokens (<= ``seq_len``), N images of the row (may be 0), H = W = ``image_size``.

Rows look like ``{"id": ..., "image": "a.png" | ["a.png", ...] | absent,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``
and are rendered by ``chat.render_conversation``. Files are read with
``datasets.load_dataset("json")``: it infers the schema and stores fields whose type
varies between rows (``image`` as a string in one row and a list in another, a malformed
``conversations``) as JSON, so one odd row does not break loading; the datasets cache
goes to a temporary directory that is deleted again, never to ``~/.cache``.

Real data has bad rows (a missing or corrupt image, a conversation longer than the
context, broken structure). They are skipped, not fatal: each bad row is counted once in
``stats`` and warned about once (``BadRowWarning``), so a long run survives them and the
run's log says how many were lost and why.

Two modes:

- map-style (default): the rows are loaded into memory; ``len`` is the number of rows,
  ``ds[i]`` is the sample of row ``i % len`` or, if that row is bad, of the next good row
  (wrapping), so any index (also past one epoch) gives a sample and indices stay
  deterministic, which is what step-addressed training batches need.
- streaming: rows are read lazily in file order; ``iter(ds)`` yields the good samples.
  Under a multi-worker ``DataLoader`` each worker takes every ``num_workers``-th row.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from moe_vlm.config.schema import ConfigError, DataConfig
from moe_vlm.data.chat import MalformedRow, render_conversation
from moe_vlm.data.images import ImageError, load_image

SUFFIXES = (".json", ".jsonl")
STAT_KEYS = ("skipped_missing_image", "skipped_corrupt_image", "skipped_too_long",
             "skipped_malformed")


class BadRowWarning(UserWarning):
    """A row that was skipped; the message names the file, row, id and reason."""


class NoUsableRows(ValueError):
    """Every row of the (selected part of the) file is bad."""


class _Skip(Exception):
    def __init__(self, stat: str, reason: str):
        super().__init__(reason)
        self.stat, self.reason = stat, reason


def _load_json_rows(path: Path, streaming: bool) -> Any:
    """``datasets`` JSON loader, cache in a temporary directory that is removed again.

    Map-style data is kept in memory (``keep_in_memory``) so nothing on disk is needed
    after loading; a streaming dataset reads the source file itself on iteration.
    Local files need no network, so no offline switch is set."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="moe_vlm_datasets_") as cache:
        return datasets.load_dataset("json", data_files=str(path), split="train",
                                     streaming=streaming, cache_dir=cache,
                                     keep_in_memory=None if streaming else True)


def _iter_stream_rows(ds: Any) -> Iterator[dict]:
    """Rows of a streaming dataset as plain Python objects.

    Read at the Arrow level: a column that ``datasets`` stored as JSON (because its
    type varies) has the Arrow JSON type and is decoded here; without this, a streamed
    ``.json`` list file (whose schema is unknown up front) would yield JSON strings."""
    import pyarrow as pa

    for table in ds.with_format("arrow").iter(batch_size=256):
        cols = {}
        for name, col in zip(table.column_names, table.columns):
            values = col.to_pylist()
            if isinstance(col.type, pa.JsonType):
                values = [None if v is None else json.loads(v) for v in values]
            cols[name] = values
        for i in range(table.num_rows):
            yield {name: values[i] for name, values in cols.items()}


def _image_paths(row: dict) -> list[str]:
    image = row.get("image")
    if image is None:
        return []
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise MalformedRow(f"'image' must be a path or a list of paths, got {image!r:.80}")
    return paths


class LlavaDataset:
    """LLaVA conversations -> samples; bad rows skipped and counted in ``stats``.

    ``start``/``stop`` select rows ``[start, stop)`` of the file (file order), e.g. to
    hold out the first or last rows for eval.
    """

    def __init__(self, path: str | Path, image_dir: str | Path | None, tokenizer: Any,
                 n_image_tokens: int, image_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], seq_len: int, streaming: bool = False, *,
                 start: int = 0, stop: Optional[int] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such conversation file: {self.path}")
        if self.path.suffix not in SUFFIXES:
            raise ValueError(f"{self.path}: expected a {' or '.join(SUFFIXES)} file")
        if image_dir is not None and not Path(image_dir).is_dir():
            raise FileNotFoundError(f"data.image_dir: no such directory: {image_dir}")
        self.image_dir = None if image_dir is None else Path(image_dir)
        self.tokenizer, self.n_image_tokens, self.seq_len = tokenizer, n_image_tokens, seq_len
        self.image_size, self.image_mean, self.image_std = image_size, list(image_mean), list(image_std)
        self.streaming = streaming
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._bad: dict[int, str] = {}  # row number -> reason, so each bad row counts once
        self._start, self._stop = start, stop
        ds = _load_json_rows(self.path, streaming)
        if streaming:
            self._stream, self._rows, self._rownums = ds, None, None
        else:
            self._stream, self._rows = None, ds
            self._rownums = list(range(len(ds)))[start:stop]  # position -> row number
            if self.image_dir is None and "image" in ds.column_names:
                images = ds.select(self._rownums)["image"]
                if any(i not in (None, "", []) for i in images):
                    raise ConfigError(f"data.image_dir: rows of {self.path} reference images; "
                                      "set the folder their paths are relative to")

    # -- one row -> one sample ------------------------------------------------------

    def _sample(self, row: dict) -> dict[str, torch.Tensor]:
        """Render and load one row, or raise ``_Skip`` with the stats key and reason."""
        try:
            paths = _image_paths(row)
            ids, labels, answers = render_conversation(row.get("conversations"), self.tokenizer,
                                                       len(paths), self.n_image_tokens)
        except MalformedRow as e:
            raise _Skip("skipped_malformed", f"malformed: {e}") from None
        if len(ids) > self.seq_len:
            raise _Skip("skipped_too_long", f"too long: {len(ids)} tokens > seq_len {self.seq_len}")
        if paths and self.image_dir is None:
            raise ConfigError(f"data.image_dir: rows of {self.path} reference images; "
                              "set the folder their paths are relative to")
        images = []
        for p in paths:
            try:
                images.append(load_image(self.image_dir / p, self.image_size,  # type: ignore[operator]
                                         self.image_mean, self.image_std))  # [3, H, W]
            except ImageError as e:
                raise _Skip(f"skipped_{e.kind}_image", str(e)) from None
        s = self.image_size
        pixels = torch.stack(images) if images else torch.zeros(0, 3, s, s)  # [N, 3, H, W]
        return {"input_ids": torch.tensor(ids, dtype=torch.long),  # [S]
                "labels": torch.tensor(labels, dtype=torch.long),  # [S]
                "answer_ids": torch.tensor(answers, dtype=torch.long),  # [S]
                "pixel_values": pixels}

    def _mark_bad(self, rownum: int, row: Any, skip: _Skip) -> None:
        if rownum in self._bad:
            return
        self._bad[rownum] = skip.reason
        self.stats[skip.stat] += 1
        rid = row.get("id") if isinstance(row, dict) else None
        warnings.warn(f"{self.path.name} row {rownum} (id={rid!r}) skipped: {skip.reason}",
                      BadRowWarning, stacklevel=3)

    def _try(self, rownum: int, row: dict) -> Optional[dict[str, torch.Tensor]]:
        if rownum in self._bad:
            return None
        try:
            return self._sample(row)
        except _Skip as e:
            self._mark_bad(rownum, row, e)
            return None

    # -- map-style ------------------------------------------------------------------

    def _need_map(self) -> None:
        if self._rows is None:
            raise TypeError(f"{self.path}: a streaming dataset has no length or index; iterate it")

    def __len__(self) -> int:
        self._need_map()
        return len(self._rownums)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample of row ``index % len``, or of the next good row after it (wrapping)."""
        n = len(self)
        if n == 0:
            raise NoUsableRows(f"{self.path}: no rows selected")
        for step in range(n):
            rownum = self._rownums[(index + step) % n]  # type: ignore[index]
            if rownum in self._bad:
                continue
            sample = self._try(rownum, self._rows[rownum])  # type: ignore[index]
            if sample is not None:
                return sample
        raise NoUsableRows(f"{self.path}: none of the {n} rows is usable; skipped: {self.stats}")

    def _subset(self, positions: Sequence[int]) -> "LlavaDataset":
        """A map-style view of some rows, sharing the loaded data, with its own stats."""
        self._need_map()
        new = copy.copy(self)
        new._rownums = [self._rownums[p] for p in positions]  # type: ignore[index]
        new.stats, new._bad = dict.fromkeys(STAT_KEYS, 0), {}
        return new

    def compact(self) -> "LlavaDataset":
        """Check every row now and keep only the good ones: ``len`` is then the number
        of usable samples and no index maps to a duplicate. Meant for eval sets, where
        a duplicated sample would skew accuracy; costs one pass over the images."""
        if self._rows is None:
            rows = list(self._iter_rows())
            new = copy.copy(self)
            new._stream, new._rows, new.streaming = None, {n: r for n, r in rows}, False
            new._rownums = [n for n, _ in rows]
            new.stats, new._bad = dict(self.stats), dict(self._bad)
            return new.compact()
        good = [p for p, n in enumerate(self._rownums)  # type: ignore[arg-type]
                if self._try(n, self._rows[n]) is not None]
        if not good:
            raise NoUsableRows(f"{self.path}: none of the {len(self)} rows is usable; "
                               f"skipped: {self.stats}")
        new = self._subset(good)
        new.stats, new._bad = dict(self.stats), dict(self._bad)
        return new

    # -- iteration (both modes) ---------------------------------------------------------

    def _iter_rows(self) -> Iterator[tuple[int, dict]]:
        """``(row number, row)`` in file order over the selected rows."""
        if self._rows is not None:
            for n in self._rownums:  # type: ignore[union-attr]
                yield n, self._rows[n]
            return
        for n, row in enumerate(_iter_stream_rows(self._stream)):
            if self._stop is not None and n >= self._stop:
                return
            if n >= self._start:
                yield n, row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The good samples in file order (one pass, no wrap-around)."""
        info = torch.utils.data.get_worker_info()
        for n, row in self._iter_rows():
            if info is not None and n % info.num_workers != info.id:
                continue
            sample = self._try(n, row)
            if sample is not None:
                yield sample


def build_llava_sources(cfg: DataConfig, tokenizer: Any, n_image_tokens: int, image_size: int,
                        image_mean: Sequence[float],
                        image_std: Sequence[float]) -> tuple[LlavaDataset, LlavaDataset]:
    """``(train, eval)`` for ``data.name=llava``.

    Eval comes from ``data.eval_path`` when set; otherwise ``data.n_eval_samples`` rows
    of ``data.path`` are held out of training: the last ones (map-style) or the first
    ones (streaming, where the end of the file is unknown up front). Eval is always
    map-style and compacted (only usable rows, so no duplicates skew its metrics).
    """
    if not cfg.path:
        raise ConfigError("data.path: data.name=llava needs a conversation JSON/JSONL file")
    for key, p in (("data.path", cfg.path), ("data.eval_path", cfg.eval_path)):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{key}: no such file: {p}")
    if cfg.image_dir is not None and not Path(cfg.image_dir).is_dir():
        raise FileNotFoundError(f"data.image_dir: no such directory: {cfg.image_dir}")

    def make(path: str, streaming: bool, **kw: Any) -> LlavaDataset:
        return LlavaDataset(path, cfg.image_dir, tokenizer, n_image_tokens, image_size,
                            image_mean, image_std, cfg.seq_len, streaming, **kw)

    n_eval = cfg.n_eval_samples
    if cfg.eval_path is not None:
        return make(cfg.path, cfg.streaming), make(cfg.eval_path, False).compact()
    if cfg.streaming:
        return make(cfg.path, True, start=n_eval), make(cfg.path, True, stop=n_eval).compact()
    full = make(cfg.path, False)
    n = len(full)
    if n_eval >= n:
        raise ConfigError(f"data.n_eval_samples: {n_eval} held-out rows leave none of the {n} "
                          f"rows of {cfg.path} for training; lower it or set data.eval_path")
    return full._subset(range(n - n_eval)), full._subset(range(n - n_eval, n)).compact()


__all__ = ["BadRowWarning", "LlavaDataset", "NoUsableRows", "build_llava_sources", "STAT_KEYS"]
