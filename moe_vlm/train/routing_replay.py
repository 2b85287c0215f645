"""Router replay: record every MoE layer's selected experts during training, or train
with a recorded selection instead of the routers' own top-k (``routing.replay``).

Legend: T real tokens of a micro-batch, K experts per token, L routed MoE layers.

As Megatron-Core's router replay (``RouterReplay``: ``RECORD`` / ``REPLAY_FORWARD``), a
replayed router keeps computing its scores and takes the combine weights from them at
the recorded experts (``scores.gather(experts)``, then the gate's usual normalisation), so
the router still learns through the weights and the balance loss (which counts its own
top-k); only which experts each token reaches is fixed. Use: controlled ablations (the
same routing under another expert initialisation, learning rate, or expert backend).

The record is a directory (``routing.replay_path``):

- ``header.json``: the MoE shape (experts and top-k of every routed layer: the decoder's,
  then the vision tower's), the layout (world, dp, ep, micro-batches per rank and their
  size) and the data (name, seed, path, sequence length, batch size). A replay whose run
  differs in any of these is refused with the keys that differ; ``info`` (seed, gates,
  the recording run's directory) is not compared.
- ``step_<8 digits>.rank<r>.pt``, one per optimizer step and rank (each rank routes its
  own micro-batches): per layer, ``rows`` int32 [calls] (real tokens of each call, in
  micro-batch order) and ``ids`` int16 (int32 past 32767 experts) [sum of rows, K].

Every file is written atomically (``moe_vlm.atomic``). A resumed recording run removes its
rank's files from the checkpoint's step on and records them again, so a killed and
resumed record equals an uninterrupted one (on CPU; on CUDA with ``train.deterministic``).
Files move to the host once per step (``.cpu()``: a host sync, record mode only). The
model math does no file I/O: this module hands each router its selection through
``Router.select_hook`` for the duration of one step (``begin``/``end``); evaluation
routes freely.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from moe_vlm.atomic import atomic_write
from moe_vlm.config.schema import Config, ConfigError
from moe_vlm.model.vision_moe import vision_moe_layers
from moe_vlm.parallel.runtime import Layout
from moe_vlm.routing.router import Router

FORMAT = 1
HEADER = "header.json"
_STEP_FILE = re.compile(r"step_(\d{8})\.rank(\d+)\.pt")


def routed_routers(model: nn.Module) -> list[tuple[str, Router]]:
    """(name, router) of every routed MoE layer, the decoder's then the vision tower's."""
    decoder = getattr(model, "decoder", model)
    moe_ids = [i for i, is_moe in enumerate(getattr(decoder, "schedule", []) or []) if is_moe]
    out = [(f"layer_{i}", moe.router) for i, moe in zip(moe_ids, model.moe_layers())]
    if vision_moe_layers(model):
        out += [(f"vision_layer_{i}", moe.router)
                for i, moe in zip(model.vision.moe_block_ids, vision_moe_layers(model))]
    return out


def replay_header(cfg: Config, model: nn.Module, layout: Layout, micro_bs: int, n_micro: int,
                  run_dir: Path) -> dict[str, Any]:
    """What a record must share with a run that replays it, and what it only reports."""
    d, t = cfg.data, cfg.train
    return {
        "format": FORMAT,
        "layers": {name: {"n_experts": r.n_experts, "top_k": r.top_k}
                   for name, r in routed_routers(model)},
        "layout": {"world": layout.world, "dp": layout.dp, "ep": layout.ep,
                   "micro_batches_per_rank": n_micro, "micro_batch_size": micro_bs},
        "data": {"name": str(d.name), "seed": d.seed, "path": d.path, "seq_len": d.seq_len,
                 "batch_size": t.batch_size, "pack": d.pack},
        "info": {"seed": cfg.seed, "gate": str(cfg.routing.gate),
                 "vision_gate": str(cfg.vision.moe_gate), "run_dir": str(run_dir)},
    }


def header_differences(recorded: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """'key: recorded X, this run Y' for every compared entry (not ``info``) that differs."""
    out = []
    for section in ("format", "layers", "layout", "data"):
        a, b = recorded.get(section), ours.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                out.append(f"{section}: recorded {a}, this run {b}")
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: recorded {a.get(key, 'absent')}, "
                           f"this run {b.get(key, 'absent')}")
    return out


def step_file(path: Path, step: int, rank: int) -> Path:
    return path / f"step_{step:08d}.rank{rank}.pt"


def recorded_steps(path: Path, rank: int) -> list[int]:
    """The steps recorded for ``rank`` in the record ``path``, sorted."""
    steps = []
    for p in path.glob("step_*.pt") if path.is_dir() else []:
        m = _STEP_FILE.fullmatch(p.name)
        if m and int(m.group(2)) == rank:
            steps.append(int(m.group(1)))
    return sorted(steps)


class RoutingReplay:
    """One run's routing record or replay. ``begin(step)`` puts a hook on every router for
    the step's forward/backward, ``end(step)`` takes them off and writes the step's record
    (record) or checks that every recorded selection was used (replay)."""

    def __init__(self, mode: str, path: Path, routers: list[tuple[str, Router]], rank: int,
                 device: torch.device):
        self.mode, self.path, self.rank, self.device = mode, path, rank, device
        self.names = [n for n, _ in routers]
        self.routers = [r for _, r in routers]
        self._calls: list[list[Tensor]] = [[] for _ in routers]  # record: this step's selections
        self._queue: list[deque] = [deque() for _ in routers]  # replay: selections to hand out
        self._step: Optional[int] = None

    def begin(self, step: int) -> None:
        """Hook every router for optimizer step ``step`` (replay: load its record)."""
        self._step = step
        if self.mode == "replay":
            self._load(step)
        for i, r in enumerate(self.routers):
            r.select_hook = self._recorder(i) if self.mode == "record" else self._replayer(i)

    def end(self, step: int) -> None:
        """Unhook the routers; record: write the step's file; replay: every selection of
        the record must have been used."""
        for r in self.routers:
            r.select_hook = None
        self._step = None
        if self.mode == "record":
            self._write(step)
        else:
            left = {self.names[i]: len(q) for i, q in enumerate(self._queue) if q}
            for q in self._queue:
                q.clear()
            if left:
                raise RuntimeError(f"routing.replay: step {step} used fewer routing calls than "
                                   f"recorded (unused per layer: {left}); the record was made "
                                   "with other data or another micro-batching")

    def abort(self) -> None:
        """Unhook the routers and drop the step's state (after an error in the step)."""
        for r in self.routers:
            r.select_hook = None
        for c in self._calls:
            c.clear()
        for q in self._queue:
            q.clear()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """``begin(step)``, the body (the step's forward/backward), ``end(step)``; on an
        error the routers are unhooked and nothing is written."""
        self.begin(step)
        try:
            yield
        except BaseException:
            self.abort()
            raise
        self.end(step)

    def _recorder(self, i: int) -> Callable[[Tensor], Tensor]:
        def hook(selected: Tensor) -> Tensor:  # [T, K]
            self._calls[i].append(selected.detach())
            return selected
        return hook

    def _replayer(self, i: int) -> Callable[[Tensor], Tensor]:
        def hook(selected: Tensor) -> Tensor:  # [T, K] -> the recorded [T, K]
            if not self._queue[i]:
                raise RuntimeError(f"routing.replay: {self.names[i]} routed more often in step "
                                   f"{self._step} than the record holds")
            given = self._queue[i].popleft()
            if given.shape != selected.shape:
                raise RuntimeError(
                    f"routing.replay: {self.names[i]} at step {self._step} routes "
                    f"{selected.shape[0]} tokens x top-{selected.shape[1]}, the record holds "
                    f"{given.shape[0]} x {given.shape[1]}: the data differ from the recording run")
            return given
        return hook

    def _write(self, step: int) -> None:
        layers = []
        for i, r in enumerate(self.routers):
            calls, k = self._calls[i], r.top_k
            ids = torch.cat(calls) if calls else torch.zeros(0, k, dtype=torch.long)  # [N, K]
            dtype = torch.int16 if r.n_experts <= torch.iinfo(torch.int16).max else torch.int32
            rows = torch.tensor([c.shape[0] for c in calls], dtype=torch.int32)  # [calls]
            layers.append({"rows": rows, "ids": ids.to("cpu", dtype)})  # host sync
            calls.clear()
        payload = {"format": FORMAT, "step": step, "rank": self.rank, "layers": layers}
        atomic_write(step_file(self.path, step, self.rank), lambda f: torch.save(payload, f), "wb")

    def _load(self, step: int) -> None:
        f = step_file(self.path, step, self.rank)
        if not f.is_file():
            have = recorded_steps(self.path, self.rank)
            raise RuntimeError(
                f"routing.replay_path={self.path} has no record of step {step} for rank "
                f"{self.rank} (it holds {len(have)} steps): replay cannot run past the "
                "recorded steps; lower train.max_steps or record longer")
        payload = torch.load(f, map_location="cpu", weights_only=True)
        if len(payload["layers"]) != len(self.routers):
            raise RuntimeError(f"{f}: {len(payload['layers'])} layers recorded, the model routes "
                               f"{len(self.routers)}")
        for i, layer in enumerate(payload["layers"]):
            n_exp = self.routers[i].n_experts
            ids = layer["ids"].long()  # [N, K]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_exp):
                raise RuntimeError(f"{f}: {self.names[i]} holds expert ids outside "
                                   f"[0, {n_exp})")
            ids = ids.to(self.device)
            self._queue[i].extend(ids.split(layer["rows"].tolist()))


