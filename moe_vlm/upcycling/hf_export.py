"""Our decoder -> a Hugging Face checkpoint that ``transformers`` loads with the same
logits (see ``hf.py`` for the name table and the class each model maps to).

Legend: L layers, D model width, F MLP / expert width, E routed experts.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.model.decoder import ffn_schedule
from moe_vlm.model.granularity import MoESizes, resolve_moe_sizes
from moe_vlm.routing.router import normalizes_weights
from moe_vlm.hf_io import PathLike, write_hf_checkpoint
from moe_vlm.upcycling.hf_format import (
    ARCHITECTURES,
    EXPERT_NAMES,
    MLP_NAMES,
    aux_coef_to_hf,
    layer_prefix,
    plain_names,
)
from moe_vlm.upcycling.hf_import import expected_shapes

_NO_CLASS = "no supported Hugging Face class (llama, qwen2, qwen3, mixtral, qwen3_moe, dots1) "


def _refuse(why: str) -> ValueError:
    return ValueError(_NO_CLASS + "expresses " + why)


def _dense_class(model: ModelConfig) -> str:
    if model.qk_norm and model.qkv_bias:
        raise _refuse("model.qk_norm together with model.qkv_bias (qwen3's attention_bias "
                      "also adds an o_proj bias)")
    if model.qkv_bias:
        return "qwen2"
    if model.qk_norm:
        return "qwen3"
    if model.d_model % model.n_heads:
        raise _refuse(f"model.d_model={model.d_model} not divisible by model.n_heads="
                      f"{model.n_heads} without q/k norm (LlamaConfig requires it)")
    return "llama"


def _moe_class(model: ModelConfig, moe: MoEConfig, routing: RoutingConfig,
               schedule: list[bool]) -> str:
    if moe.ternary:
        # The checkpoint holds the latent full-precision weights, not the ternary ones the
        # model computes with; dequantised bf16 weights would match its logits only without
        # activation quantisation and would give up the memory saving that is MoTE's point.
        raise _refuse("ternary experts (moe.ternary=true, MoTE: weights quantised in the "
                      f"forward, activations to moe.ternary_act_bits={moe.ternary_act_bits} "
                      "bits per token, 0 = none); export a full-precision MoE instead")
    if routing.gate == "expert_choice":
        raise _refuse("routing.gate=expert_choice (HF routers are token-choice top-k)")
    if routing.modality != "shared":
        raise _refuse(f"routing.modality={routing.modality} (modality-aware experts: HF "
                      "routers see no modality)")
    if routing.recurrent:
        raise _refuse("routing.recurrent=true (RMoE's recurrent router: HF MoE classes have "
                      "a plain linear router per layer, no GRU state across layers)")
    if model.qkv_bias:
        raise _refuse("model.qkv_bias in an MoE model (q/k/v biases exist only in qwen2, "
                      "which is dense)")
    if routing.gate == "sigmoid_topk":
        if not model.qk_norm:
            raise _refuse("routing.gate=sigmoid_topk without model.qk_norm (dots1, the only "
                          "class with a sigmoid gate, has q/k norm)")
        if not normalizes_weights(routing, resolve_moe_sizes(moe, routing).top_k):
            raise _refuse("routing.normalize_top1=false at one expert per token with a sigmoid "
                          "gate (dots1 exports normalise the top-k weights)")
        n_exp = resolve_moe_sizes(moe, routing).n_experts
        if n_exp < 2:
            raise _refuse(f"a sigmoid gate over {n_exp} routed expert (dots1's router needs "
                          f"at least 2)")
        k = schedule.index(True)
        if not all(schedule[k:]):
            raise _refuse(f"the FFN pattern model.n_dense_layers={model.n_dense_layers}, "
                          f"model.moe_every={model.moe_every} with a sigmoid gate: dots1 has "
                          f"first-k-dense then all-MoE layers (model.moe_every=1)")
        return "dots1"
    if moe.n_shared:
        raise _refuse(f"moe.n_shared={moe.n_shared} shared experts with routing.gate="
                      f"{routing.gate} (shared experts exist only in dots1, with a sigmoid gate)")
    if routing.routed_scaling != 1.0:
        raise _refuse(f"routing.routed_scaling={routing.routed_scaling} with routing.gate="
                      f"{routing.gate} (mixtral and qwen3_moe do not scale routed weights)")
    if model.qk_norm:
        return "qwen3_moe"  # mlp_only_layers expresses any dense/MoE pattern
    if not all(schedule):
        raise _refuse(f"dense layers (model.n_dense_layers={model.n_dense_layers}, "
                      f"model.moe_every={model.moe_every}) without q/k norm: mixtral has "
                      f"every layer MoE, qwen3_moe has q/k norm")
    if not normalizes_weights(routing, resolve_moe_sizes(moe, routing).top_k):
        raise _refuse("top-k weights that are not renormalised (routing.renormalize=false, or "
                      "routing.normalize_top1=false at one expert per token) without q/k norm: "
                      "mixtral always renormalises the top-k weights, qwen3_moe has q/k norm")
    return "mixtral"


def hf_class_for(model: ModelConfig, moe: MoEConfig, routing: RoutingConfig) -> str:
    """The HF ``model_type`` that computes exactly our model's logits, or ValueError
    naming the feature none of them has. Warns if ``routing.capacity_factor`` is set:
    HF MoE layers are dropless, so logits match only where we drop no token."""
    schedule = ffn_schedule(model.n_layers, model.n_dense_layers, model.moe_every)
    if not any(schedule):
        return _dense_class(model)
    hf_type = _moe_class(model, moe, routing, schedule)
    if routing.capacity_factor is not None:
        warnings.warn(f"routing.capacity_factor={routing.capacity_factor}: {hf_type} in "
                      f"transformers runs dropless; its logits differ wherever ours drop "
                      f"tokens", stacklevel=2)
    return hf_type


def _rope_config(model: ModelConfig) -> dict[str, Any]:
    """RoPE keys for transformers 5 (``rope_parameters``) and 4 (``rope_theta`` +
    ``rope_scaling``); 5 prefers ``rope_scaling`` when set, and both carry the same."""
    scaling: Optional[dict[str, Any]] = None
    if model.rope_scaling == "linear":
        scaling = dict(rope_type="linear", factor=model.rope_factor)
    elif model.rope_scaling == "llama3":
        scaling = dict(rope_type="llama3", factor=model.rope_factor,
                       low_freq_factor=model.rope_low_freq_factor,
                       high_freq_factor=model.rope_high_freq_factor,
                       original_max_position_embeddings=model.rope_original_max_len)
    params = dict(scaling or dict(rope_type="default"), rope_theta=model.rope_theta)
    return dict(rope_theta=model.rope_theta, rope_scaling=scaling, rope_parameters=params)


def _moe_config(hf_type: str, model: ModelConfig, routing: RoutingConfig, sizes: MoESizes,
                schedule: list[bool]) -> dict[str, Any]:
    aux = aux_coef_to_hf(routing.aux_loss_coef, sum(schedule), sizes.top_k)  # see there
    top = dict(num_experts_per_tok=sizes.top_k, router_aux_loss_coef=aux,
               output_router_logits=False)
    if hf_type == "mixtral":
        return dict(top, num_local_experts=sizes.n_experts, intermediate_size=sizes.d_expert,
                    router_jitter_noise=0.0, sliding_window=None)
    if hf_type == "qwen3_moe":
        return dict(top, num_experts=sizes.n_experts, moe_intermediate_size=sizes.d_expert,
                    decoder_sparse_step=1,
                    norm_topk_prob=normalizes_weights(routing, sizes.top_k),
                    mlp_only_layers=[i for i, m in enumerate(schedule) if not m],
                    use_sliding_window=False, sliding_window=None, attention_bias=False)
    if sizes.d_shared % sizes.d_expert:  # cannot happen with resolve_moe_sizes; be explicit
        raise _refuse(f"shared expert width {sizes.d_shared} that is not a multiple of the "
                      f"routed expert width {sizes.d_expert}")
    return dict(top, n_routed_experts=sizes.n_experts, moe_intermediate_size=sizes.d_expert,
                n_shared_experts=sizes.d_shared // sizes.d_expert,
                first_k_dense_replace=schedule.index(True), n_group=1, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=routing.routed_scaling,
                scoring_func="sigmoid", attention_bias=False, sliding_window=None,
                max_window_layers=model.n_layers, layer_types=["full_attention"] * model.n_layers)


def hf_config(model: ModelConfig, moe: MoEConfig, routing: RoutingConfig,
              dtype: torch.dtype = torch.float32, hf_type: Optional[str] = None) -> dict[str, Any]:
    """The complete config.json dict for ``hf_type`` (default ``hf_class_for(...)``)."""
    hf_type = hf_type or hf_class_for(model, moe, routing)
    head_dim = model.head_dim or model.d_model // model.n_heads
    dtype_name = str(dtype).removeprefix("torch.")
    cfg: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[hf_type]], model_type=hf_type, vocab_size=model.vocab_size,
        hidden_size=model.d_model, intermediate_size=model.d_ff,
        num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_kv_heads, head_dim=head_dim, hidden_act="silu",
        max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_std,
        attention_dropout=0.0, use_cache=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, torch_dtype=dtype_name, dtype=dtype_name, **_rope_config(model))
    if hf_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif hf_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=model.n_layers,
                   layer_types=["full_attention"] * model.n_layers)
        if hf_type == "qwen3":
            cfg["attention_bias"] = False
    else:
        schedule = ffn_schedule(model.n_layers, model.n_dense_layers, model.moe_every)
        cfg.update(_moe_config(hf_type, model, routing, resolve_moe_sizes(moe, routing), schedule))
    return cfg


def _check_state_dict(sd: dict[str, Tensor], model: ModelConfig, moe: MoEConfig,
                      routing: RoutingConfig) -> None:
    shapes = expected_shapes(model, moe, routing)
    missing, extra = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or extra:
        raise ValueError(f"state dict does not match the configs: missing {missing[:10]}, "
                         f"unexpected {extra[:10]}")
    for k, shape in shapes.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"state dict tensor '{k}' has shape {tuple(sd[k].shape)}, "
                             f"expected {shape} from the configs")


def _router_bias(bias: Tensor, hf_type: str, routing: RoutingConfig, key: str) -> Optional[Tensor]:
    """dots1's e_score_correction_bias, or None. The bias steers selection only when
    ``routing.bias_update_rate > 0``; otherwise the exported bias is 0, as our logits."""
    if hf_type != "dots1":
        if routing.bias_update_rate > 0 and bool(bias.ne(0).any()):  # host sync
            raise ValueError(f"'{key}' is non-zero and steers expert selection, but {hf_type} "
                             f"has no selection bias (only dots1, with a sigmoid gate, has one)")
        return None
    if routing.bias_update_rate == 0:
        if bool(bias.ne(0).any()):  # host sync
            warnings.warn(f"'{key}' is non-zero but routing.bias_update_rate=0, so our model "
                          f"ignores it; exporting e_score_correction_bias = 0", stacklevel=3)
        return torch.zeros_like(bias)
    return bias


def _swiglu_out(w_in: Tensor, w_out: Tensor, prefix: str, names: Sequence[str]
                ) -> dict[str, Tensor]:
    """(w_in [2F, D] = cat(gate, up) rows, w_out [D, F]) -> HF gate / up / down weights."""
    gate, up = w_in.chunk(2, dim=0)  # [F, D] each
    return {f"{prefix}{names[0]}.weight": gate, f"{prefix}{names[1]}.weight": up,
            f"{prefix}{names[2]}.weight": w_out}


def _moe_layer_out(sd: dict[str, Tensor], hf_type: str, i: int, routing: RoutingConfig,
                   d: int) -> dict[str, Tensor]:
    """Layer i's experts (per-expert layout), dots1 correction bias and shared experts."""
    ours, p = f"layers.{i}.ffn.", layer_prefix(i)
    out: dict[str, Tensor] = {}
    bias = _router_bias(sd[ours + "router.bias"], hf_type, routing, ours + "router.bias")
    if bias is not None:
        out[p + "mlp.gate.e_score_correction_bias"] = bias
    block, *proj = EXPERT_NAMES[hf_type]
    w_in, w_out = sd[ours + "experts.w_in"], sd[ours + "experts.w_out"]  # [E, D, 2F], [E, F, D]
    for e in range(w_in.shape[0]):
        out.update(_swiglu_out(w_in[e].t(), w_out[e].t(), f"{p}{block}.experts.{e}.", proj))
    shared = p + "mlp.shared_experts."
    if ours + "shared.w_in.weight" in sd:
        out.update(_swiglu_out(sd[ours + "shared.w_in.weight"], sd[ours + "shared.w_out.weight"],
                               shared, MLP_NAMES))
    elif hf_type == "dots1":  # n_shared_experts=0: transformers still builds a zero-width MLP
        out.update(_swiglu_out(w_in.new_zeros(0, d), w_in.new_zeros(d, 0), shared, MLP_NAMES))
    return out


