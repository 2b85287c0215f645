"""Hugging Face decoder checkpoint -> our configs and state dict (see ``hf.py`` for the
name table). Anything that changes logits and that our model cannot express is refused
with a ``ConfigError`` naming the config key, and so is a value of the wrong type or range
(a zero or negative size would otherwise end in a torch traceback while building the
model); weights that do not match the config raise ``CheckpointError``. Both are
ValueErrors, and nothing is silently dropped.

Legend: L layers, D model width, F MLP / expert width, E routed experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.errors import CheckpointError, ConfigError
from moe_vlm.model.decoder import DecoderLM, ffn_schedule
from moe_vlm.hf_io import PathLike, read_hf_checkpoint
from moe_vlm.upcycling.hf_format import (
    DENSE_TYPES,
    EXPERT_NAMES,
    IGNORED_SUFFIXES,
    MLP_NAMES,
    MOE_TYPES,
    aux_coef_from_hf,
    layer_prefix,
    plain_names,
)

DOTS1_BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's bias update speed: keeps the bias in use
_NONE = object()

# transformers' config-class defaults for keys a config.json may omit (older versions
# leave defaults out). Checked against transformers in tests/upcycling/test_hf.py.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False),
    "qwen2": dict(num_key_value_heads=32, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28),
    "mixtral": dict(num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, sliding_window=None, num_experts_per_tok=2,
                    num_local_experts=8, router_aux_loss_coef=0.001),
    "qwen3_moe": dict(num_key_value_heads=4, head_dim=None, hidden_act="silu",
                      max_position_embeddings=32768, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
                      sliding_window=4096, decoder_sparse_step=1, moe_intermediate_size=768,
                      num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                      mlp_only_layers=None, router_aux_loss_coef=0.001),
    "dots1": dict(num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, sliding_window=4096, max_window_layers=62,
                  n_group=1, topk_group=1, first_k_dense_replace=0, norm_topk_prob=False,
                  routed_scaling_factor=1.0),
}
DEFAULT_ROPE_THETA = {"mixtral": 1e6}  # transformers' default_theta; 1e4 for the others
# Aliases transformers accepts through ``attribute_map`` (HF key -> keys to try, in order).
_ALIASES = {"num_experts": ("num_experts", "num_local_experts"),
            "num_local_experts": ("num_local_experts", "num_experts"),
            "n_routed_experts": ("n_routed_experts", "num_local_experts")}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")
SUPPORTED = f"supported model_type: {', '.join(DENSE_TYPES + MOE_TYPES)}"


@dataclass(frozen=True)
class HFImport:
    """A Hugging Face checkpoint in our terms: build with ``build_model(model, moe,
    routing)`` and ``load_state_dict(state_dict)``. Tensors keep the checkpoint's dtype."""

    model: ModelConfig
    moe: MoEConfig
    routing: RoutingConfig
    state_dict: dict[str, Tensor]
    hf_type: str


class _Config:
    """config.json with transformers' defaults; ``get`` names the key in errors, and the
    typed getters (``integer``, ``number``, ``flag``) refuse a value of the wrong type or
    range with a ConfigError naming the key as config.json spells it."""

    def __init__(self, raw: dict, hf_type: str, where: str):
        self.raw, self.hf_type, self.where = raw, hf_type, where

    def name(self, key: str) -> str:
        """The key (or the alias of it) that config.json sets, for messages."""
        return next((k for k in _ALIASES.get(key, (key,)) if self.raw.get(k) is not None), key)

    def get(self, key: str, default: Any = _NONE) -> Any:
        for k in _ALIASES.get(key, (key,)):
            if self.raw.get(k) is not None:
                return self.raw[k]
        if default is not _NONE:
            return default
        if key in HF_DEFAULTS[self.hf_type]:
            return HF_DEFAULTS[self.hf_type][key]
        raise ConfigError(f"{self.where}: lacks '{key}'")

    def bad(self, key: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.name(key)}={value!r} must be {want}")

    def integer(self, key: str, low: int = 1, default: Any = _NONE) -> int:
        """An integer >= ``low`` (sizes: 1; counts that may be zero: 0)."""
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise self.bad(key, v, "a positive integer" if low == 1 else f"an integer >= {low}")
        return v

    def number(self, key: str, default: Any = _NONE, positive: bool = False) -> float:
        """A finite number (> 0 if ``positive``)."""
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (positive and v <= 0):
            raise self.bad(key, v, "a positive number" if positive else "a finite number")
        return float(v)

    def flag(self, key: str, default: Any = _NONE) -> bool:
        """JSON true / false (0 / 1 accepted)."""
        v = self.get(key, default)
        if v not in (True, False) or not isinstance(v, (bool, int)):
            raise self.bad(key, v, "true or false")
        return bool(v)

    def explicit(self, key: str) -> Any:
        """Like ``get``, but an explicit ``null`` stays None (``sliding_window: null`` is
        "off", ``num_key_value_heads: null`` is "as many as query heads")."""
        return self.raw[key] if key in self.raw else HF_DEFAULTS[self.hf_type].get(key)

    def refuse(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}={self.raw.get(key)!r} is not supported: {why}")


