"""Parameter and FLOP accounting (total vs active), for summaries and scaling fits.

Conventions (as nanoGPT / PaLM / Chinchilla): a matmul with P weights costs 2P FLOPs
per token forward; attention scores and the value mix add ``4 * S * H * Hd`` per layer
(full S x S, not discounting the causal mask); training = 3 x forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_vlm.model.decoder import DecoderLM
from moe_vlm.model.vision_moe import vision_moe_layers


def _decoder(model: nn.Module) -> DecoderLM:
    return getattr(model, "decoder", model)  # a VisionLanguageModel wraps a DecoderLM


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter (tied head counted once)
    active: int  # parameters used per token: total minus the unchosen routed experts
    embedding: int  # token embedding (+ untied head)
    routed_expert: int  # all routed expert parameters (the vision tower's MoE layers' too)


def count_params(model: nn.Module) -> ParamCounts:
    """Counts of a ``DecoderLM`` or a ``VisionLanguageModel`` (vision tower and projector
    included in total and active; a vision MoE layer's unchosen experts are inactive, per
    image token). The recurrent router's shared GRU (``routing.recurrent``) and its
    per-layer projections are router parameters: active, the GRU counted once."""
    total = sum(p.numel() for p in model.parameters())
    dec = _decoder(model)
    emb = dec.embed.weight.numel() + (dec.head.weight.numel() if dec.head is not None else 0)
    routed, inactive = 0, 0
    for moe in [*model.moe_layers(), *vision_moe_layers(model)]:
        per_expert = sum(p.numel() for p in moe.experts.parameters()) // moe.sizes.n_experts
        routed += per_expert * moe.sizes.n_experts
        inactive += per_expert * (moe.sizes.n_experts - moe.sizes.top_k)
    return ParamCounts(total=total, active=total - inactive, embedding=emb, routed_expert=routed)


def flops_per_token(model: nn.Module, seq_len: int, training: bool = True) -> int:
    """Active decoder FLOPs per sequence position: every active matmul (router and LM head
    included, the embedding lookup and norms excluded) plus attention over ``seq_len``.
    For a VLM this is the decoder's cost per token; the vision tower runs once per image.
    The recurrent router's shared GRU is counted once per MoE layer it runs in."""
    model = _decoder(model)
    c = count_params(model)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    matmul = c.active - model.embed.weight.numel() - norms
    if model.head is None:  # tied: the head is still a [V, D] matmul (untied: counted in active)
        matmul += model.embed.weight.numel()
    if model.router_gru is not None:  # routing.recurrent: one shared GRU cell, run per MoE layer
        matmul += (len(model.moe_layers()) - 1) * sum(p.numel() for p in model.router_gru.parameters())
    attn = 4 * seq_len * model.cfg.n_heads * model.head_dim * model.cfg.n_layers
    fwd = 2 * matmul + attn
    return 3 * fwd if training else fwd
