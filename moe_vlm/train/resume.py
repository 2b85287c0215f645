"""What may change when a run directory is resumed.

A resumed run must be one experiment: the checkpoint's config and the new one may differ
only in how the run is driven (cadence, stopping point, process layout, device, compute
backend), never silently in what it computes. Anything else is refused with the changed
keys listed, unless the user names them in ``train.allow_changes``; allowed changes are
applied (the model and optimizer are built from the new config) and recorded in
``summary.json`` as ``changed_on_resume``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any, Mapping, Sequence

from moe_vlm.config.schema import Config
from moe_vlm.errors import ConfigError

# Keys that drive the run without changing what a step computes (to float rounding), or
# that only apply when a run starts fresh (train.init_from, upcycle.*,
# data.vision_pretrain_steps).
FREE = ("train.max_steps", "train.stop_after_steps", "train.progress", "train.prefetch", "train.log_every",
        "train.eval_every", "train.ckpt_every", "train.keep_checkpoints", "train.device",
        "train.micro_batch_size", "train.deterministic", "train.trust_checkpoint",
        "train.allow_changes", "train.init_from", "data.vision_pretrain_steps", "moe.backend",
        "model.loss_chunk", "upcycle", "parallel", "run", "log")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"a.b.c": value}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _covered(key: str, names: Sequence[str]) -> bool:
    return any(n in ("all", "*") or key == n or key.startswith(n + ".") for n in names)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    """Every config key's schema default, flattened."""
    return flatten(asdict(Config()))


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every key whose value differs. A key the
    saved config lacks (added to the schema after that run was made) at its default is
    not a change: the default keeps what the code did before the key existed."""
    a, b = flatten(saved), flatten(new)
    defaults = _defaults()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (k not in a and k in defaults and b.get(k) == defaults[k])}


def check_resume_config(saved: Mapping[str, Any], new: Mapping[str, Any],
                        allow: Sequence[str], run_dir: str, step: int) -> list[dict[str, Any]]:
    """The changes this resume makes (for ``summary.json``), or ``ConfigError`` listing
    those neither free nor in ``allow``."""
    changes = config_changes(saved, new)
    refused = {k: v for k, v in changes.items() if not _covered(k, FREE) and not _covered(k, allow)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new_!r}" for k, (old, new_) in list(refused.items())[:8])
        more = f" (+{len(refused) - 8} more)" if len(refused) > 8 else ""
        keys = ",".join(list(refused)[:8])
        raise ConfigError(
            f"run.dir {run_dir} was trained to step {step} with another config ({listed}{more}). "
            f"Resuming would mix two configs in one run: use a new run.dir, or allow the change "
            f"deliberately with train.allow_changes=[{keys}]")
    # Recorded: what changes the experiment (allowed keys, and max_steps: the schedule).
    return [{"key": k, "from": old, "to": new_, "at_step": step} for k, (old, new_) in changes.items()
            if k == "train.max_steps" or not _covered(k, FREE)]