def _rope(c: _Config, max_pos: int) -> dict[str, Any]:
    """ModelConfig rope fields from ``rope_parameters`` (transformers 5) or the legacy
    ``rope_scaling`` + ``rope_theta`` (transformers 4; ``rope_scaling`` wins, as in 5)."""
    key = "rope_scaling" if c.raw.get("rope_scaling") else "rope_parameters"
    params = c.raw.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise c.refuse(key, "per-layer-type RoPE parameters; one flat dict is supported")
    theta = params.get("rope_theta", c.raw.get("rope_theta"))
    theta = DEFAULT_ROPE_THETA.get(c.hf_type, 1e4) if theta is None else theta
    partial = params.get("partial_rotary_factor", c.raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{c.where}: partial_rotary_factor={partial} (partial rotary) is not "
                          f"supported; RoPE must rotate the whole head (1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))

    def positive(name: str, value: Any) -> float:
        """A RoPE number: present, finite and > 0 (named as ``rope_parameters.factor``)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{c.where}: {name}={value!r} must be a positive number"
                              + (f" (rope_type {rope_type!r} needs it)" if value is None else ""))
        return float(value)

    out: dict[str, Any] = dict(rope_theta=positive("rope_theta", theta), rope_scaling="none")
    if rope_type == "linear":
        out.update(rope_scaling="linear",
                   rope_factor=positive(f"{key}.factor", params.get("factor")))
    elif rope_type == "llama3":
        orig = c.raw.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings", max_pos)
        if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
            raise ConfigError(f"{c.where}: original_max_position_embeddings={orig!r} must be a "
                              f"positive integer")
        out.update(rope_scaling="llama3",
                   rope_factor=positive(f"{key}.factor", params.get("factor")),
                   rope_low_freq_factor=positive(f"{key}.low_freq_factor",
                                                 params.get("low_freq_factor")),
                   rope_high_freq_factor=positive(f"{key}.high_freq_factor",
                                                  params.get("high_freq_factor")),
                   rope_original_max_len=orig)
    elif rope_type != "default":
        raise ConfigError(f"{c.where}: {key}.rope_type={rope_type!r} is not supported; "
                          f"supported RoPE types: default, linear, llama3")
    return out


def _check_sliding(c: _Config, n_layers: int, max_pos: int) -> None:
    """Refuse a sliding window that some layer uses and that is shorter than the context
    (a window >= max_position_embeddings masks nothing, so it is exact)."""
    window = c.explicit("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise c.bad("sliding_window", window, "an integer or null")
    if c.hf_type in ("qwen2", "qwen3", "qwen3_moe") and not c.flag("use_sliding_window"):
        window = None
    if window is None or window >= max_pos:
        return
    if c.hf_type in ("qwen2", "qwen3", "dots1"):
        types = c.raw.get("layer_types") or [
            "sliding_attention" if i >= c.integer("max_window_layers", low=0) else "full_attention"
            for i in range(n_layers)]
        if not isinstance(types, list):
            raise c.bad("layer_types", types, "a list of attention types")
        if "sliding_attention" not in types:
            return
    raise c.refuse("sliding_window", f"sliding-window attention (window {window} < "
                                     f"max_position_embeddings={max_pos}); only full causal "
                                     f"attention is supported")


def _check_unsupported(c: _Config) -> None:
    act = c.get("hidden_act")
    if act not in ("silu", "swish"):
        raise c.refuse("hidden_act", "the MLPs are SwiGLU; only hidden_act silu is supported")
    if c.raw.get("quantization_config"):
        raise c.refuse("quantization_config", "quantized weights; dequantize first")
    if c.hf_type != "qwen2" and c.flag("attention_bias", False):
        raise c.refuse("attention_bias", "it adds biases to q/k/v *and* o_proj; we support "
                                         "q/k/v biases only (Qwen2 style)")
    if c.flag("mlp_bias", False):
        raise c.refuse("mlp_bias", "MLP biases; our SwiGLU MLPs have none")


def _schedule_params(is_moe: list[bool], c: _Config) -> tuple[int, int]:
    """(n_dense_layers, moe_every) whose ``ffn_schedule`` equals ``is_moe``."""
    n = len(is_moe)
    if not any(is_moe):
        return 0, 0
    for n_dense in range(n):
        for every in range(1, n + 1):
            if ffn_schedule(n, n_dense, every) == is_moe:
                return n_dense, every
    raise ConfigError(f"{c.where}: the MoE layer pattern {[int(x) for x in is_moe]} "
                      f"(from mlp_only_layers={c.raw.get('mlp_only_layers')}, decoder_sparse_step="
                      f"{c.raw.get('decoder_sparse_step')}) is not 'first n dense, then every "
                     f"k-th MoE' (model.n_dense_layers, model.moe_every)")


def _moe_configs(c: _Config, n_layers: int) -> tuple[list[bool], MoEConfig, RoutingConfig]:
    """Per-layer MoE pattern, MoEConfig and RoutingConfig of an MoE model_type."""
    t, name = c.hf_type, f"hf_{c.hf_type}"
    top_k = c.integer("num_experts_per_tok")
    if t == "mixtral":
        n_exp, f, shared = c.integer("num_local_experts"), c.integer("intermediate_size"), 0
        is_moe = [True] * n_layers
        routing = RoutingConfig(name=name, gate="softmax_topk", top_k=top_k, renormalize=True)
    elif t == "qwen3_moe":  # num_experts 0: a dense model in Qwen3-MoE's class
        n_exp, f, shared = c.integer("num_experts", low=0), c.integer("moe_intermediate_size"), 0
        step, dense = c.integer("decoder_sparse_step"), c.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in dense):
            raise c.bad("mlp_only_layers", dense, "a list of layer indices")
        is_moe = [i not in dense and n_exp > 0 and (i + 1) % step == 0 for i in range(n_layers)]
        routing = RoutingConfig(name=name, gate="softmax_topk", top_k=top_k,
                                renormalize=c.flag("norm_topk_prob"))
    else:  # dots1: DeepSeek-V3 gate
        n_exp, f = c.integer("n_routed_experts"), c.integer("moe_intermediate_size")
        shared = c.integer("n_shared_experts", low=0)
        k_dense = c.integer("first_k_dense_replace", low=0)
        is_moe = [i >= k_dense for i in range(n_layers)]
        if not c.flag("norm_topk_prob"):
            raise c.refuse("norm_topk_prob", "our sigmoid_topk gate always normalises the "
                                             "selected weights (norm_topk_prob true)")
        groups, top_groups = c.integer("n_group"), c.integer("topk_group")
        if groups != 1 and top_groups != groups:
            raise ConfigError(f"{c.where}: group-limited routing (n_group={groups}, topk_group="
                              f"{top_groups}) is not supported; use n_group 1 or "
                              f"topk_group == n_group")
        if (c.raw.get("scoring_func") or "sigmoid") != "sigmoid":
            raise c.refuse("scoring_func", "dots1 routing is sigmoid_topk (scoring_func sigmoid)")
        routing = RoutingConfig(name=name, gate="sigmoid_topk", top_k=top_k,
                                routed_scaling=c.number("routed_scaling_factor", positive=True),
                                bias_update_rate=DOTS1_BIAS_UPDATE_RATE)
    if any(is_moe) and not 1 <= routing.top_k <= n_exp:
        raise c.refuse("num_experts_per_tok", f"must be in [1, {n_exp}] (the routed experts)")
    # dots1 in transformers has no balance loss and no default: keep ours unless exported
    hf_aux = c.raw.get("router_aux_loss_coef") if t == "dots1" else c.get("router_aux_loss_coef")
    if hf_aux is not None and any(is_moe):
        coef = c.number("router_aux_loss_coef")
        if coef < 0:
            raise c.bad("router_aux_loss_coef", hf_aux, "a number >= 0")
        routing = replace(routing, aux_loss_coef=aux_coef_from_hf(coef, sum(is_moe), routing.top_k))
    return is_moe, MoEConfig(n_experts=max(n_exp, 1), n_shared=shared, d_expert=f), routing


def configs_from_hf(raw: dict, where: str = "config.json"
                    ) -> tuple[str, ModelConfig, MoEConfig, RoutingConfig]:
    """``(model_type, ModelConfig, MoEConfig, RoutingConfig)`` of an HF config dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    t = raw.get("model_type")
    if t not in DENSE_TYPES + MOE_TYPES:
        raise ConfigError(f"{where}: model_type={t!r} is not supported; {SUPPORTED}")
    c = _Config(raw, t, where)
    for key in _REQUIRED:
        c.integer(key)  # raises naming the key if absent, not an integer, or < 1
    n_layers, d = c.integer("num_hidden_layers"), c.integer("hidden_size")
    heads, vocab = c.integer("num_attention_heads"), c.integer("vocab_size")
    max_pos = c.integer("max_position_embeddings")
    kv_heads = c.explicit("num_key_value_heads")
    kv_heads = heads if kv_heads is None else c.integer("num_key_value_heads")
    if heads % kv_heads:
        raise c.bad("num_key_value_heads", kv_heads,
                    f"a divisor of num_attention_heads={heads} (grouped-query attention)")
    _check_unsupported(c)
    _check_sliding(c, n_layers, max_pos)
    head_dim = d // heads if c.get("head_dim") is None else c.integer("head_dim")
    if head_dim < 1:
        raise c.bad("num_attention_heads", heads, f"at most hidden_size={d} without head_dim")
    if t in MOE_TYPES:
        is_moe, moe, routing = _moe_configs(c, n_layers)
    else:
        is_moe, moe, routing = [False] * n_layers, MoEConfig(), RoutingConfig(name=f"hf_{t}")
    n_dense, every = _schedule_params(is_moe, c)
    model = ModelConfig(
        name=f"hf_{t}", vocab_size=vocab, d_model=d, n_layers=n_layers,
        n_heads=heads, n_kv_heads=kv_heads,
        head_dim=None if head_dim * heads == d else head_dim,
        d_ff=c.integer("intermediate_size"), n_dense_layers=n_dense, moe_every=every,
        max_seq_len=max_pos, norm_eps=c.number("rms_norm_eps", positive=True),
        qk_norm=t in ("qwen3", "qwen3_moe", "dots1"), qkv_bias=t == "qwen2",
        tie_embeddings=c.flag("tie_word_embeddings"),
        init_std=c.number("initializer_range", 0.02, positive=True), **_rope(c, max_pos))
    return t, model, moe, routing


class _Source:
    """The checkpoint's tensors; ``take`` checks shapes and marks keys as used."""

    def __init__(self, tensors: dict[str, Tensor], where: str):
        self.tensors, self.where, self.used = tensors, where, set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.where}: missing tensor '{key}' "
                                  f"(expected shape {shape})")
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.where}: tensor '{key}' has shape {tuple(t.shape)}, "
                                  f"expected {tuple(shape)}")
        self.used.add(key)
        return t

    def check_all_used(self) -> None:
        unused = sorted(k for k in self.tensors
                        if k not in self.used and not k.endswith(IGNORED_SUFFIXES))
        if unused:
            more = f" and {len(unused) - 20} more" if len(unused) > 20 else ""
            raise CheckpointError(f"{self.where}: {len(unused)} tensors the config does not "
                                  f"use: {unused[:20]}{more}; is config.json from another model?")


