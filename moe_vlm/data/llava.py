"""LLaVA-format conversation data (JSON list or JSONL) -> samples in the ``sample.py`` format.

Shapes: S tokens (<= ``seq_len``), N images of the row (may be 0), H = W = ``image_size``.

Rows look like ``{"id": ..., "image": "a.png" | ["a.png", ...] | absent,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``
and are rendered by ``chat.render_conversation``. A ``.json`` file holds a JSON list of
rows (or, if it does not start with ``[``, one row per line like ``.jsonl``); a ``.jsonl``
file holds one JSON object per line, blank lines ignored. Any other suffix (``.txt``, ...)
is refused with a ``DataError`` naming the supported ones: the suffix says how to parse
the file, and guessing from content would silently accept a wrong file.

Map-style files are loaded with ``datasets.load_dataset("json")`` (rows kept as Arrow in
memory, not as millions of Python objects): it infers the schema and stores fields whose
type varies between rows (``image`` as a string in one row and a list in another, a
malformed ``conversations``) as JSON; the datasets cache goes to a temporary directory
that is deleted again, never to ``~/.cache``. ``datasets`` refuses a whole file for one
line that is not JSON, not UTF-8, or not an object; then the rows are read here
(``json_rows._read_rows``) and the readable ones handed to ``datasets`` as a clean copy, so those
lines become bad rows like any other. Streaming reads the file with ``_read_rows`` itself.

Real data has bad rows (a line that is not JSON or not an object, a missing or corrupt
image, an image outside ``data.image_dir``, a conversation longer than the context,
broken structure). They are skipped, not fatal: each bad row is counted once in
``stats`` and warned about once (``BadRowWarning``), so a long run survives them and the
run's log says how many were lost and why. A file with no usable row at all raises
``NoUsableRows`` (a ``DataError``) naming the file, the counts and what to change.

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
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from moe_vlm.config.schema import ConfigError, DataConfig
from moe_vlm.data.chat import MalformedRow, render_conversation
from moe_vlm.data.images import ImageError, load_image
from moe_vlm.data.json_rows import (MissingDataPath, _first_byte, _load_rows, _read_rows, _Skip,
                                    check_path)
from moe_vlm.errors import DataError

SUFFIXES = (".json", ".jsonl")
# Always in ``stats`` (0 if none), so a run's log shows them side by side.
STAT_KEYS = ("skipped_missing_image", "skipped_corrupt_image", "skipped_too_long",
             "skipped_malformed")
# Rarer, file-level problems: in ``stats`` only once one occurs, so clean logs stay short.
EXTRA_STAT_KEYS = ("skipped_invalid_json", "skipped_not_object", "skipped_outside_image_dir")
# What to change when every row was skipped for one of these reasons.
_HINTS = {
    "skipped_invalid_json": "a .json file holds a JSON list of row objects, a .jsonl file "
                            "one JSON object per line, both in UTF-8",
    "skipped_not_object": "each row must be a JSON object ({...})",
    "skipped_outside_image_dir": "the images lie outside data.image_dir; set "
                                 "data.allow_outside_image_dir=true if that is intended",
    "skipped_missing_image": "image paths are relative to data.image_dir; check it",
    "skipped_too_long": "the conversations do not fit data.seq_len; raise it",
}


class BadRowWarning(UserWarning):
    """A row that was skipped; the message names the file, row, id and reason."""


class NoUsableRows(DataError):
    """Every row of the (selected part of the) file is bad, or there are none."""


def _image_paths(row: dict) -> list[str]:
    image = row.get("image")
    if image is None:
        return []
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p and "\0" not in p
                                              for p in paths):
        raise MalformedRow(f"'image' must be a path or a list of paths, got {image!r:.80}")
    return paths


class LlavaDataset:
    """LLaVA conversations -> samples; bad rows skipped and counted in ``stats``.

    ``start``/``stop`` select rows ``[start, stop)`` of the file (file order), e.g. to
    hold out the first or last rows for eval. ``key`` is the config key the file came
    from, named in errors. Image paths that leave ``image_dir`` (``../``, absolute, a
    symlink out) are skipped unless ``allow_outside_image_dir``: a dataset file from
    elsewhere must not make a run read arbitrary files.
    """

    def __init__(self, path: str | Path, image_dir: str | Path | None, tokenizer: Any,
                 n_image_tokens: int, image_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], seq_len: int, streaming: bool = False, *,
                 start: int = 0, stop: Optional[int] = None, key: str = "data.path",
                 allow_outside_image_dir: bool = False):
        self.path, self.key = check_path(key, path), key
        if self.path.suffix not in SUFFIXES:
            raise DataError(f"{key}: {self.path}: unsupported suffix {self.path.suffix!r}; "
                            "use .json (a JSON list of rows) or .jsonl (one JSON object per "
                            "line), renaming the file if it holds one of those")
        self.image_dir = None if image_dir is None else check_path("data.image_dir", image_dir,
                                                                   want_dir=True)
        self._image_root = None if image_dir is None else self.image_dir.resolve()
        self.allow_outside_image_dir = allow_outside_image_dir
        self.tokenizer, self.n_image_tokens, self.seq_len = tokenizer, n_image_tokens, seq_len
        self.image_size, self.image_mean, self.image_std = image_size, list(image_mean), list(image_std)
        self.streaming = streaming
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._bad: dict[int, str] = {}  # row number -> reason, so each bad row counts once
        self._start, self._stop = start, stop
        if not _first_byte(self.path):
            raise NoUsableRows(f"{self._where}: no rows (the file is empty or only blank lines)")
        # Rows that could not be read at all (map-style), by row number; shared by views.
        self._unreadable: dict[int, _Skip] = {}
        if streaming:
            self._rows, self._rownums = None, None
            return
        ds, self._unreadable = _load_rows(self.path, self._where)
        n_rows = len(self._unreadable) if ds is None else len(ds)
        self._rows, self._rownums = ds, list(range(n_rows))[start:stop]  # position -> row number
        if ds is None:  # every row unreadable: count them all and say why
            for n in self._rownums:
                self._try(n, self._row(n))
            raise self._no_usable_rows(len(self._rownums))
        if self.image_dir is None and "image" in ds.column_names:
            images = ds.select(self._rownums)["image"]
            if any(i not in (None, "", []) for i in images):
                raise ConfigError(f"data.image_dir: rows of {self.path} reference images; "
                                  "set the folder their paths are relative to")

    @property
    def _where(self) -> str:
        return f"{self.key}: {self.path}"

    def _no_usable_rows(self, n: int) -> NoUsableRows:
        """The error for a selection without a usable row: counts, first reason, hints."""
        sel = "" if (self._start, self._stop) == (0, None) else \
            f" in [{self._start}, {'end' if self._stop is None else self._stop})"
        if n == 0:
            return NoUsableRows(f"{self._where}: no rows{sel}")
        counts = ", ".join(f"{k}={v}" for k, v in self.stats.items() if v)
        first = min(self._bad) if self._bad else None
        msg = f"{self._where}: none of the {n} rows{sel} is usable; skipped: {counts}"
        if first is not None:
            msg += f" (first: row {first}: {self._bad[first]})"
        hints = [h for k, h in _HINTS.items() if self.stats.get(k)]
        return NoUsableRows("; ".join([msg, *hints]))

    # -- one row -> one sample ------------------------------------------------------

    def _image_file(self, p: str) -> Path:
        """``image_dir / p``; ``_Skip`` if it resolves outside ``image_dir`` (unless allowed)."""
        path = self.image_dir / p  # type: ignore[operator]
        if self.allow_outside_image_dir:
            return path
        try:
            inside = path.resolve().is_relative_to(self._image_root)  # type: ignore[arg-type]
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise _Skip("skipped_missing_image", f"image {p!r} cannot be resolved: {e}") from None
        if not inside:
            raise _Skip("skipped_outside_image_dir",
                        f"image {p!r} lies outside data.image_dir {self.image_dir} "
                        "(see data.allow_outside_image_dir)")
        return path

    def _sample(self, row: dict) -> dict[str, torch.Tensor]:
        """Render and load one row, or raise ``_Skip`` with the stats key and reason."""
        try:
            paths = _image_paths(row)
            ids, labels, answers = render_conversation(row.get("conversations"), self.tokenizer,
                                                       len(paths), self.n_image_tokens)
        except MalformedRow as e:
            raise _Skip("skipped_malformed", f"malformed: {e}") from None
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") in the text
            raise _Skip("skipped_invalid_json", f"not valid Unicode text ({e.reason})") from None
        if len(ids) > self.seq_len:
            raise _Skip("skipped_too_long", f"too long: {len(ids)} tokens > seq_len {self.seq_len}")
        if paths and self.image_dir is None:
            raise ConfigError(f"data.image_dir: rows of {self.path} reference images; "
                              "set the folder their paths are relative to")
        images = []
        for p in paths:
            try:
                images.append(load_image(self._image_file(p), self.image_size,
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
        self.stats[skip.stat] = self.stats.get(skip.stat, 0) + 1
        rid = row.get("id") if isinstance(row, dict) else None
        warnings.warn(f"{self.path.name} row {rownum} (id={rid!r}) skipped: {skip.reason}",
                      BadRowWarning, stacklevel=3)

    def _row(self, rownum: int) -> Any:
        """Map-style row ``rownum``: a dict, or the ``_Skip`` of a row that could not be read."""
        skip = self._unreadable.get(rownum)
        return skip if skip is not None else self._rows[rownum]  # type: ignore[index]

    def _try(self, rownum: int, row: Any) -> Optional[dict[str, torch.Tensor]]:
        """The sample of a row, or ``None`` (counted once) if it is bad; ``row`` may be
        the ``_Skip`` of a row that could not be read."""
        if rownum in self._bad:
            return None
        try:
            if isinstance(row, _Skip):
                raise row
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
            raise self._no_usable_rows(0)
        for step in range(n):
            rownum = self._rownums[(index + step) % n]  # type: ignore[index]
            if rownum in self._bad:
                continue
            sample = self._try(rownum, self._row(rownum))
            if sample is not None:
                return sample
        raise self._no_usable_rows(n)

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
            new._rows, new.streaming = {n: r for n, r in rows}, False
            new._rownums = [n for n, _ in rows]
            new.stats, new._bad = dict(self.stats), dict(self._bad)
            return new.compact()
        good = [p for p, n in enumerate(self._rownums)  # type: ignore[arg-type]
                if self._try(n, self._row(n)) is not None]
        if not good:
            raise self._no_usable_rows(len(self))
        new = self._subset(good)
        new.stats, new._bad = dict(self.stats), dict(self._bad)
        return new

    # -- iteration (both modes) ---------------------------------------------------------

    def _iter_rows(self) -> Iterator[tuple[int, Any]]:
        """``(row number, row)`` in file order over the selected rows; a row that could
        not be read is a ``_Skip``."""
        if self._rows is not None:
            for n in self._rownums:  # type: ignore[union-attr]
                yield n, self._row(n)
            return
        for n, row in enumerate(_read_rows(self.path, self._where)):
            if self._stop is not None and n >= self._stop:
                return
            if n >= self._start:
                yield n, row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The good samples in file order (one pass, no wrap-around). A pass without a
        single good sample raises ``NoUsableRows`` rather than ending quietly, so a
        consumer that cycles epochs cannot spin forever (not per ``DataLoader`` worker,
        whose share may legitimately be empty)."""
        info = torch.utils.data.get_worker_info()
        n_rows, any_good = 0, False
        for n, row in self._iter_rows():
            if info is not None and n % info.num_workers != info.id:
                continue
            n_rows += 1
            sample = self._try(n, row)
            if sample is not None:
                any_good = True
                yield sample
        if not any_good and info is None:
            raise self._no_usable_rows(n_rows)


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
    check_path("data.path", cfg.path)
    if cfg.eval_path is not None:
        check_path("data.eval_path", cfg.eval_path)
    if cfg.image_dir is not None:
        check_path("data.image_dir", cfg.image_dir, want_dir=True)

    def make(path: str, streaming: bool, key: str = "data.path", **kw: Any) -> LlavaDataset:
        return LlavaDataset(path, cfg.image_dir, tokenizer, n_image_tokens, image_size,
                            image_mean, image_std, cfg.seq_len, streaming, key=key,
                            allow_outside_image_dir=cfg.allow_outside_image_dir, **kw)

    n_eval = cfg.n_eval_samples
    if cfg.eval_path is not None:
        return (make(cfg.path, cfg.streaming),
                make(cfg.eval_path, False, key="data.eval_path").compact())
    if cfg.streaming:
        return make(cfg.path, True, start=n_eval), make(cfg.path, True, stop=n_eval).compact()
    full = make(cfg.path, False)
    n = len(full)
    if n_eval >= n:
        raise ConfigError(f"data.n_eval_samples: {n_eval} held-out rows leave none of the {n} "
                          f"rows of {cfg.path} for training; lower it or set data.eval_path")
    return full._subset(range(n - n_eval)), full._subset(range(n - n_eval, n)).compact()


__all__ = ["BadRowWarning", "LlavaDataset", "MissingDataPath", "NoUsableRows",
           "build_llava_sources", "check_path", "STAT_KEYS", "EXTRA_STAT_KEYS"]
