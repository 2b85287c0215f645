"""Expert parallelism: experts sharded over an EP process group, tokens moved with
all-to-all. Applied to a built model (``apply_expert_parallel``): each MoE layer keeps its
``GroupedExperts`` (sliced to this rank's experts) and gets an ``AllToAllDispatcher`` in
place of its ``LocalDispatcher``; model math stays distributed-free.

Legend: T local tokens, D model width, N local assignments, M assignments received,
E experts (global), El = E / ep experts on this rank, ep EP group size.

One MoE layer's routed experts on rank r (owner of experts ``[r*El, (r+1)*El)``):
1. sort local assignments by expert; owner rank = expert // El; ``send[j]`` rows go to rank j;
2. exchange counts (``all_to_all_single`` on ``[ep]`` ints; one host sync for the split
   sizes), then rows ``x[token]`` and their local expert ids (uneven splits; a rank may
   send or receive nothing);
3. the received ``[M, D]`` rows, sorted by local expert, run through the experts as on
   one process (torch / grouped_mm / triton backends, pure compute on sorted rows);
4. the outputs go back to arrival order, travel back by the reverse all-to-all and are
   combined into ``[T, D]`` with the routing weights (``dispatch.weighted_combine``).
Both exchanges are differentiable (``_AllToAll``), so gradients reach
``x``, the routing weights and the local expert weights. Shared experts and the router
stay local (data parallel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_vlm.model.dispatch import sort_by_expert, weighted_combine
from moe_vlm.model.experts import GroupedExperts


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits, differentiable: the backward sends the
    gradients back the reverse way. Synchronous c10d calls return plain tensors, which
    kernels taking raw pointers (Triton) need."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int],
                group: Optional[dist.ProcessGroup]) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        dx = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


@dataclass(frozen=True)
class _Sent:
    """What ``AllToAllDispatcher.combine`` needs from its ``dispatch``."""

    token: Tensor  # [N] token of each sent row (sent in expert order)
    weight: Tensor  # [N] routing weight of each sent row
    arrival: Tensor  # [M] position in arrival order of each expert-sorted received row
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank
    n_tokens: int
    dtype: torch.dtype


class AllToAllDispatcher(nn.Module):
    """The dispatcher of an expert-parallel MoE layer: this rank holds experts
    ``[first_expert, first_expert + n_local)`` of ``n_experts``; tokens travel to their
    experts' ranks and back by all-to-all. Same call as ``LocalDispatcher``. No parameters."""

    def __init__(self, n_experts: int, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.ep:
            raise ValueError(f"expert parallelism: {n_experts} experts do not split over "
                             f"ep={self.ep} ranks; choose parallel.ep dividing the expert count")
        self.n_experts, self.n_local = n_experts, n_experts // self.ep
        self.first_expert = self.rank * self.n_local

    def dispatch(self, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor
                 ) -> tuple[Tensor, Tensor, _Sent]:
        """x [T, D], global assignments [N] -> (received rows [M, D] sorted by local expert,
        offsets [El], what ``combine`` needs)."""
        order = torch.argsort(expert_idx, stable=True)  # [N]
        tok, exp, wgt = token_idx[order], expert_idx[order], weight[order]
        owner = exp // self.n_local  # [N]
        send = torch.bincount(owner, minlength=self.ep)  # [ep]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_l, recv_l = send.tolist(), recv.tolist()  # host sync: split sizes
        local_ids = exp - owner * self.n_local  # [N] expert id on its owner rank
        ids_recv = local_ids.new_empty(sum(recv_l))  # [M]
        dist.all_to_all_single(ids_recv, local_ids, recv_l, send_l, group=self.group)
        # index_select: a deterministic backward for the repeated tokens (dispatch.py)
        rows = _AllToAll.apply(x.index_select(0, tok), recv_l, send_l, self.group)  # [M, D]
        arrival, offsets = sort_by_expert(ids_recv, self.n_local)  # [M], [El]
        return (rows.index_select(0, arrival), offsets,
                _Sent(tok, wgt, arrival, send_l, recv_l, x.shape[0], x.dtype))

    def combine(self, out: Tensor, sent: _Sent) -> Tensor:
        """Expert outputs [M, D] (expert-sorted, as dispatched) -> y [T, D]."""
        back = out.new_empty(out.shape).index_copy(0, sent.arrival, out)  # [M] arrival order
        back = _AllToAll.apply(back, sent.send, sent.recv, self.group)  # [N, D]
        return weighted_combine(back, sent.token, sent.weight, sent.n_tokens, sent.dtype)

    def forward(self, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                experts: GroupedExperts) -> Tensor:
        rows, offsets, sent = self.dispatch(x, token_idx, expert_idx, weight)
        return self.combine(experts(rows, offsets), sent)

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.n_local - 1} of "
                f"{self.n_experts} (ep={self.ep})")


