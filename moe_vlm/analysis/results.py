"""Collect run directories into one results table (pandas): one row per run.

A run directory is any directory under the root holding a ``summary.json`` or a
``config.yaml`` next to a ``metrics.jsonl`` / ``.hydra/`` (so a run that crashed before
writing its summary still appears). Each row has:

- ``run``: the directory relative to the root; ``status``: ``completed`` / ``failed`` /
  ``running`` from ``summary.json``, or ``no_summary`` when there is none (never started
  or killed before its first write), or ``invalid`` when one of its files has the wrong
  shape (``summary.json`` not an object or with mistyped fields, ``config.yaml`` not a
  mapping, a ``metrics.jsonl`` row that is not an object): such a row holds only ``run``,
  ``status`` and ``error`` (which file, what is wrong). Rows are never dropped.
- every scalar of ``summary.json`` (losses, parameter counts, ``tokens_seen``, ``steps``,
  ``wall_time_s``, ``error``, ...), plus derived columns: ``params_nonembedding``,
  ``params_active_nonembedding`` and ``compute`` (training FLOPs = ``flops_per_token`` x
  ``tokens_seen``);
- ``last_logged_step`` (from ``metrics.jsonl``: how far a partial run got);
- the run's config flattened to dotted keys (``moe.n_experts``, ``routing.top_k``, ...),
  from ``config.yaml`` (or the summary's copy, or Hydra's ``.hydra/config.yaml`` for a point
  that failed before training);
- ``overrides``: the Hydra overrides of the job, when it ran under Hydra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

SUMMARY_FIRST = ["run", "status", "final_eval_loss", "initial_eval_loss", "final_train_loss",
                 "eval_accuracy", "chance_accuracy", "params_total", "params_active",
                 "params_embedding", "params_nonembedding", "params_active_nonembedding",
                 "flops_per_token", "tokens_seen", "compute", "steps", "last_logged_step",
                 "wall_time_s", "error", "overrides"]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": value}``; lists become JSON strings (one cell)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def is_run_dir(p: Path) -> bool:
    if (p / "summary.json").is_file():
        return True
    return (p / "config.yaml").is_file() and ((p / "metrics.jsonl").is_file() or (p / ".hydra").is_dir())


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory at or under ``root`` (sorted; checkpoint folders skipped)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    found = [root] if is_run_dir(root) else []
    for p in sorted(root.rglob("*")):
        if p.is_dir() and p.name not in ("checkpoints", ".hydra") and is_run_dir(p):
            found.append(p)
    return found


# summary.json fields the table derives columns from or that plots and fits read: each
# must be a number (bools excluded) or null, else the row would crash arithmetic later.
NUMERIC_FIELDS = ("final_eval_loss", "initial_eval_loss", "final_train_loss", "eval_accuracy",
                  "chance_accuracy", "params_total", "params_active", "params_embedding",
                  "flops_per_token", "tokens_seen", "steps", "wall_time_s")


class InvalidRun(ValueError):
    """A run directory whose files parse but have the wrong shape; its row says why."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_summary(path: Path) -> dict[str, Any] | None:
    """``summary.json`` as a dict (None when absent); InvalidRun when it is not a JSON
    object or a field the table computes with has the wrong type."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise InvalidRun(f"summary.json: unreadable ({e})") from None
    if not isinstance(summary, dict):
        raise InvalidRun(f"summary.json: expected a JSON object, got {type(summary).__name__}")
    for key in NUMERIC_FIELDS:
        v = summary.get(key)
        if v is not None and not _is_number(v):
            raise InvalidRun(f"summary.json: {key!r} should be a number, got {v!r}")
    for key, kind, what in (("status", str, "string"), ("error", str, "string"),
                            ("config", dict, "mapping")):
        v = summary.get(key)
        if v is not None and not isinstance(v, kind):
            raise InvalidRun(f"summary.json: {key!r} should be a {what}, got {type(v).__name__}")
    return summary


def _read_yaml(path: Path, kind: type) -> Any:
    """A YAML file that must hold a ``kind`` (dict or list); empty counts as empty."""
    name = path.name if path.parent.name != ".hydra" else f".hydra/{path.name}"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise InvalidRun(f"{name}: unreadable ({' '.join(str(e).split())})") from None
    if data is None:
        return kind()
    if not isinstance(data, kind):
        raise InvalidRun(f"{name}: expected a {'mapping' if kind is dict else 'list'}, "
                         f"got {type(data).__name__}")
    return data


def _last_step(metrics: Path) -> int | None:
    """The last ``step`` logged; unparsable lines (a killed run's torn last line) are
    skipped, rows that parse but are not objects make the run invalid."""
    if not metrics.is_file():
        return None
    last = None
    try:
        with open(metrics, errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError:  # a torn last line of a killed run
                    continue
                if not isinstance(row, dict):
                    raise InvalidRun(f"metrics.jsonl line {n}: expected a JSON object, "
                                     f"got {type(row).__name__}")
                step = row.get("step", last)
                if step is not None and not (_is_number(step) and isinstance(step, int)):
                    raise InvalidRun(f"metrics.jsonl line {n}: 'step' should be an integer, "
                                     f"got {step!r}")
                last = step
    except OSError as e:
        raise InvalidRun(f"metrics.jsonl: unreadable ({e})") from None
    return last


def run_row(run_dir: Path, root: Path) -> dict[str, Any]:
    """One table row for ``run_dir`` (see module docstring). A run whose files have the
    wrong shape gets a row with ``status`` ``invalid`` and ``error`` saying why, so one
    bad directory never takes the whole table down."""
    name = str(run_dir.relative_to(root)) if run_dir != root else "."
    try:
        return _run_row(run_dir, name)
    except InvalidRun as e:
        return {"run": name, "status": "invalid", "error": str(e)}


def _run_row(run_dir: Path, name: str) -> dict[str, Any]:
    summary = _read_summary(run_dir / "summary.json")
    row: dict[str, Any] = {"run": name, "status": "no_summary"}
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        config = _read_yaml(run_dir / "config.yaml", dict)
    if summary:
        config = config or summary.get("config") or {}
    if not config and (run_dir / ".hydra" / "config.yaml").is_file():  # failed at config time
        config = _read_yaml(run_dir / ".hydra" / "config.yaml", dict)
        config.pop("hydra", None)
    if summary:
        for k, v in summary.items():
            if k != "config" and not isinstance(v, (dict, list)):
                row[k] = v
        row["status"] = summary.get("status") or "no_summary"
    total, active, emb = (row.get(k) for k in ("params_total", "params_active", "params_embedding"))
    if total is not None and emb is not None:
        row["params_nonembedding"] = total - emb
    if active is not None and emb is not None:
        row["params_active_nonembedding"] = active - emb
    if row.get("flops_per_token") is not None and row.get("tokens_seen") is not None:
        row["compute"] = float(row["flops_per_token"]) * float(row["tokens_seen"])
    row["last_logged_step"] = _last_step(run_dir / "metrics.jsonl")
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        items = _read_yaml(overrides, list)
        row["overrides"] = " ".join(str(o) for o in items)
    row.update(flatten(config))
    return row


def collect_results(root: str | Path) -> pd.DataFrame:
    """One row per run directory under ``root``; summary columns first, then config keys."""
    root = Path(root)
    rows = [run_row(d, root) for d in find_run_dirs(root)]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_FIRST)
    first = [c for c in SUMMARY_FIRST if c in df.columns]
    rest = sorted(c for c in df.columns if c not in first)
    return df[first + rest]


def varying_keys(df: pd.DataFrame, prefixes: Iterable[str] = (
        "model.", "moe.", "routing.", "train.", "data.", "vision.", "upcycle.", "seed")) -> list[str]:
    """Config columns whose value differs between rows: what a sweep swept. Invalid rows
    (no config read) are left out, else every key would seem to vary."""
    if "status" in df.columns:
        df = df[df["status"] != "invalid"]
    keys = []
    for c in df.columns:
        if any(c.startswith(p) for p in prefixes) and df[c].astype(str).nunique(dropna=False) > 1:
            keys.append(c)
    return keys


def _uniform_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every object column that mixes value types (a run that logged
    ``"device": 3`` next to ``"cpu"``) as strings: Parquet columns have one type, and one
    odd run must not stop the table from being written."""
    out = df.copy()
    for c in df.columns[df.dtypes == object]:
        if len({type(v) for v in df[c] if not _missing(v)}) > 1:
            out[c] = df[c].map(lambda v: None if _missing(v) else str(v))
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None or NaN


def write_table(df: pd.DataFrame, out: str | Path) -> Path:
    """Write ``.csv`` or ``.parquet`` atomically (temp file beside it, then rename)."""
    from moe_vlm.atomic import atomic_write

    out = Path(out)
    if out.suffix == ".csv":
        atomic_write(out, lambda f: df.to_csv(f, index=False))
    elif out.suffix == ".parquet":
        safe = _uniform_columns(df)
        atomic_write(out, lambda f: safe.to_parquet(f, index=False), mode="wb")
    else:
        raise ValueError(f"{out}: the table is written as .csv or .parquet")
    return out
