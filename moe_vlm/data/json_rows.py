"""Reading rows from a JSON / JSON Lines file that may be damaged: each line that is not
UTF-8, not JSON or not an object becomes a ``_Skip`` (counted by the reader) instead of
an exception, and a file ``datasets`` refuses as a whole is re-read line by line so only
its bad lines are lost. Used by the LLaVA reader (``moe_vlm.data.llava``)."""

from __future__ import annotations

import codecs
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

from moe_vlm.errors import DataError


class MissingDataPath(DataError, FileNotFoundError):
    """A configured data file or directory that does not exist; also a
    ``FileNotFoundError``, so callers that catch that keep working."""


class _Skip(Exception):
    def __init__(self, stat: str, reason: str):
        super().__init__(reason)
        self.stat, self.reason = stat, reason


def check_path(key: str, path: str | Path, want_dir: bool = False) -> Path:
    """``path`` as a ``Path`` if it is an existing file (or directory), else a
    ``DataError`` naming the config ``key``."""
    p, kind = Path(path), "directory" if want_dir else "file"
    if not p.exists():
        raise MissingDataPath(f"{key}: no such {kind}: {p}")
    if p.is_dir() != want_dir:
        raise DataError(f"{key}: {p} is a {'file' if want_dir else 'directory'}, not a {kind}")
    return p


def _first_byte(path: Path) -> bytes:
    """The first non-whitespace byte of the file (after a UTF-8 BOM), ``b""`` if none;
    reads only as far as it needs, so it is cheap on a large file."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            rest = chunk.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if rest:
                return rest[:1]
    return b""


def _parse_line(line: bytes, lineno: int) -> Any:
    """One JSONL line -> a row (a dict), or a ``_Skip`` saying why it is unusable."""
    try:
        row = json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        return _Skip("skipped_invalid_json", f"line {lineno}: not UTF-8 (byte {e.start})")
    except json.JSONDecodeError as e:
        return _Skip("skipped_invalid_json", f"line {lineno}: invalid JSON: {e}")
    return _check_object(row, f"line {lineno}")


def _check_object(row: Any, where: str) -> Any:
    """``row`` if it is a non-empty object, else a ``_Skip`` naming ``where`` it came from."""
    if not isinstance(row, dict):
        return _Skip("skipped_not_object", f"{where}: not a JSON object but {type(row).__name__} "
                                           f"{json.dumps(row)[:40]}")
    if not row:
        return _Skip("skipped_malformed", f"{where}: empty object")
    return row


def _read_rows(path: Path, where: str) -> Iterator[Any]:
    """The rows of a conversation file in order: a dict per usable row, a ``_Skip`` per
    line that is not UTF-8, not JSON or not a non-empty object (numbered like
    ``datasets`` numbers rows: blank lines do not count).

    A ``.json`` file starting with ``[`` is one JSON list, parsed whole (as ``datasets``
    does too); if it does not parse, no row can be trusted and a ``DataError`` (prefixed
    ``where``) says where. Everything else is read line by line, lazily."""
    if path.suffix == ".json" and _first_byte(path) == b"[":
        try:
            rows = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: not a valid JSON list of rows ({e}); fix it, or write it "
                            "as JSON Lines (.jsonl), where a broken line is only skipped") from None
        for i, row in enumerate(rows):
            yield _check_object(row, f"item {i}")
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _parse_line(line, lineno)


def _is_utf8(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8 (read in chunks: fast, little memory).
    Checked before ``datasets`` reads a file: pyarrow accepts invalid bytes inside
    strings and only fails when the row is read, mid-run."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _load_json_rows(path: Path) -> Any:
    """``datasets`` JSON loader (in memory), cache in a temporary directory that is
    removed again.

    Even for a local file, ``load_dataset`` counts a "download" with an HTTP HEAD request
    to the Hub (``datasets.load.increase_load_count``) unless
    ``datasets.config.HF_UPDATE_DOWNLOAD_COUNTS`` is off: a request leaving the machine
    that nobody asked for, and without a network a 3-5 s stall (DNS) on the first load.
    It is switched off for the call and restored after."""
    from unittest import mock

    import datasets

    with mock.patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False, create=True), \
            tempfile.TemporaryDirectory(prefix="moe_vlm_datasets_") as cache:
        return datasets.load_dataset("json", data_files=str(path), split="train",
                                     cache_dir=cache, keep_in_memory=True)


def _load_rows(path: Path, where: str) -> tuple[Any, dict[int, _Skip]]:
    """``(rows, unreadable)``: a ``datasets.Dataset`` with one row per row of the file,
    and the rows that could not be read, by row number (their entries in ``rows`` are empty).

    A clean file goes to ``datasets`` directly. If ``datasets`` refuses it (it refuses a
    whole file for one broken line) or it is not all UTF-8, ``_read_rows`` finds the bad
    rows and ``datasets`` loads a clean copy with an empty object in their place, so row
    numbers stay those of the file."""
    import datasets

    if _is_utf8(path):
        try:
            return _load_json_rows(path), {}
        except Exception:  # noqa: BLE001 - whatever it refused, _read_rows finds out below
            pass
    unreadable: dict[int, _Skip] = {}
    n = 0
    with tempfile.TemporaryDirectory(prefix="moe_vlm_clean_") as tmp:
        clean = Path(tmp) / "rows.jsonl"
        with open(clean, "wb") as f:
            for n, row in enumerate(_read_rows(path, where), 1):
                if not isinstance(row, _Skip):
                    try:  # a lone surrogate ("\ud800") is valid JSON but not text
                        f.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
                        continue
                    except UnicodeEncodeError as e:
                        row = _Skip("skipped_invalid_json", f"not valid Unicode text ({e.reason})")
                unreadable[n - 1] = row
                f.write(b"{}\n")
        if n == 0 or len(unreadable) == n:
            return None, unreadable  # nothing for datasets to load; the caller explains
        try:
            return _load_json_rows(clean), unreadable
        except datasets.exceptions.DatasetGenerationError as e:
            raise DataError(f"{where}: cannot be loaded: {e.__cause__ or e}") from e
