"""Training engines: one interface over a single process, torch DDP or FSDP2 + expert
parallelism (``parallel.engine=torch``) and DeepSpeed ZeRO-1/2 (``parallel.engine=deepspeed``).

The training loop calls, per optimizer step::

    for each micro-batch: out = engine.forward_backward(inputs, last, amp)
    norm = engine.reduce_and_clip(max_norm)   # None when the engine clips inside step
    norm2 = engine.step(lr)                    # the grad norm for such engines

Gradient semantics are the same everywhere: ``out.loss`` of a micro-batch is its *share* of
the step loss (its sums divided by the global batch's totals, ``moe_vlm.routing.loss_norm``),
and the step's gradient is the sum of the shares' gradients over micro-batches and ranks.
Gradient reductions average (DDP, FSDP and DeepSpeed over all ranks; expert gradients: the
all-to-all backward sums over the ranks that routed tokens to an expert, then
``reduce_expert_grads`` sums over the expert-data-parallel group and divides by the world
size), so each engine backpropagates ``world * share``: the average of that over ranks is
the sum of the shares. Nothing depends on how many tokens each micro-batch or rank holds.
Checkpoint state is always the single-process state (``moe_vlm.parallel.state``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_vlm.parallel.expert_parallel import (expert_parameters, full_state_dict,
                                              reduce_expert_grads)
from moe_vlm.parallel.runtime import Layout
from moe_vlm.parallel.state import full_optimizer_state, load_full_optimizer_state

AmpContext = Callable[[], ContextManager]


def _sq_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).square().sum()


class TorchEngine:
    """Plain PyTorch: AdamW on every rank; dense parameters replicated with DDP, or sharded
    with FSDP2 (``parallel.fsdp``: weights, gradients and optimizer state split over all
    processes, ZeRO-3 style); expert-parallel weights (sharded by ``AllToAllDispatcher``'s
    layers) are left out, their gradients averaged by hand over the expert-data-parallel
    group."""

    name = "torch"

    def __init__(self, model: nn.Module, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                 layout: Layout, find_unused: bool = False):
        self.model, self.layout = model, layout
        trainable = [p for p in model.parameters() if p.requires_grad]
        experts = {id(p) for p in expert_parameters(model)}
        self.expert_params = [p for p in trainable if id(p) in experts]
        self.module: nn.Module = model
        self.fsdp = layout.distributed and layout.fsdp
        self.ddp = layout.distributed and not self.fsdp and any(id(p) not in experts for p in trainable)
        if self.fsdp:
            _fully_shard(model, layout.dp_mesh, set(expert_parameters(model)))
        elif self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ignore = [n for n, p in model.named_parameters() if id(p) in experts]
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
            # Buffers (router biases) are updated identically on every rank: no per-step sync.
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
                inspect.signature(DDP).parameters else {"broadcast_buffers": False}
            self.module = DDP(model, device_ids=[layout.device] if layout.device.type == "cuda" else None,
                              find_unused_parameters=find_unused, **no_sync)
        # After sharding: FSDP replaces the dense parameters with DTensor shards.
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.dense_params = [p for p in self.trainable if id(p) not in experts]
        self.optimizer = optimizer_fn(model)

    def forward_backward(self, inputs: dict[str, Any], last: bool, amp: AmpContext) -> Any:
        """Forward one micro-batch and backpropagate its share of the step loss (times the
        world size, which the averaging reductions undo); DDP reduces the dense gradients
        during the backward of the ``last`` micro-batch only."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if (last or not self.ddp) else self.module.no_sync()
        with sync:
            with amp():
                out = self.module(**inputs)
            (out.loss * self.layout.world).backward()
        return out

    @torch.no_grad()
    def reduce_and_clip(self, max_norm: float) -> Tensor:
        """Finish the gradient reduction (expert parameters) and clip to the global norm."""
        lay = self.layout
        if lay.distributed:
            reduce_expert_grads(self.expert_params, lay.edp_group, lay.world)
        if not (lay.distributed and (lay.ep > 1 or self.fsdp)):  # every rank holds every gradient
            return torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        dense = [_local(p.grad) for p in self.dense_params if p.grad is not None]
        local = [p.grad for p in self.expert_params]
        dense_sq = _sq_norm(dense, lay.device)
        if self.fsdp:  # disjoint shards over all ranks
            dist.all_reduce(dense_sq)
        experts_sq = _sq_norm(local, lay.device)
        if lay.ep > 1:  # distinct expert shards over the EP group
            dist.all_reduce(experts_sq, group=lay.ep_group)
        total = (dense_sq + experts_sq).sqrt()
        if math.isfinite(max_norm) and dense + local:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(dense + local, coef)
        return total

    def step(self, lr: float) -> Optional[Tensor]:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state(self) -> dict[str, Tensor]:
        """The single-process model state, on rank 0's CPU ({} elsewhere); collective."""
        return full_state_dict(self.model, 0 if self.layout.distributed else None)

    def optimizer_state(self) -> dict[str, Any]:
        return full_optimizer_state(self.model, self.optimizer, 0 if self.layout.distributed else None)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        load_full_optimizer_state(self.model, self.optimizer, state)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _fully_shard(model: nn.Module, mesh: Any, ignored: set[nn.Parameter]) -> None:
    """FSDP2 units: each repeated block (the items of every ``nn.ModuleList``), then the
    root for what is left (embeddings, norms, head, projector). Expert-parallel weights
    are ignored: they are sharded over experts already."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # Blocks return views that nothing modifies in place; FSDP warns about them regardless.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
