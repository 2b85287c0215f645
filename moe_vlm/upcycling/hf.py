"""Hugging Face decoder checkpoints <-> our ``DecoderLM``: import, export, class choice.

Legend: D model width, F MLP / expert width, E routed experts, V vocabulary.

Supported ``model_type``: dense ``llama``, ``qwen2`` (q/k/v biases), ``qwen3`` (q/k
RMSNorm); MoE ``mixtral`` (all layers MoE, softmax top-k renormalised), ``qwen3_moe`` (q/k
norm, softmax top-k with or without renormalisation, dense layers via ``mlp_only_layers``)
and ``dots1`` (q/k norm, DeepSeek-V3 sigmoid gate with ``e_score_correction_bias``,
ungated shared experts, first ``first_k_dense_replace`` layers dense).

Tensor names (``{i}`` layer, ``{e}`` expert, ``L{i}.`` = ``model.layers.{i}.``; HF
``Linear`` weights are ``[out, in]``, ``^T`` a transpose):

| ours                                 | Hugging Face                                         |
|--------------------------------------|------------------------------------------------------|
| embed.weight [V, D]                  | model.embed_tokens.weight                            |
| norm.weight [D]                      | model.norm.weight                                    |
| head.weight [V, D] (untied only)     | lm_head.weight                                       |
| layers.{i}.attn_norm.weight          | L{i}.input_layernorm.weight                          |
| layers.{i}.ffn_norm.weight           | L{i}.post_attention_layernorm.weight                 |
| layers.{i}.attn.w{q,k,v,o}.weight    | L{i}.self_attn.{q,k,v,o}_proj.weight                 |
| layers.{i}.attn.w{q,k,v}.bias        | L{i}.self_attn.{q,k,v}_proj.bias (qwen2)             |
| layers.{i}.attn.{q,k}_norm.weight    | L{i}.self_attn.{q,k}_norm.weight                     |
| layers.{i}.ffn.w_in.weight [2F, D]   | rows :F L{i}.mlp.gate_proj.weight, F: up_proj.weight |
| layers.{i}.ffn.w_out.weight [D, F]   | L{i}.mlp.down_proj.weight                            |
| layers.{i}.ffn.router.weight [E, D]  | L{i}.mlp.gate.weight (mixtral: block_sparse_moe.gate) |
| layers.{i}.ffn.router.bias [E]       | dots1: L{i}.mlp.gate.e_score_correction_bias; else 0 |
| layers.{i}.ffn.experts.w_in[e]       | [D, 2F]: cols :F experts.{e}.gate_proj.weight^T,     |
|                                      |          cols F: experts.{e}.up_proj.weight^T        |
| layers.{i}.ffn.experts.w_out[e]      | [F, D]: experts.{e}.down_proj.weight^T               |
| layers.{i}.ffn.shared.{w_in,w_out}   | L{i}.mlp.shared_experts.{gate,up,down}_proj (dots1)  |

Experts live under ``mlp.experts`` (mixtral: ``block_sparse_moe.experts.{e}.w1/w3/w2`` for
gate/up/down). Import also accepts transformers 5's fused layout,
``mlp.experts.gate_up_proj [E, 2F, D]`` (gate rows then up rows, concatenated) and
``mlp.experts.down_proj [E, D, F]``, so ``w_in = gate_up_proj^T(1,2)`` and
``w_out = down_proj^T(1,2)``. Export writes the legacy per-expert layout, which every
transformers version loads (5 fuses it on load and writes it back the same way).

Config fields: vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, head_dim, intermediate_size (dense width; mixtral: expert width),
moe_intermediate_size, rms_norm_eps, rope (``rope_parameters`` or legacy ``rope_theta`` +
``rope_scaling``: default / linear / llama3), tie_word_embeddings, max_position_embeddings
(-> model.max_seq_len), num_experts_per_tok, norm_topk_prob (-> routing.renormalize),
routed_scaling_factor, n_shared_experts, router_aux_loss_coef (= routing.aux_loss_coef x
n_moe_layers / top_k: transformers pools its balance loss over the layers and counts
tokens, not top-k assignments; ``hf_format.aux_coef_to_hf`` derives it). Sigmoid routing
imports with ``routing.bias_update_rate = 1e-3`` (DeepSeek-V3's) so the correction bias
keeps steering selection. Our experts at granularity m export as m*E experts of width
F/m; import gives granularity 1 with those sizes (the same layer).
"""

from __future__ import annotations

from moe_vlm.hf_io import read_hf_checkpoint
from moe_vlm.upcycling.hf_export import export_hf, hf_class_for, hf_config
from moe_vlm.upcycling.hf_import import HFImport, configs_from_hf, import_hf

__all__ = ["HFImport", "configs_from_hf", "export_hf", "hf_class_for", "hf_config",
           "import_hf", "read_hf_checkpoint"]
