"""Apply parallelism to a built model, in one place and in torchtitan's order:

1. **expert parallelism** (``parallel.ep > 1``): each MoE layer keeps its slice of the
   experts and swaps its ``LocalDispatcher`` for an ``AllToAllDispatcher``; with data
   parallelism alone the routers still sum their expert counts over all ranks (the
   global-batch balance loss); LSH-MoE (``parallel.lsh``) then wraps each dispatcher so
   only bucket centroids cross the exchange (``moe_vlm.model.lsh_dispatch``);
2. **activation checkpointing** (``parallel.activation_checkpointing``): ``full``: every
   repeated block (decoder layers, vision blocks) keeps only its input and recomputes its
   activations in the backward (``torch.utils.checkpoint``, non-reentrant); ``moe``: only
   the routed experts' compute of each MoE layer is recomputed (their [N, 2F] hidden
   rows are most of an MoE block's activations; routing and all-to-alls are not redone);
3. **compilation** (``parallel.compile``): every repeated block is compiled in place with
   ``torch.compile`` (per block, so one graph serves all layers of a kind);
4. **data parallelism**: FSDP2 (``parallel.fsdp``: each block, then the root) or DDP,
   expert-parallel weights left out of both (their gradients are reduced by the engine
   over the expert-data-parallel group).

DeepSpeed (``parallel.engine=deepspeed``) gets steps 1-3 here; its ZeRO partitioning is
part of ``deepspeed.initialize``, which wraps model and optimizer together
(``moe_vlm.parallel.deepspeed_engine``).

None of this changes parameter names or the state dict, so checkpoints stay the
single-process ones. Load checkpoint weights into the model *before* parallelizing: expert
parallelism slices the loaded experts.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from moe_vlm.config.schema import Config, ConfigError
from moe_vlm.model.dispatch import LocalDispatcher
from moe_vlm.model.lsh_dispatch import apply_lsh
from moe_vlm.model.vision_moe import vision_moe_layers
from moe_vlm.parallel.expert_parallel import (apply_expert_parallel, expert_parameters,
                                              set_count_reducers)
from moe_vlm.parallel.routing_reuse import block_routers, checkpoint_reusing_routing
from moe_vlm.parallel.runtime import Layout


@dataclass
class Parallelized:
    """A model made ready for its layout. ``model`` is the module whose parameters and
    state dict are the run's (the same object that was passed in); ``module`` is what the
    engine calls (a DDP wrapper, or ``model`` itself)."""

    model: nn.Module
    module: nn.Module
    expert_params: list[nn.Parameter] = field(default_factory=list)  # EP-sharded, reduced by hand
    ddp: bool = False
    fsdp: bool = False


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The items of every ``nn.ModuleList`` (decoder layers, vision blocks): the units that
    are checkpointed, compiled and sharded one at a time."""
    return [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]


def parallelize(model: nn.Module, layout: Layout, cfg: Config,
                amp: Optional[torch.dtype] = None) -> Parallelized:
    """Expert parallelism, activation checkpointing, compilation, then FSDP/DDP (the steps
    ``cfg.parallel`` asks for; see the module docstring). In place; returns what the engine
    needs. ``amp``: the autocast dtype the run trains in (None: the weights' dtype), which
    decides whether the experts' backend can be compiled."""
    pcfg = cfg.parallel
    moes = _all_moe_layers(model)
    if layout.ep > 1:
        apply_expert_parallel(model, layout.ep_group)
    elif layout.distributed and moes:
        set_count_reducers(model)
    if pcfg.lsh:  # around the exchange (or the local dispatch): LSH-MoE's centroids
        apply_lsh(model, pcfg.lsh_hashes, pcfg.lsh_dim, pcfg.lsh_seed, pcfg.lsh_compensate,
                  pcfg.lsh_eval)
    if pcfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, str(pcfg.activation_checkpointing))
    if pcfg.compile:
        apply_compile(model, amp)
    experts = expert_parameters(model)
    par = Parallelized(model=model, module=model, expert_params=experts)
    if not layout.distributed or pcfg.engine == "deepspeed":
        return par
    trainable = [p for p in model.parameters() if p.requires_grad]
    expert_ids = {id(p) for p in experts}
    if layout.fsdp:
        _fully_shard(model, layout.dp_mesh, set(experts))
        par.fsdp = True
    elif any(id(p) not in expert_ids for p in trainable):
        par.module = _ddp(model, layout, expert_ids, find_unused=cfg.vision.name != "none")
        par.ddp = True
    return par