def open_routing_replay(cfg: Config, model: nn.Module, layout: Layout, micro_bs: int,
                        n_micro: int, run_dir: Path, step: int) -> Optional[RoutingReplay]:
    """The run's ``RoutingReplay`` (None with ``routing.replay=none``), checked against the
    record's header. Record: rank 0 writes the header (or checks the one there is this
    run's), and every rank removes its files from ``step`` on (a resume records them
    again). Replay: the record must match this run and hold every step up to
    ``train.max_steps``. Collective (a barrier) under torchrun."""
    r = cfg.routing
    if r.replay == "none":
        return None
    path = Path(str(r.replay_path)).expanduser().absolute()
    ours = replay_header(cfg, model, layout, micro_bs, n_micro, run_dir)
    head = path / HEADER
    recorded = json.loads(head.read_text()) if head.is_file() else None
    if r.replay == "replay":
        if recorded is None:
            raise ConfigError(f"routing.replay_path={path}: no {HEADER} there; record one first "
                              "with routing.replay=record")
        diff = header_differences(recorded, ours)
        if diff:
            raise ConfigError(f"routing.replay_path={path} was recorded for another model, layout "
                              "or data; it differs in: " + "; ".join(diff))
        have = set(recorded_steps(path, layout.rank))
        missing = [s for s in range(step, cfg.train.max_steps) if s not in have]
        if missing:
            raise ConfigError(
                f"routing.replay_path={path} holds {len(have)} recorded steps for rank "
                f"{layout.rank} but train.max_steps={cfg.train.max_steps} needs steps "
                f"{step}..{cfg.train.max_steps - 1} (first missing: {missing[0]}): replay cannot "
                "run past the record; lower train.max_steps")
    else:
        _open_record(path, recorded, ours, layout, step)
    return RoutingReplay(str(r.replay), path, routed_routers(model), layout.rank, layout.device)