def hf_tensors(sd: dict[str, Tensor], hf_type: str, model: ModelConfig,
               routing: RoutingConfig) -> dict[str, Tensor]:
    """HF key -> tensor, legacy per-expert layout (transformers 5 fuses it on load)."""
    schedule = ffn_schedule(model.n_layers, model.n_dense_layers, model.moe_every)
    names = plain_names(model.n_layers, schedule, hf_type, model.qk_norm, model.qkv_bias,
                        model.tie_embeddings)
    out = {hf: sd[ours] for ours, hf in names.items() if not ours.endswith("router.bias")}
    for i, is_moe in enumerate(schedule):
        if is_moe:
            out.update(_moe_layer_out(sd, hf_type, i, routing, model.d_model))
        else:
            ours = f"layers.{i}.ffn."
            out.update(_swiglu_out(sd[ours + "w_in.weight"], sd[ours + "w_out.weight"],
                                   layer_prefix(i) + "mlp.", MLP_NAMES))
    return out


def export_hf(state_dict: dict[str, Tensor], model: ModelConfig, moe: MoEConfig,
              routing: RoutingConfig, out_dir: PathLike, dtype: Optional[torch.dtype] = None
              ) -> Path:
    """Write our model as a Hugging Face checkpoint (``config.json`` + ``model.safetensors``)
    into the new directory ``out_dir``, atomically. ``dtype=None`` keeps each tensor's dtype
    (exact round trip with ``import_hf``); otherwise floating tensors are cast to ``dtype``,
    except dots1's router bias, which stays fp32 as transformers keeps it."""
    hf_type = hf_class_for(model, moe, routing)
    _check_state_dict(state_dict, model, moe, routing)
    tensors = hf_tensors(state_dict, hf_type, model, routing)
    if dtype is not None:
        tensors = {k: v.float() if k.endswith("e_score_correction_bias")
                   else v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = hf_config(model, moe, routing, dtype or state_dict["embed.weight"].dtype, hf_type)
    return write_hf_checkpoint(out_dir, config, tensors)