def _all_moe_layers(model: nn.Module) -> list:
    """The decoder's MoE layers, then the vision tower's (V-MoE)."""
    decoder = model.moe_layers() if hasattr(model, "moe_layers") else []
    return [*decoder, *vision_moe_layers(model)]


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> None:
    """``full``: checkpoint every repeated block: its forward runs under non-reentrant
    ``torch.utils.checkpoint``, so only the block's inputs are kept and the rest is
    recomputed in the backward. The block's own ``forward`` is wrapped (an instance
    attribute), not the module, so parameter names and the state dict do not change.
    Recomputation repeats the forward exactly, and the recomputed routers are handed the
    forward's selections (``moe_vlm.parallel.routing_reuse``: they cannot route otherwise),
    so losses and gradients are unchanged.
    ``moe``: only each MoE layer's routed-expert compute is checkpointed
    (``GroupedExperts.recompute``)."""
    if mode == "moe":
        for moe in _all_moe_layers(model):
            moe.experts.recompute = True
        return
    if mode != "full":
        raise ValueError(f"activation checkpointing mode {mode!r}: choose none, moe or full")
    for block in repeated_blocks(model):
        if getattr(block, "_moe_vlm_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args: Any, _inner=inner, _routers=block_routers(block), **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # evaluation: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint_reusing_routing(_inner, _routers, *args, **kwargs)

        block.forward = forward
        block._moe_vlm_checkpointed = True


def apply_compile(model: nn.Module, amp: Optional[torch.dtype] = None) -> None:
    """Compile every repeated block in place (``nn.Module.compile``: names unchanged).

    An MoE block selects its real (non-padding) tokens with ``nonzero``, whose output size
    depends on the data; dynamo is told to trace such operators
    (``capture_dynamic_output_shape_ops``) instead of breaking the graph there, so each
    block is one graph (tested: no graph break with ``grouped_mm`` in bf16, activation
    checkpointing on). Expert parallelism's all-to-all reads its split sizes on the host
    and still breaks the graph.

    The Triton experts (the fused dispatcher + experts pair) are ``torch.library`` custom
    ops with fake implementations, opaque to the compiler: no graph break either.

    Refused, naming what to change, where the experts do not trace today: ``grouped_mm``
    outside bf16 (``torch._grouped_mm``'s meta function takes bf16 only) and
    ``triton`` under expert parallelism (its sorted-rows experts are custom ops too, but
    compiling around the all-to-all is not tested yet). The
    ``torch`` backend traces, but its per-expert loop reads the offsets on the host: a
    graph break and a recompile per new set of sizes (minutes on a CPU)."""
    decoder = model.moe_layers() if hasattr(model, "moe_layers") else []
    for moe in decoder[:1] + vision_moe_layers(model)[:1]:  # one of each kind of experts
        w = moe.experts.w_in  # [E, D, 2F] or [E, D, F]
        probe = torch.empty(0, w.shape[1], device=w.device, dtype=w.dtype)  # an input like the layer's
        with torch.autocast(w.device.type, dtype=amp, enabled=amp is not None):
            backend = moe.experts.backend_name(probe)
        fused = isinstance(moe.dispatcher, LocalDispatcher)
        if backend == "grouped_mm" and (amp or w.dtype) != torch.bfloat16:
            raise ConfigError("parallel.compile: the experts' grouped_mm backend does not compile "
                              "outside bf16 (autocast or bf16 weights); use train.precision=bf16, "
                              "moe.backend=triton or torch, or parallel.compile=false")
        if backend == "triton" and not fused:
            raise ConfigError("parallel.compile: the triton backend is not tested compiled under "
                              "expert parallelism yet; use moe.backend=grouped_mm (bf16) or torch, "
                              "or parallel.compile=false")
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    for block in repeated_blocks(model):
        block.compile(dynamic=None)


def _ddp(model: nn.Module, layout: Layout, expert_ids: set[int], find_unused: bool) -> nn.Module:
    """DDP over all ranks for the dense parameters; expert-parallel weights are ignored
    (the engine reduces them over the expert-data-parallel group). Router biases are
    updated identically on every rank, so buffers are not synchronised per step.
    ``find_unused``: a VLM batch may hold no image, leaving the vision path unused."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = [n for n, p in model.named_parameters() if id(p) in expert_ids]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(DDP).parameters else {"broadcast_buffers": False}
    return DDP(model, device_ids=[layout.device] if layout.device.type == "cuda" else None,
               find_unused_parameters=find_unused, **no_sync)


def _fully_shard(model: nn.Module, mesh: Any, ignored: set[nn.Parameter]) -> None:
    """FSDP2 units: each repeated block, then the root for what is left (embeddings,
    norms, head, projector). Expert-parallel weights are ignored: they are sharded over
    experts already."""
    from torch.distributed.fsdp import fully_shard

    # Blocks return views that nothing modifies in place; FSDP warns about them regardless.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
