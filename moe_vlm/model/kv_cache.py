"""KV-cached forward of ``DecoderLM`` for autoregressive generation.

Legend: B batch, S new tokens this call, C cache width, G key/value heads, Hd head dim,
D model width, V vocabulary, T real tokens.

A separate path from the training forward (which stays as it is): each call appends S
tokens per row to the cache and returns their logits. The prefill passes the (left-padded)
prompts, each decode step one token per row. Per call:

- attention: the new queries attend to every cached key that is real (``KVCache.real``)
  and not in their future; a padded query attends to itself only, so its (unused) output
  is finite and never poisons a real token through a zero attention weight;
- rotary positions come from the caller per token (``positions``, counted from each row's
  first real token, or V2PE's fractional ones), through ``DecoderLM.rotary_at``, whose
  integer positions give the training table's angles bit for bit;
- MoE layers route only the real tokens (``token_mask`` -> ``real_rows``, as in training),
  one token per row in the decode steps; the recurrent router's state (RMoE) runs from
  MoE layer to MoE layer within each call, as in training (it is per token, not per time
  step, so nothing is cached for it); ``image_mask`` flags the image tokens for
  modality-aware routing.

Routing that depends on the other tokens of the batch (expert choice, capacity dropping,
router replay, forced balance) cannot decode one token at a time like the full forward;
``check_cacheable`` refuses those models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_vlm.config.schema import Gate, RoutingConfig, RoutingReplay
from moe_vlm.model.decoder import DecoderLM
from moe_vlm.model.moe import real_rows


@dataclass
class KVCache:
    """Per layer keys and values [B, G, C, Hd] (after qk-norm and rotary, before the GQA
    repeat), which cache slots hold real tokens [B, C] bool, and how many slots are used."""

    k: list[Tensor]
    v: list[Tensor]
    real: Tensor
    length: int = 0

    @classmethod
    def empty(cls, decoder: DecoderLM, batch: int, width: int, dtype: torch.dtype,
              device: torch.device) -> "KVCache":
        g, hd = decoder.cfg.n_kv_heads, decoder.head_dim
        shape = (batch, g, width, hd)
        n = len(decoder.layers)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   real=torch.zeros(batch, width, dtype=torch.bool, device=device))


def check_cacheable(routing: RoutingConfig) -> None:
    """Refuse routing whose choice for a token depends on the other tokens of the batch:
    decoding one token at a time would then differ from the full forward."""
    if routing.gate == Gate.expert_choice:
        raise ValueError("routing.gate=expert_choice: experts choose among all tokens of a "
                         "batch, which a token-by-token decoder never sees; generation needs "
                         "token-choice routing")
    if routing.capacity_factor is not None:
        raise ValueError(f"routing.capacity_factor={routing.capacity_factor}: capacity dropping "
                         "depends on the whole batch, so decoding one token at a time would "
                         "differ from the full forward; load with routing.capacity_factor=null "
                         "(dropless) to generate")
    if routing.replay != RoutingReplay.none or routing.force_balance:
        raise ValueError("routing.replay / routing.force_balance route by a record or by "
                         "position, not by the token; set them off to generate")


def attention_mask(real: Tensor, start: int, n_new: int) -> Tensor:
    """[B, 1, S, start + S] bool: query i (cache slot start + i) may attend to slot j when
    j <= start + i and slot j is real, and always to itself."""
    total = start + n_new
    q = torch.arange(start, total, device=real.device)[:, None]  # [S, 1] query slots
    kpos = torch.arange(total, device=real.device)[None, :]  # [1, C'] key slots
    causal = kpos <= q  # [S, C']
    allowed = (causal & real[:, None, :total]) | (kpos == q)  # [B, S, C']
    return allowed.unsqueeze(1)


@torch.no_grad()
def cached_forward(decoder: DecoderLM, embeds: Tensor, positions: Tensor, cache: KVCache,
                   token_mask: Tensor, image_mask: Optional[Tensor] = None) -> Tensor:
    """Append S tokens per row to ``cache`` and return their logits [B, S, V] (fp32).

    embeds [B, S, D] (``decoder.embed`` of the ids, or the VLM's spliced embeddings);
    positions [B, S] float rotary positions; token_mask [B, S] bool (False = left padding);
    image_mask [B, S] bool or None (no image tokens)."""
    b, s, _ = embeds.shape
    start = cache.length
    if start + s > cache.real.shape[1]:
        raise ValueError(f"KV cache full: {start} + {s} tokens > its {cache.real.shape[1]} slots")
    cache.real[:, start:start + s] = token_mask
    cos, sin = decoder.rotary_at(positions)  # [B, 1, S, Hd/2]
    mask = attention_mask(cache.real, start, s)  # [B, 1, S, start + S]
    rows = real_rows(token_mask) if any(decoder.schedule) else None  # [T] or None
    x, state = embeds, None  # [B, S, D]; the recurrent router's state [T, R]
    for i, blk in enumerate(decoder.layers):
        q, k, v = blk.attn.project(blk.attn_norm(x), cos, sin)  # [B, H|G, S, Hd]
        cache.k[i][:, :, start:start + s] = k
        cache.v[i][:, :, start:start + s] = v
        x = x + blk.attn.attend(q, cache.k[i][:, :, :start + s], cache.v[i][:, :, :start + s], mask)
        x, r = blk.feed_forward(x, rows, None, image_mask, state, decoder.router_gru)
        if r is not None:
            state = r.state
    cache.length = start + s
    w = decoder.embed.weight if decoder.head is None else decoder.head.weight  # [V, D]
    return F.linear(decoder.norm(x), w).float()  # [B, S, V]