def _open_record(path: Path, recorded: Optional[dict[str, Any]], ours: dict[str, Any],
                 layout: Layout, step: int) -> None:
    """Check (and on a fresh record write) the header; drop this rank's steps >= ``step``."""
    if recorded is not None:
        if recorded.get("info", {}).get("run_dir") != ours["info"]["run_dir"]:
            raise ConfigError(f"routing.replay_path={path} already holds the record of run "
                              f"{recorded.get('info', {}).get('run_dir')}; choose another "
                              "directory (or delete it) to record this run")
        diff = header_differences(recorded, ours)
        if diff:
            raise ConfigError(f"routing.replay_path={path}: this run's record was made with "
                              "another model, layout or data; it differs in: " + "; ".join(diff))
    elif any(path.glob("step_*.pt")):
        raise ConfigError(f"routing.replay_path={path} holds step files but no {HEADER}; choose "
                          "another directory to record this run")
    have = recorded_steps(path, layout.rank)
    missing = [s for s in range(step) if s not in have]
    if missing:
        raise ConfigError(f"routing.replay=record resumes at step {step}, but routing.replay_path="
                          f"{path} lacks steps {missing[:5]}... of rank {layout.rank} (recording "
                          "was off before?): record into a new directory from a fresh run")
    layout.barrier()  # every rank has read the old header before rank 0 writes one
    if layout.is_main and recorded is None:
        atomic_write(path / HEADER, lambda f: json.dump(ours, f, indent=1, sort_keys=True))
    for s in have:
        if s >= step:  # written after the checkpoint we resume from: recorded again
            step_file(path, s, layout.rank).unlink()
    layout.barrier()


def routing_step(replay: Optional[RoutingReplay], step: int) -> contextlib.AbstractContextManager:
    """``replay.step(step)``, or nothing without router replay."""
    return contextlib.nullcontext() if replay is None else replay.step(step)
