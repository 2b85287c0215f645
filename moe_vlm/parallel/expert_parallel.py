"""Expert parallelism: experts sharded over an EP process group, tokens moved with
all-to-all. Applied to a built model (``apply_expert_parallel``); model math stays
distributed-free.

Legend: T local tokens, D model width, N local assignments, M assignments received,
E experts (global), El = E / ep experts on this rank, ep EP group size.

One MoE layer's routed experts on rank r (owner of experts ``[r*El, (r+1)*El)``):
1. sort local assignments by expert; owner rank = expert // El; ``send[j]`` rows go to rank j;
2. exchange counts (``all_to_all_single`` on ``[ep]`` ints; one host sync for the split
   sizes), then rows ``x[token]`` and their local expert ids (uneven splits; a rank may
   send or receive nothing);
3. the received ``[M, D]`` rows run through the same expert backend as on one process
   (torch / grouped_mm / triton), with weight 1 per row;
4. the outputs travel back by the reverse all-to-all and are combined into ``[T, D]`` with
   the routing weights.
Both exchanges are differentiable (``_AllToAll``), so gradients reach
``x``, the routing weights and the local expert weights. Shared experts and the router
stay local (data parallel).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_vlm.model.experts import BACKENDS, GroupedExperts, _compute_dtype, resolve_backend


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


class ExpertParallelExperts(nn.Module):
    """This rank's ``El`` experts of a ``GroupedExperts``, plus the all-to-all around them.

    Same call signature as ``GroupedExperts``: ``(x [T, D], token_idx, expert_idx, weight
    [N]) -> [T, D]`` with *global* expert ids."""

    def __init__(self, inner: GroupedExperts, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if inner.n_experts % self.ep:
            raise ValueError(f"expert parallelism: {inner.n_experts} experts do not split over "
                             f"ep={self.ep} ranks; choose parallel.ep dividing the expert count")
        self.n_experts, self.n_local = inner.n_experts, inner.n_experts // self.ep
        self.d_model, self.d_expert, self.backend = inner.d_model, inner.d_expert, inner.backend
        lo = self.rank * self.n_local
        sl = slice(lo, lo + self.n_local)
        self.w_in = nn.Parameter(inner.w_in.detach()[sl].clone(),
                                 requires_grad=inner.w_in.requires_grad)  # [El, D, 2F]
        self.w_out = nn.Parameter(inner.w_out.detach()[sl].clone(),
                                  requires_grad=inner.w_out.requires_grad)  # [El, F, D]
        self.first_expert = lo
        self._resolved: dict[tuple, Callable] = {}  # (device, dtype) -> backend fn, as GroupedExperts

    def backend_name(self, x: Tensor) -> str:
        return resolve_backend(self.backend, x.device, _compute_dtype(x), self.d_model, self.d_expert)

    def forward(self, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor) -> Tensor:
        t, d = x.shape
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
        # index_select: a deterministic backward for the repeated tokens (see experts.py)
        rows = _AllToAll.apply(x.index_select(0, tok), recv_l, send_l, self.group)  # [M, D]
        m = rows.shape[0]
        key = (x.device, _compute_dtype(x))
        fn = self._resolved.get(key)
        if fn is None:
            fn = self._resolved[key] = BACKENDS[self.backend_name(x)]()
        ones = torch.ones(m, device=x.device, dtype=weight.dtype)
        out = fn(rows, torch.arange(m, device=x.device), ids_recv, ones, self.w_in, self.w_out)  # [M, D]
        back = _AllToAll.apply(out, send_l, recv_l, self.group)  # [N, D]
        acc = torch.promote_types(x.dtype, torch.float32)
        y = torch.zeros(t, d, device=x.device, dtype=acc)
        y = y.index_add(0, tok, back.to(acc) * wgt[:, None].to(acc))  # [T, D]
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.n_local - 1} of "
                f"{self.n_experts} (ep={self.ep}), d_model={self.d_model}, d_expert={self.d_expert}")


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
            if not isinstance(mod.experts, ExpertParallelExperts):
                mod.experts = ExpertParallelExperts(mod.experts, ep_group)
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
    return [p for m in model.modules() if isinstance(m, ExpertParallelExperts)
            for p in m.parameters(recurse=False)]


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


@torch.no_grad()
def sync_gradients(model: nn.Module, world_group: Optional[dist.ProcessGroup] = None,
                   expert_dp_group: Optional[dist.ProcessGroup] = None) -> None:
    """Average gradients as one global batch without DDP: dense parameters summed over all
    ranks and divided by the world size, expert parameters as ``reduce_expert_grads``."""
    world = dist.get_world_size(world_group)
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    for p in model.parameters():
        if p.grad is not None and id(p) not in expert_ids:
            dist.all_reduce(p.grad, group=world_group)
            p.grad.div_(world)
    reduce_expert_grads([p for p in experts if p.requires_grad], expert_dp_group, world)


def gather_shards(local: Tensor, mod: ExpertParallelExperts, dst: Optional[int]) -> Optional[Tensor]:
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
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelExperts):
            for pname in ("w_in", "w_out"):
                full = gather_shards(getattr(mod, pname), mod, dst)  # [E, ...]
                if keep:
                    sd[f"{name}.{pname}" if name else pname] = full
    return sd


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a single-process state dict into a (possibly expert-parallel) model: each
    rank takes its slice of every expert tensor. Shapes and names must otherwise match."""
    shards = {name: mod for name, mod in model.named_modules() if isinstance(mod, ExpertParallelExperts)}
    local = {}
    for key, value in state.items():
        owner, _, pname = key.rpartition(".")
        mod = shards.get(owner)
        if mod is not None and pname in ("w_in", "w_out"):
            if value.shape[0] != mod.n_experts:
                raise ValueError(f"{key}: the checkpoint has {value.shape[0]} experts, the model "
                                 f"{mod.n_experts}; the expert count must match across layouts")
            value = value[mod.first_expert:mod.first_expert + mod.n_local]
        local[key] = value
    model.load_state_dict(local)
