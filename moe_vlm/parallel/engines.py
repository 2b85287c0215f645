"""Training engines: one typed interface (``Engine``) over plain PyTorch (a single
process, DDP or FSDP2, with or without expert parallelism: ``parallel.engine=torch``) and
DeepSpeed ZeRO-1/2 (``parallel.engine=deepspeed``).

The training step calls, per optimizer step::

    for each micro-batch: out = engine.forward_backward(inputs, last, amp)
    result = engine.step(lr, loss)   # StepResult(grad_norm, skipped)

``step`` finishes the gradient reduction, measures the global gradient norm, clips it
(``train.grad_clip``) and decides finiteness: when the step's loss or the norm is NaN/inf it
clears the gradients, leaves weights and optimizer state untouched and returns
``skipped=True``. The decision is the same on every rank (the loss is the reduced step
loss and the norm the global one). What to do about a skipped step (stop or go on) is the
training loop's ``train.nan_policy``.

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
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_vlm.parallel.expert_parallel import full_state_dict, reduce_expert_grads
from moe_vlm.parallel.parallelize import Parallelized
from moe_vlm.parallel.runtime import Layout
from moe_vlm.parallel.state import full_optimizer_state, load_full_optimizer_state

AmpContext = Callable[[], ContextManager]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate into every parameter group, times the group's ``lr_scale``
    (``train.vision_lr_scale``: ``moe_vlm.train.optim.param_groups``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    grad_norm: Tensor  # scalar: the global gradient norm before clipping (NaN/inf if non-finite)
    skipped: bool  # non-finite loss or gradients: no update, gradients cleared


class Engine(Protocol):
    """What the training loop needs from an engine (``TorchEngine``, ``DeepSpeedEngine``)."""

    name: str
    model: nn.Module  # the run's model: its parameters and state dict are the checkpoint's

    def forward_backward(self, inputs: dict[str, Any], last: bool, amp: AmpContext) -> Any:
        """Forward one micro-batch and backpropagate its share of the step loss; ``last``
        marks the step's last micro-batch (where gradient reductions finish)."""

    def step(self, lr: float, loss: Tensor) -> StepResult:
        """Reduce and clip the gradients, decide finiteness from them and the step's
        reduced ``loss``, and update the weights at ``lr`` unless non-finite."""

    def model_state(self) -> dict[str, Tensor]:
        """The single-process model state on rank 0's CPU ({} elsewhere); collective."""

    def optimizer_state(self) -> dict[str, Any]:
        """The single-process optimizer state (rank 0); collective."""

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load a single-process optimizer state (any layout, either engine saved it)."""


def _sq_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).square().sum()


def finite(*values: Tensor) -> bool:
    """Whether every scalar in ``values`` is finite (one host sync)."""
    ok = torch.ones((), dtype=torch.bool, device=values[0].device)
    for v in values:
        ok = ok & torch.isfinite(v.to(ok.device))
    return bool(ok)


class TorchEngine:
    """Plain PyTorch: an optimizer (AdamW) on every rank over a model that ``parallelize``
    made ready (dense parameters replicated with DDP or sharded with FSDP2; expert-parallel
    weights left out of both, their gradients averaged here over the expert-data-parallel
    group)."""

    name = "torch"

    def __init__(self, par: Parallelized, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                 layout: Layout, grad_clip: float):
        self.model, self.module, self.layout = par.model, par.module, layout
        self.fsdp, self.ddp = par.fsdp, par.ddp
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        expert_ids = {id(p) for p in par.expert_params}
        # After sharding: FSDP replaced the dense parameters with DTensor shards.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.expert_params = [p for p in self.trainable if id(p) in expert_ids]
        self.dense_params = [p for p in self.trainable if id(p) not in expert_ids]
        self.optimizer = optimizer_fn(self.model)

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
    def clip_gradients(self) -> Tensor:
        """The first half of ``step``: finish the gradient reduction (expert parameters)
        and clip to ``train.grad_clip`` by the global norm, which is returned (the same on
        every rank). Afterwards every parameter's ``.grad`` is its full step gradient."""
        lay = self.layout
        if lay.distributed:
            reduce_expert_grads(self.expert_params, lay.edp_group, lay.world)
        if not (lay.distributed and (lay.ep > 1 or self.fsdp)):  # every rank holds every gradient
            return torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm)
        dense = [_local(p.grad) for p in self.dense_params if p.grad is not None]
        local = [p.grad for p in self.expert_params]
        dense_sq = _sq_norm(dense, lay.device)
        if self.fsdp:  # disjoint shards over all ranks
            dist.all_reduce(dense_sq)
        experts_sq = _sq_norm(local, lay.device)
        if lay.ep > 1:  # distinct expert shards over the EP group
            dist.all_reduce(experts_sq, group=lay.ep_group)
        total = (dense_sq + experts_sq).sqrt()
        if math.isfinite(self.max_norm) and dense + local:
            coef = (self.max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(dense + local, coef)
        return total

    def step(self, lr: float, loss: Tensor) -> StepResult:
        norm = self.clip_gradients()
        if not finite(loss, norm):  # host sync; the same on every rank
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(norm, skipped=True)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped=False)

    def model_state(self) -> dict[str, Tensor]:
        return full_state_dict(self.model, 0 if self.layout.distributed else None)

    def optimizer_state(self) -> dict[str, Any]:
        return full_optimizer_state(self.model, self.optimizer, 0 if self.layout.distributed else None)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        load_full_optimizer_state(self.model, self.optimizer, state)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t