def shard_experts(experts: GroupedExperts, dispatcher: AllToAllDispatcher) -> None:
    """Keep only this rank's experts (in place): ``w_in/w_out`` (and the biases of MLP
    experts) ``[E, ...] -> [El, ...]``."""
    sl = slice(dispatcher.first_expert, dispatcher.first_expert + dispatcher.n_local)
    for name in experts.stacked_names:
        p = getattr(experts, name)
        setattr(experts, name, nn.Parameter(p.detach()[sl].clone(), requires_grad=p.requires_grad))
    experts.n_experts = dispatcher.n_local


def sharded_experts(model: nn.Module) -> dict[str, tuple[GroupedExperts, AllToAllDispatcher]]:
    """Module name of each expert-parallel ``GroupedExperts`` -> (it, its dispatcher)."""
    from moe_vlm.model.moe import MoELayer

    found = {}
    for name, m in model.named_modules():
        disp = getattr(m.dispatcher, "inner", m.dispatcher) if isinstance(m, MoELayer) else None
        if isinstance(disp, AllToAllDispatcher):  # LSH-MoE wraps it (``inner``)
            found[f"{name}.experts" if name else "experts"] = (m.experts, disp)
    return found


def _sum_counts(group: Optional[dist.ProcessGroup]):
    def reduce(counts: Tensor) -> Tensor:
        counts = counts.detach().clone()
        dist.all_reduce(counts, group=group)
        return counts
    return reduce


