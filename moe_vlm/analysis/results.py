"""Collect run directories into one results table (pandas): one row per run.

A run directory is any directory under the root holding a ``summary.json`` or a
``config.yaml`` next to a ``metrics.jsonl`` / ``.hydra/`` (so a run that crashed before
writing its summary still appears). Each row has:

- ``run``: the directory relative to the root; ``status``: ``completed`` / ``failed`` /
  ``running`` from ``summary.json``, or ``no_summary`` when there is none (never started
  or killed before its first write). Rows are never dropped.
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_step(metrics: Path) -> int | None:
    if not metrics.is_file():
        return None
    last = None
    with open(metrics) as f:
        for line in f:
            try:
                last = json.loads(line).get("step", last)
            except ValueError:  # a torn last line of a killed run
                continue
    return last


def run_row(run_dir: Path, root: Path) -> dict[str, Any]:
    """One table row for ``run_dir`` (see module docstring)."""
    summary = _read_json(run_dir / "summary.json")
    row: dict[str, Any] = {"run": str(run_dir.relative_to(root)) if run_dir != root else ".",
                           "status": (summary or {}).get("status", "no_summary")}
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            row["error"] = f"unreadable config.yaml: {e}"
    if summary:
        config = config or summary.get("config") or {}
    if not config and (run_dir / ".hydra" / "config.yaml").is_file():  # failed at config time
        try:
            config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            pass
        config.pop("hydra", None)
    if summary:
        for k, v in summary.items():
            if k != "config" and not isinstance(v, (dict, list)):
                row[k] = v
        row["status"] = summary.get("status", "no_summary")
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
        try:
            row["overrides"] = " ".join(yaml.safe_load(overrides.read_text()) or [])
        except yaml.YAMLError:
            pass
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
    """Config columns whose value differs between rows: what a sweep swept."""
    keys = []
    for c in df.columns:
        if any(c.startswith(p) for p in prefixes) and df[c].astype(str).nunique(dropna=False) > 1:
            keys.append(c)
    return keys


def write_table(df: pd.DataFrame, out: str | Path) -> Path:
    """Write ``.csv`` or ``.parquet`` atomically (temp file beside it, then rename)."""
    from moe_vlm.train.rundir import atomic_write

    out = Path(out)
    if out.suffix == ".csv":
        atomic_write(out, lambda f: df.to_csv(f, index=False))
    elif out.suffix == ".parquet":
        atomic_write(out, lambda f: df.to_parquet(f, index=False), mode="wb")
    else:
        raise ValueError(f"{out}: the table is written as .csv or .parquet")
    return out
