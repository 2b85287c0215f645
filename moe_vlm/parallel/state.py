"""Layout-free optimizer state for checkpoints.

A checkpoint holds the *single-process* state: the full model state dict
(``expert_parallel.full_state_dict``) and the optimizer state dict as a one-process
``torch.optim.AdamW`` over ``train.optim.param_groups(model)`` would have it. Sharded
expert moments are all-gathered along the expert dimension to save, and sliced to load,
so a run saved at one (dp, ep) layout resumes at any other, or on one process, with its
optimizer state intact. FSDP shards (DTensors) are gathered to save and re-sharded to
load the same way. Saving gathers tensor by tensor onto rank 0's CPU memory, and loading
memory-maps the file, so neither costs accelerator memory; rank 0 does need host memory
for the whole state (this is not a sharded ``torch.distributed.checkpoint`` save).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_vlm.errors import ConfigError
from moe_vlm.parallel.expert_parallel import (AllToAllDispatcher, full_tensor, gather_shards,
                                              sharded_experts)


def _expert_shards(model: nn.Module) -> dict[int, AllToAllDispatcher]:
    """id(expert parameter) -> the dispatcher of its expert-parallel layer (EP group, slice)."""
    return {id(p): disp for ex, disp in sharded_experts(model).values()
            for p in (getattr(ex, n) for n in ex.stacked_names)}


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters in ``state_dict`` index order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def shard_like(v: Any, p: Tensor) -> Any:
    """A full state tensor of parameter ``p`` laid out like ``p``: this rank's FSDP shard
    when ``p`` is a DTensor (every rank holds ``v``, so no communication)."""
    if isinstance(v, Tensor) and hasattr(p, "device_mesh") and v.shape == p.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return v


@torch.no_grad()
def gather_expert_state(model: nn.Module, params: list[nn.Parameter],
                        state: dict[int, dict[str, Any]], dst: Optional[int] = None
                        ) -> dict[int, dict[str, Any]]:
    """``state[i]`` (per-parameter optimizer state, index ``i`` into ``params``) with each
    expert-sharded tensor ``[El, ...]`` gathered to ``[E, ...]`` over its EP group and each
    FSDP shard gathered; on every rank (``dst=None``) or on CPU on global rank ``dst`` only
    (``{}`` elsewhere), as ``full_state_dict``. Collective: every rank must call it with
    the same indices."""
    shards = _expert_shards(model)
    keep = dst is None or dist.get_rank() == dst
    out = {}
    for i, p in enumerate(params):
        st = state.get(i)
        if st is None:
            continue
        mod = shards.get(id(p))
        full = {}
        for key, v in st.items():
            if mod is not None and isinstance(v, Tensor) and v.shape == p.shape:
                v = gather_shards(v, mod, dst)  # [E, ...]
            else:
                v = full_tensor(v, keep, dst is not None)
            full[key] = v
        if keep:
            out[i] = full
    return out


def slice_expert_state(model: nn.Module, params: list[nn.Parameter],
                       state: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The inverse of ``gather_expert_state``: this rank's slice of each expert tensor."""
    shards = _expert_shards(model)
    out = {}
    for i, st in state.items():
        p = params[int(i)]
        mod = shards.get(id(p))
        if mod is None:
            out[i] = {k: shard_like(v, p) for k, v in st.items()}
            continue
        lo, n = mod.first_expert, mod.n_local
        out[i] = {k: (v[lo:lo + n] if isinstance(v, Tensor) and v.ndim == p.ndim and
                      v.shape[0] == mod.n_experts else v) for k, v in st.items()}
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         dst: Optional[int] = None) -> dict[str, Any]:
    """The single-process state dict of ``optimizer`` (collective under EP and FSDP), on
    every rank or on global rank ``dst`` only (as ``gather_expert_state``)."""
    sd = optimizer.state_dict()
    params = _ordered_params(optimizer)
    return {"state": gather_expert_state(model, params, sd["state"], dst),
            "param_groups": sd["param_groups"]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Load a single-process optimizer state dict at this rank's layout. The moments and
    step counts come from the checkpoint; the hyperparameters (betas, eps, weight decay)
    stay those ``optimizer`` was built with from the current config, so what
    ``config.yaml`` says is what runs (a resume may change them only when the user allows
    it: ``moe_vlm.train.resume``)."""
    params = _ordered_params(optimizer)
    n_saved = sum(len(g["params"]) for g in state["param_groups"])
    if n_saved != len(params):
        raise ConfigError(f"train.trainable: the checkpoint's optimizer has {n_saved} parameters, "
                          f"this run's {len(params)}; train.trainable must match the run that "
                          "saved it (start a new run.dir with train.init_from to change it)")
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": slice_expert_state(model, params, state["state"]),
                               "param_groups": state["param_groups"]})
    for group, hyper in zip(optimizer.param_groups, current):
        group.update(hyper)