def apply_expert_parallel(model: nn.Module, ep_group: Optional[dist.ProcessGroup] = None,
                          dp_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Shard every MoE layer's experts over ``ep_group`` (in place; returns ``model``).

    Each rank keeps its slice of the (identically initialised or loaded) global expert
    weights. Routers sum expert counts over ``dp_group`` (all ranks by default) for the
    global-batch balance loss."""
    from moe_vlm.model.moe import MoELayer

    n = 0
    for mod in model.modules():
        if isinstance(mod, MoELayer):
            if not isinstance(mod.dispatcher, AllToAllDispatcher):
                mod.dispatcher = AllToAllDispatcher(mod.experts.n_experts, ep_group)
                shard_experts(mod.experts, mod.dispatcher)
            n += 1
    if n == 0:
        raise ValueError("apply_expert_parallel: the model has no MoE layers")
    return set_count_reducers(model, dp_group)


def set_count_reducers(model: nn.Module, dp_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Make every router sum its expert counts over ``dp_group`` (all ranks by default)
    for the global-batch balance loss (``routing.aux_loss_scope=global_batch``); needed
    with data parallelism alone (ep=1) too."""
    from moe_vlm.routing.router import Router

    for mod in model.modules():
        if isinstance(mod, Router):
            mod.count_reducer = _sum_counts(dp_group)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert-parallel (sharded) parameters: not data-parallel like the rest."""
    return [p for ex, _ in sharded_experts(model).values() for p in ex.parameters(recurse=False)]


@torch.no_grad()
def reduce_expert_grads(params: list[nn.Parameter], expert_dp_group: Optional[dist.ProcessGroup],
                        world: int) -> None:
    """Expert gradients as one global batch: summed over the ranks holding the same experts
    (``expert_dp_group``; ``None`` = each rank holds a distinct shard) and divided by the
    world size (each rank's loss is the mean over its own slice of the batch). A missing
    gradient counts as zero, so every rank runs the same collectives."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1:
        for p in params:
            dist.all_reduce(p.grad, group=expert_dp_group)
    if params:
        torch._foreach_div_([p.grad for p in params], world)


def gather_shards(local: Tensor, mod: AllToAllDispatcher, dst: Optional[int]) -> Optional[Tensor]:
    """An expert tensor's ``[El, ...]`` shards over ``mod``'s EP group -> ``[E, ...]``.
    ``dst=None``: on every rank. ``dst=r``: on global rank r only, moved to CPU (None
    elsewhere; EP groups without r hold replicas and skip). Collective over the group."""
    local = local.detach().contiguous()
    if dst is None:
        parts = [torch.empty_like(local) for _ in range(mod.ep)]
        dist.all_gather(parts, local, group=mod.group)
        return torch.cat(parts, 0)
    if dst not in dist.get_process_group_ranks(mod.group):
        return None
    mine = dist.get_rank() == dst
    parts = [torch.empty_like(local) for _ in range(mod.ep)] if mine else None
    dist.gather(local, parts, dst=dst, group=mod.group)
    return torch.cat(parts, 0).cpu() if mine else None


def full_tensor(v: Any, keep: bool, to_cpu: bool) -> Any:
    """An FSDP shard (DTensor) gathered (collective on every rank), else ``v``; returned
    (on CPU if ``to_cpu``) where ``keep``, else None."""
    if hasattr(v, "full_tensor"):
        v = v.full_tensor()
    if not keep:
        return None
    return v.cpu() if to_cpu and isinstance(v, Tensor) else v


@torch.no_grad()
def full_state_dict(model: nn.Module, dst: Optional[int] = None) -> dict[str, Tensor]:
    """The single-process state dict of a (possibly expert-parallel, FSDP-sharded) model:
    expert shards gathered along the expert dimension and FSDP shards gathered, so a
    checkpoint saved from it loads at any layout (``load_full_state_dict``, or plainly on
    one process). ``dst=None``: on every rank. ``dst=r``: only global rank r gets it,
    tensor by tensor on CPU, so saving a large model costs no accelerator memory; the other
    ranks return ``{}``."""
    keep = dst is None or dist.get_rank() == dst
    sd = {}
    for key, value in model.state_dict().items():
        value = full_tensor(value, keep, dst is not None)
        if keep:
            sd[key] = value
    for name, (ex, disp) in sharded_experts(model).items():
        for pname in ex.stacked_names:
            full = gather_shards(getattr(ex, pname), disp, dst)  # [E, ...]
            if keep:
                sd[f"{name}.{pname}"] = full
    return sd


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a single-process state dict into a (possibly expert-parallel) model: each
    rank takes its slice of every expert tensor. Shapes and names must otherwise match."""
    shards = {name: (ex, disp) for name, (ex, disp) in sharded_experts(model).items()}
    local = {}
    for key, value in state.items():
        owner, _, pname = key.rpartition(".")
        ex, mod = shards.get(owner, (None, None))
        if mod is not None and pname in ex.stacked_names:
            if value.shape[0] != mod.n_experts:
                raise ValueError(f"{key}: the checkpoint has {value.shape[0]} experts, the model "
                                 f"{mod.n_experts}; the expert count must match across layouts")
            value = value[mod.first_expert:mod.first_expert + mod.n_local]
        local[key] = value
    model.load_state_dict(local)