def _swiglu(src: _Source, prefix: str, names: tuple[str, str, str], d: int, f: int
            ) -> tuple[Tensor, Tensor]:
    """Dense SwiGLU ``{prefix}{gate|up|down}.weight`` -> (w_in [2F, D], w_out [D, F])."""
    gate, up, down = (f"{prefix}{n}.weight" for n in names)
    w_in = torch.cat([src.take(gate, (f, d)), src.take(up, (f, d))], dim=0)  # [2F, D]
    return w_in, src.take(down, (d, f))


def _experts(src: _Source, hf_type: str, i: int, n_exp: int, d: int, f: int
             ) -> tuple[Tensor, Tensor]:
    """Layer i's experts -> (w_in [E, D, 2F], w_out [E, F, D]), fused or per-expert layout."""
    fused = layer_prefix(i) + "mlp.experts."
    if src.has(fused + "gate_up_proj") or src.has(fused + "down_proj"):
        gate_up = src.take(fused + "gate_up_proj", (n_exp, 2 * f, d))  # [E, 2F, D]
        down = src.take(fused + "down_proj", (n_exp, d, f))  # [E, D, F]
        return gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    block, *names = EXPERT_NAMES[hf_type]
    w_in, w_out = [], []
    for e in range(n_exp):
        a, b = _swiglu(src, f"{layer_prefix(i)}{block}.experts.{e}.", tuple(names), d, f)
        w_in.append(a.t())  # [D, 2F]: columns :F gate, F: up
        w_out.append(b.t())  # [F, D]
    return torch.stack(w_in).contiguous(), torch.stack(w_out).contiguous()


