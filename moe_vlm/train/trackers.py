"""Experiment trackers (TensorBoard, Weights & Biases) that mirror ``metrics.jsonl``.

``metrics.jsonl`` stays the record; a tracker gets every row the run logs, as scalars
(nested keys joined by ``/``: ``routing/layer_0/max_violation``), and on rows with
routing metrics one expert-load heatmap per MoE layer kind (an image: MoE layers x
experts, each row the layer's share of assignments, scaled to its maximum).

Resuming continues the same tracker run: TensorBoard's writer purges events past the
checkpoint's step (as ``metrics.jsonl`` drops its rows); W&B gets the run id saved in
``<run_dir>/tracker_ids.json`` at the first start, so every restart logs to one run (in
offline mode each restart writes its own ``wandb/offline-run-*-<id>`` directory and
``wandb sync`` joins them). Nothing leaves the machine unless ``log.wandb_mode=online``.

The packages are optional extras (``pip install -e ".[trackers]"``), imported only when
a tracker is enabled; a missing one is a ``ConfigError`` naming the package.
"""

from __future__ import annotations

import importlib
import json
import secrets
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from moe_vlm.atomic import atomic_write
from moe_vlm.config.schema import Config
from moe_vlm.errors import ConfigError

IDS_FILE = "tracker_ids.json"
TB_DIR = "tensorboard"


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float], images: dict[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


def scalars_of(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row, nested keys joined by ``/`` (lists and ``step`` left
    out; booleans as 0/1)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if key == "step":
            continue
        if isinstance(v, dict):
            out.update(scalars_of(v, key + "/"))
        elif isinstance(v, (bool, int, float)):
            out[key] = float(v)
    return out


def load_heatmaps(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{"expert_load/<kind>": [layers, experts] float32 in [0, 1]}`` from a row's
    ``routing`` metrics: each layer's assignments per expert as shares, scaled by the
    largest share of the image so the busiest expert is white. ``kind``: ``decoder``
    (``layer_<i>``) and ``vision`` (``vision_layer_<i>``), whose expert counts differ."""
    routing = row.get("routing")
    if not isinstance(routing, dict):
        return {}
    kinds: dict[str, list[list[float]]] = {}
    for name, layer in routing.items():
        loads = layer.get("tokens_per_expert") if isinstance(layer, dict) else None
        if not loads:
            continue
        kind = "vision" if name.startswith("vision_") else "decoder"
        kinds.setdefault(kind, []).append(loads)
    out = {}
    for kind, rows in kinds.items():
        if len({len(r) for r in rows}) != 1:
            continue  # layers of one kind have one expert count; skip anything else
        m = np.asarray(rows, dtype=np.float32)  # [layers, experts]
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
        out[f"expert_load/{kind}"] = m / max(float(m.max()), 1e-12)
    return out


def _import(package: str, key: str):
    """The tracker's package (``check_runnable`` checked it is there before the run
    started; this covers a run set up without it)."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"{key}=true needs the {package} package ({e}): pip install -e "
                          f"'.[trackers]' (or pip install {package}), or set {key}=false") from None


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir RUN_DIR``)."""

    def __init__(self, run_dir: Path, resume_step: Optional[int]):
        _import("tensorboard", "log.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps > the checkpoint's (a killed run's tail) are dropped
        self.writer = SummaryWriter(str(run_dir / TB_DIR),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, scalars: dict[str, float], images: dict[str, np.ndarray]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        for k, img in images.items():
            self.writer.add_image(k, img[None], step, dataformats="CHW")  # grey [1, L, E]
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<run_dir>/wandb``, offline unless ``log.wandb_mode=online``."""

    def __init__(self, cfg: Config, run_dir: Path, config: dict[str, Any], run_id: str):
        wandb = _import("wandb", "log.wandb")
        lc = cfg.log
        self.wandb = wandb
        if lc.wandb_mode != "online":
            # The run's mode alone is not enough: W&B records its own usage telemetry
            # (e.g. the time each run.log takes to encode) through a process-wide
            # recorder built from the *global* settings, and exports it over HTTP unless
            # those are offline too (wandb 0.31). Offline means nothing leaves the machine.
            wandb.setup(settings=wandb.Settings(mode=str(lc.wandb_mode)))
        self.run = wandb.init(
            project=lc.wandb_project, entity=lc.wandb_entity, name=tracker_name(cfg, run_dir),
            id=run_id, resume="allow", dir=str(run_dir), mode=lc.wandb_mode, config=config,
            settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, scalars: dict[str, float], images: dict[str, np.ndarray]) -> None:
        data: dict[str, Any] = dict(scalars)
        for k, img in images.items():
            data[k] = self.wandb.Image((img * 255).astype(np.uint8), mode="L")
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()
        # stop W&B's service process: its files are complete once this returns (a
        # finished run's records may otherwise still be in flight), nothing lingers
        self.wandb.teardown()


def tracker_name(cfg: Config, run_dir: Path) -> str:
    """``log.name``, else ``run.name`` and the run directory's name."""
    return cfg.log.name or f"{cfg.run.name}/{run_dir.name}"


def tracker_ids(run_dir: Path) -> dict[str, str]:
    """The run's tracker ids, made (and saved, atomically) at its first start."""
    path = run_dir / IDS_FILE
    if path.exists():
        return json.loads(path.read_text())
    ids = {"wandb": secrets.token_hex(4)}
    atomic_write(path, lambda f: json.dump(ids, f))
    return ids


class Trackers:
    """The run's enabled trackers, fed the rows ``metrics.jsonl`` gets."""

    def __init__(self, trackers: list[Tracker], images: bool):
        self.trackers, self.images = trackers, images

    def log(self, row: dict[str, Any]) -> None:
        if not self.trackers:
            return
        step = int(row.get("step", 0))
        scalars, images = scalars_of(row), load_heatmaps(row) if self.images else {}
        for t in self.trackers:
            t.log(step, scalars, images)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def open_trackers(cfg: Config, run_dir: Path, config: dict[str, Any],
                  resume_step: Optional[int]) -> Trackers:
    """The trackers ``cfg.log`` enables (none: an empty ``Trackers``), on the main process.
    ``config``: the full run config, passed to W&B."""
    lc, out = cfg.log, []
    if lc.tensorboard:
        out.append(TensorBoardTracker(run_dir, resume_step))
    if lc.wandb:
        out.append(WandbTracker(cfg, run_dir, config, tracker_ids(run_dir)["wandb"]))
    return Trackers(out, lc.images)
