"""Activation checkpointing that recomputes a block with the forward's routing.

Legend: T tokens, K experts per token, E experts, C tokens per expert.

With ``parallel.activation_checkpointing=full`` the backward re-runs each block's forward,
router included. Were the router to choose differently the second time (a GPU top-k tie
broken another way, a weight or balance bias changed in between), the recomputed
activations would belong to another routing than the loss, and the gradients would be
wrong, silently. So the checkpointed function keeps each router's selection of the
forward ([T, K] expert ids, or [E, C] token ids for expert choice: a few int64 per token
and layer) and hands it back to the router in the recompute (``Router.select_hook``),
Megatron-Core's ``REPLAY_BACKWARD``. The combine weights are recomputed from the scores
at those experts, as in the forward. A hook already on the router (router replay) is
called in the forward only.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_vlm.routing.router import Router


def block_routers(block: nn.Module) -> list[Router]:
    """The routers inside ``block`` (an MoE block has one; a dense block none)."""
    return [m for m in block.modules() if isinstance(m, Router)]


@contextmanager
def _stash_selections(routers: list[Router], stash: list[deque], recompute: bool) -> Iterator[None]:
    """While active: the forward (``recompute=False``) appends each router's selection to
    its ``stash`` queue (after any hook already there); the recompute pops them in order.
    The routers' own hooks are restored on exit."""
    before = [r.select_hook for r in routers]

    def record(i: int) -> Callable[[Tensor], Tensor]:
        def hook(selected: Tensor) -> Tensor:
            if before[i] is not None:
                selected = before[i](selected)
            stash[i].append(selected)
            return selected
        return hook

    def reuse(i: int) -> Callable[[Tensor], Tensor]:
        def hook(selected: Tensor) -> Tensor:
            if not stash[i]:
                raise RuntimeError("activation checkpointing recomputed a router that did not "
                                   "route in the forward")
            return stash[i].popleft()
        return hook

    try:
        for i, r in enumerate(routers):
            r.select_hook = reuse(i) if recompute else record(i)
        yield
    finally:
        for r, hook in zip(routers, before):
            r.select_hook = hook


def checkpoint_reusing_routing(fn: Callable[..., Any], routers: list[Router], *args: Any,
                               **kwargs: Any) -> Any:
    """``torch.utils.checkpoint(fn, *args)`` (non-reentrant) whose recompute routes every
    router of ``routers`` as the forward did. Under ``torch.compile`` the plain checkpoint
    is traced instead (the compiled graph recomputes from the same saved inputs; Python
    side effects would break the graph)."""
    if not routers or torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    stash: list[deque] = [deque() for _ in routers]
    calls = [0]

    def run(*a: Any, **kw: Any) -> Any:
        recompute = calls[0] > 0
        calls[0] += 1
        with _stash_selections(routers, stash, recompute):
            return fn(*a, **kw)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)