def _mixtral_fused_router(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mixtral in transformers 5's layout keeps its router at ``mlp.gate.weight``; rename
    it to the legacy ``block_sparse_moe.gate.weight`` that the name map uses."""
    out = dict(tensors)
    for key in tensors:
        legacy = key.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        if legacy != key and legacy not in tensors:
            out[legacy] = out.pop(key)
    return out


def expected_shapes(model: ModelConfig, moe: MoEConfig, routing: RoutingConfig
                    ) -> dict[str, tuple[int, ...]]:
    """Our state-dict key -> shape for these configs (built on the meta device: free)."""
    with torch.device("meta"):
        net = DecoderLM(model, moe, routing)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _moe_layer(src: _Source, hf_type: str, i: int, moe: MoEConfig, d: int,
               shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Layer i's routed experts, router bias (0 unless dots1) and shared experts."""
    ours, p = f"layers.{i}.ffn.", layer_prefix(i)
    n_exp, f = shapes[ours + "experts.w_in"][0], shapes[ours + "experts.w_in"][2] // 2
    out: dict[str, Tensor] = {}
    out[ours + "experts.w_in"], out[ours + "experts.w_out"] = _experts(src, hf_type, i, n_exp, d, f)
    if hf_type != "dots1":
        out[ours + "router.bias"] = torch.zeros(n_exp)
    f_shared = moe.n_shared * moe.d_expert
    if f_shared:
        out[ours + "shared.w_in.weight"], out[ours + "shared.w_out.weight"] = _swiglu(
            src, p + "mlp.shared_experts.", MLP_NAMES, d, f_shared)
    elif hf_type == "dots1":  # n_shared_experts=0: a zero-width shared MLP, if saved at all
        for n, shape in zip(MLP_NAMES, [(0, d), (0, d), (d, 0)]):
            if src.has(key := f"{p}mlp.shared_experts.{n}.weight"):
                src.take(key, shape)
    return out


def state_dict_from_hf(tensors: dict[str, Tensor], hf_type: str, model: ModelConfig,
                       moe: MoEConfig, routing: RoutingConfig, where: str = "checkpoint"
                       ) -> dict[str, Tensor]:
    """Our state dict from HF tensors; every expected tensor present with its shape and
    every checkpoint tensor used (rotary ``inv_freq`` buffers excepted)."""
    shapes = expected_shapes(model, moe, routing)
    schedule = ffn_schedule(model.n_layers, model.n_dense_layers, model.moe_every)
    src = _Source(_mixtral_fused_router(tensors) if hf_type == "mixtral" else tensors, where)
    names = plain_names(model.n_layers, schedule, hf_type, model.qk_norm, model.qkv_bias,
                        model.tie_embeddings)
    sd = {ours: src.take(key, shapes[ours]) for ours, key in names.items()}
    if model.tie_embeddings and src.has("lm_head.weight"):  # a tied duplicate: must agree
        if not torch.equal(src.take("lm_head.weight", shapes["embed.weight"]), sd["embed.weight"]):
            raise CheckpointError(f"{where}: tie_word_embeddings is true but 'lm_head.weight' "
                                  f"differs from 'model.embed_tokens.weight'")
    for i, is_moe in enumerate(schedule):
        if is_moe:
            sd.update(_moe_layer(src, hf_type, i, moe, model.d_model, shapes))
        else:
            sd[f"layers.{i}.ffn.w_in.weight"], sd[f"layers.{i}.ffn.w_out.weight"] = _swiglu(
                src, layer_prefix(i) + "mlp.", MLP_NAMES, model.d_model, model.d_ff)
    src.check_all_used()
    if set(sd) != set(shapes):  # a module was added without its HF name
        raise RuntimeError(f"HF name map out of date: {sorted(set(sd) ^ set(shapes))}")
    return sd


def import_hf(path: PathLike) -> HFImport:
    """Read a local Hugging Face llama / qwen2 / qwen3 / mixtral / qwen3_moe / dots1
    checkpoint directory into our configs and state dict (our key names)."""
    raw, tensors = read_hf_checkpoint(path)
    where = str(Path(path))
    hf_type, model, moe, routing = configs_from_hf(raw, f"{Path(path) / 'config.json'}")
    sd = state_dict_from_hf(tensors, hf_type, model, moe, routing, where)
    return HFImport(model=model, moe=moe, routing=routing, state_dict=sd, hf_type=hf_type)
