"""Expert-weight memory of the decoder's MoE layers: full precision (bf16) against ternary
(MoTE), for ``summary.json`` (``expert_memory``, ``expert_bytes``) and the equal-memory
ablation.

Legend: E routed experts, D model width, F routed expert width, Fs shared width (all
shared experts together).

Per MoE layer, SwiGLU experts without biases:

- routed weights ``E * 3 * D * F`` (gate, up: ``w_in [E, D, 2F]``; down: ``w_out [E, F, D]``)
  and shared weights ``3 * D * Fs``;
- bf16: 16 bits a weight;
- ternary at the entropy of three values, log2(3) ~ 1.585 bits a weight (what "1.58-bit"
  names; base-3 packing of 5 weights per byte gets 1.6), or packed 2 bits a weight (what
  kernels use), plus one bf16 scale per expert and matrix (3 per expert);
- shared experts stay bf16 in MoTE (the frozen dense FFN).

Bytes round up to whole bytes per layer. Only the decoder's MoE layers are counted
(``moe.ternary`` applies to them; the vision tower's MoE layers, if any, stay full
precision). Nothing here reads tensors: the sizes are the model's full expert set, also
when expert parallelism later keeps a slice per rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

BF16_BITS = 16
TERNARY_BITS = math.log2(3)  # ~1.585: the information in one of {-1, 0, 1}
PACKED_BITS = 2  # two bits a weight, as ternary kernels store them
SCALE_BITS = 16  # one bf16 absmean scale per expert and matrix
MATS_PER_EXPERT = 3  # gate, up, down


def _bytes(bits: float) -> int:
    return math.ceil(bits / 8)


@dataclass(frozen=True)
class LayerExpertMemory:
    """One MoE layer's expert weights and their bytes in each format."""

    layer: int  # decoder layer index
    routed_params: int  # all routed experts' weights
    scales: int  # ternary scales (one per expert and matrix)
    shared_params: int  # the shared experts' weights (0 without)
    routed_bf16_bytes: int
    routed_ternary_bytes: int  # log2(3) bits a weight + bf16 scales
    routed_packed_bytes: int  # 2 bits a weight + bf16 scales
    shared_bf16_bytes: int


def layer_expert_memory(layer: int, n_experts: int, d_model: int, d_expert: int,
                        d_shared: int) -> LayerExpertMemory:
    """Bytes of one MoE layer of ``n_experts`` SwiGLU experts ``d_expert`` wide and shared
    experts ``d_shared`` wide in total, at model width ``d_model``."""
    routed = n_experts * MATS_PER_EXPERT * d_model * d_expert
    scales = n_experts * MATS_PER_EXPERT
    shared = MATS_PER_EXPERT * d_model * d_shared
    return LayerExpertMemory(
        layer=layer, routed_params=routed, scales=scales, shared_params=shared,
        routed_bf16_bytes=_bytes(routed * BF16_BITS),
        routed_ternary_bytes=_bytes(routed * TERNARY_BITS + scales * SCALE_BITS),
        routed_packed_bytes=_bytes(routed * PACKED_BITS + scales * SCALE_BITS),
        shared_bf16_bytes=_bytes(shared * BF16_BITS))


def expert_memory(model: nn.Module, ternary: bool) -> dict[str, Any]:
    """The decoder's MoE layers' expert memory (a ``DecoderLM`` or a VLM with
    ``.decoder``): ``layers`` (one dict per MoE layer), ``total`` (their sums), ``ternary``
    and ``expert_bytes``: routed experts as this model stores them (log2(3) bits a weight
    if ``ternary``, else bf16) plus the shared experts in bf16, the figure an equal-memory
    comparison holds fixed."""
    dec = getattr(model, "decoder", model)
    d_model = dec.cfg.d_model
    layers = []
    for i, blk in enumerate(dec.layers):
        sizes = getattr(blk.ffn, "sizes", None)
        if sizes is None:  # a dense FFN layer
            continue
        layers.append(layer_expert_memory(i, sizes.n_experts, d_model, sizes.d_expert,
                                          sizes.d_shared))
    names = [k for k in asdict(layers[0]) if k != "layer"] if layers else []
    total = {k: sum(getattr(m, k) for m in layers) for k in names}
    routed = total.get("routed_ternary_bytes" if ternary else "routed_bf16_bytes", 0)
    return {"ternary": ternary, "expert_bytes": routed + total.get("shared_bf16_bytes", 0),
            "total": total, "layers": [asdict(m) for m in layers]}
