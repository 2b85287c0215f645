"""Which parameters train: named parameter groups chosen by ``train.trainable``.

Staged VLM training (MoE-LLaVA) trains the projector alone (``align``), then the
projector and decoder (``sft``), then only the MoE layers (``moe``). Frozen parameters
get ``requires_grad=False``, so no gradient, optimiser state or weight decay touches them.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from moe_vlm.config.schema import ConfigError

_MOE = re.compile(r"\.ffn\.(router|experts|shared)\.|(^|\.)router_gru\.")

GROUPS: dict[str, Callable[[str], bool]] = {
    "all": lambda n: True,
    "vision": lambda n: n.startswith("vision."),
    "projector": lambda n: n.startswith("projector."),
    "decoder": lambda n: not n.startswith(("vision.", "projector.")),
    "embeddings": lambda n: n.split(".")[-2] in ("embed", "head"),
    "attention": lambda n: ".attn." in n,
    "norms": lambda n: "norm" in n.split(".")[-2],
    "dense_mlp": lambda n: ".ffn.w_in." in n or ".ffn.w_out." in n,
    "moe": lambda n: bool(_MOE.search(n)),
    # routing.recurrent: the shared GRU cell (``router_gru``) is part of the routers
    "router": lambda n: ".ffn.router." in n or "router_gru." in n,
    "experts": lambda n: ".ffn.experts." in n,
    "shared_experts": lambda n: ".ffn.shared." in n,
}


def apply_trainable(model: nn.Module, groups: list[str]) -> dict[str, int]:
    """Set ``requires_grad`` from the union of ``groups``; return parameter counts.

    Raises ``ConfigError`` (naming ``train.trainable``) for an unknown group, a group that
    matches no parameter of this model, or a selection that trains nothing."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ConfigError(f"train.trainable: unknown group(s) {unknown}; choose from {sorted(GROUPS)}")
    names = [n for n, _ in model.named_parameters()]
    for g in groups:
        if not any(GROUPS[g](n) for n in names):
            raise ConfigError(f"train.trainable: group {g!r} matches no parameter of this model")
    trainable = frozen = 0
    for n, p in model.named_parameters():
        p.requires_grad_(any(GROUPS[g](n) for g in groups))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    if trainable == 0:
        raise ConfigError("train.trainable: the selection trains no parameter")
    return {"trainable": trainable, "frozen": frozen}
