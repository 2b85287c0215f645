"""What the supported Hugging Face decoder formats call things: the architecture class of
each ``model_type``, the tensor names on disk, and the balance-loss coefficient in
transformers' convention. Reading and writing the files is ``moe_vlm.hf_io``'s.

Legend: L layers, D model width, F MLP / expert width, E routed experts.
"""

from __future__ import annotations

# model_type -> architecture class written into config.json
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "dots1": "Dots1ForCausalLM",
}
DENSE_TYPES = ("llama", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen3_moe", "dots1")

# Per MoE model_type, the legacy per-expert layout: (block name, gate, up, down) so that
# expert e of layer i is ``model.layers.{i}.{block}.experts.{e}.{gate|up|down}.weight``.
# transformers 5 keeps the fused ``model.layers.{i}.mlp.experts.gate_up_proj [E, 2F, D]``
# (gate rows first, then up; not interleaved) and ``...experts.down_proj [E, D, F]`` in
# memory, converts the legacy layout on load and writes the legacy layout back on save.
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "dots1": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")  # dense and shared-expert SwiGLU
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older versions saved; recomputed


def aux_coef_to_hf(aux_loss_coef: float, n_moe_layers: int, top_k: int) -> float:
    """Our ``routing.aux_loss_coef`` -> transformers' ``router_aux_loss_coef``, so that
    both weight the balance loss alike: ``coef * n_moe_layers / top_k``.

    Ours (``routing.balancing.switch_aux_loss``) is, per MoE layer l,
    ``a_l = E * sum_e f_le * P_le`` with ``f_le`` the fraction of the layer's T*K
    assignments on expert e and ``P_le`` its mean router probability, and the model adds
    ``coef * sum_l a_l``. transformers' ``load_balancing_loss_func`` (Mixtral, Qwen3-MoE)
    pools the router logits of all L MoE layers first and counts tokens, not assignments:
    ``E * sum_e F_e * Q_e`` with ``F_e = sum_l K f_le / L`` (its per-expert fractions sum
    to K) and ``Q_e = sum_l P_le / L``. When every layer routes alike (one MoE layer,
    identical layers, or perfect balance, where a_l = 1 and HF's loss is K) that is
    ``K * a``, while ours is ``coef * L * a``: hence ``coef * L / K``. Otherwise pooling
    makes HF's loss a product of layer means instead of a mean of per-layer products, so
    the two agree in scale, not exactly. Only the micro-batch scope has an HF equivalent
    (``routing.aux_loss_scope`` sequence / global_batch balance other token sets); dots1
    in transformers computes no balance loss and carries the key only for the round trip.
    """
    return aux_loss_coef * n_moe_layers / top_k if n_moe_layers else aux_loss_coef


def aux_coef_from_hf(router_aux_loss_coef: float, n_moe_layers: int, top_k: int) -> float:
    """transformers' ``router_aux_loss_coef`` -> our ``routing.aux_loss_coef``: the
    inverse of ``aux_coef_to_hf``, ``coef * top_k / n_moe_layers`` (equal weight when the
    layers route alike, the same scale otherwise)."""
    return router_aux_loss_coef * top_k / n_moe_layers if n_moe_layers else router_aux_loss_coef


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def plain_names(n_layers: int, schedule: list[bool], hf_type: str, qk_norm: bool,
                qkv_bias: bool, tie_embeddings: bool) -> dict[str, str]:
    """Our state-dict key -> HF key, for every tensor that maps one to one (same shape)."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    for i in range(n_layers):
        ours, p = f"layers.{i}.", layer_prefix(i)
        names[ours + "attn_norm.weight"] = p + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = p + "post_attention_layernorm.weight"
        for w, h in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[f"{ours}attn.{w}.weight"] = f"{p}self_attn.{h}.weight"
            if qkv_bias and w != "wo":
                names[f"{ours}attn.{w}.bias"] = f"{p}self_attn.{h}.bias"
        if qk_norm:
            names[ours + "attn.q_norm.weight"] = p + "self_attn.q_norm.weight"
            names[ours + "attn.k_norm.weight"] = p + "self_attn.k_norm.weight"
        if schedule[i]:
            block = EXPERT_NAMES[hf_type][0]
            names[ours + "ffn.router.weight"] = f"{p}{block}.gate.weight"
            if hf_type == "dots1":
                names[ours + "ffn.router.bias"] = f"{p}mlp.gate.e_score_correction_bias"
    return names
