"""Hugging Face import / export: logits parity with transformers for every supported
class, bit-exact round trips, and the errors for what cannot be expressed.

Legend: B batch, S sequence, V vocabulary, E experts, F expert width, D model width.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file, save_file

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.model.decoder import build_model, ffn_schedule
from moe_vlm.model.granularity import resolve_moe_sizes
from moe_vlm.routing.balancing import switch_aux_loss
from moe_vlm.upcycling.hf import export_hf, hf_class_for, import_hf, read_hf_checkpoint
from moe_vlm.upcycling.hf_import import DEFAULT_ROPE_THETA, HF_DEFAULTS
from moe_vlm.upcycling.hf_format import aux_coef_from_hf, aux_coef_to_hf

hf.logging.set_verbosity_error()

V, D, L, H, KV = 64, 32, 3, 4, 2
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
              num_key_value_heads=KV, intermediate_size=48, max_position_embeddings=64,
              rms_norm_eps=1e-5, attn_implementation="eager")
MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)
ATOL = 1e-5
CLASSES = {"llama": (hf.LlamaConfig, hf.LlamaForCausalLM),
           "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM),
           "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM),
           "mixtral": (hf.MixtralConfig, hf.MixtralForCausalLM),
           "qwen3_moe": (hf.Qwen3MoeConfig, hf.Qwen3MoeForCausalLM),
           "dots1": (hf.Dots1Config, hf.Dots1ForCausalLM)}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norms near 1, everything else (biases, routers, correction biases) random: a
    swapped, transposed or dropped tensor in the name map then changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or "inv_freq" in name or "rope_" in name:
            continue
        base = 1.0 if "norm" in name else 0.0
        t.copy_(base + 0.2 * torch.randn(t.shape, generator=g))
    return model.eval()


def make_hf(hf_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_cls, model_cls = CLASSES[hf_type]
    torch.manual_seed(seed)
    kw = {**COMMON, **(MOE if hf_type in ("qwen3_moe", "dots1") else {}), **overrides}
    return randomise(model_cls(cfg_cls(**kw)), seed)


def ids(seed: int = 0, b: int = 2, s: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(input_ids=x).logits


@torch.no_grad()
def our_logits(model: ModelConfig, moe: MoEConfig, routing: RoutingConfig,
               sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    net = build_model(model, dataclasses.replace(moe, backend="torch"), routing)
    net.load_state_dict(sd, strict=True)
    return net.eval()(x).logits


def imported_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    imp = import_hf(path)
    return our_logits(imp.model, imp.moe, imp.routing, imp.state_dict, x)


def save(m: torch.nn.Module, d: Path, how: str = "safetensors") -> Path:
    """``safetensors`` / ``sharded`` via save_pretrained (legacy expert layout), ``bin``
    (pytorch_model.bin; transformers 5 dropped safe_serialization=False) or ``fused``
    (transformers 5's in-memory fused expert tensors written as they are)."""
    if how == "safetensors":
        m.save_pretrained(d)
    elif how == "sharded":
        m.save_pretrained(d, max_shard_size="20KB")
        assert (d / "model.safetensors.index.json").is_file()
    else:
        m.config.save_pretrained(d)
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        if m.config.tie_word_embeddings:
            sd.pop("lm_head.weight")
        if how == "bin":
            torch.save(sd, d / "pytorch_model.bin")
        else:
            assert any(k.endswith("experts.gate_up_proj") for k in sd)
            save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


# --------------------------------------------------------------------------- import


def test_hf_defaults_match_transformers():
    """Older config.json files omit default keys; ours must equal transformers' defaults."""
    for hf_type, defaults in HF_DEFAULTS.items():
        ref = CLASSES[hf_type][0]()
        for key, value in defaults.items():
            got = getattr(ref, key, None)  # absent from the class: "derive" (None)
            if key == "sliding_window" and hf_type in ("qwen2", "qwen3", "qwen3_moe"):
                continue  # the config class clears it unless use_sliding_window
            if key == "mlp_only_layers" and got == []:
                got = None
            if key in ("num_key_value_heads", "head_dim") and value is None:
                continue  # None means "derive"; the class stores the derived value
            assert got == value, (hf_type, key, got, value)
        theta = ref.rope_parameters["rope_theta"]
        assert theta == DEFAULT_ROPE_THETA.get(hf_type, 1e4), hf_type


DENSE_CASES = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True), "safetensors"),
    "llama_llama3_untied": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16)), "sharded"),
    "llama_linear_bin": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=2.0,
                                                            rope_theta=1e4)), "bin"),
    "qwen2_bias": ("qwen2", {}, "safetensors"),
    "qwen3_head_dim": ("qwen3", dict(head_dim=16), "sharded"),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_import_dense_logits(case, tmp_path):
    hf_type, kw, how = DENSE_CASES[case]
    m = make_hf(hf_type, **kw)
    d = save(m, tmp_path / case, how)
    imp = import_hf(d)
    assert imp.hf_type == hf_type and imp.model.moe_every == 0
    assert imp.model.tie_embeddings == m.config.tie_word_embeddings
    if hf_type == "qwen2":  # the biases are really there and nonzero
        assert imp.model.qkv_bias and imp.state_dict["layers.0.attn.wq.bias"].abs().min() > 0
    if hf_type == "qwen3":
        assert imp.model.head_dim == 16 and imp.model.qk_norm
    if "llama3" in case:
        assert (imp.model.rope_scaling, imp.model.rope_factor, imp.model.rope_original_max_len,
                imp.model.rope_theta) == ("llama3", 8.0, 16, 5e5)
    x = ids()
    torch.testing.assert_close(imported_logits(d, x), hf_logits(m, x), atol=ATOL, rtol=0)


def test_import_legacy_rope_keys(tmp_path):
    """transformers 4 configs: top-level rope_theta + rope_scaling {type: linear}."""
    m = make_hf("llama", rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=2e4))
    d = save(m, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=2e4, rope_scaling={"type": "linear", "factor": 3.0})
    (d / "config.json").write_text(json.dumps(cfg))
    imp = import_hf(d)
    assert (imp.model.rope_theta, imp.model.rope_scaling, imp.model.rope_factor) == (2e4, "linear", 3.0)
    x = ids()
    torch.testing.assert_close(imported_logits(d, x), hf_logits(m, x), atol=ATOL, rtol=0)


MOE_CASES = {
    "qwen3_moe_norm": ("qwen3_moe", dict(num_experts=4, mlp_only_layers=[0], norm_topk_prob=True)),
    "qwen3_moe_nonorm": ("qwen3_moe", dict(num_experts=4, mlp_only_layers=[0], head_dim=16,
                                           norm_topk_prob=False)),
    "qwen3_moe_step2": ("qwen3_moe", dict(num_experts=4, decoder_sparse_step=2)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "dots1": ("dots1", dict(n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=1,
                            num_experts_per_tok=3, norm_topk_prob=True,
                            routed_scaling_factor=2.5)),
}


@pytest.mark.parametrize("how", ["safetensors", "fused"])
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_import_moe_logits(case, how, tmp_path):
    hf_type, kw = MOE_CASES[case]
    m = make_hf(hf_type, **kw)
    d = save(m, tmp_path / case, how)
    imp = import_hf(d)
    sched = ffn_schedule(L, imp.model.n_dense_layers, imp.model.moe_every)
    hf_sched = [type(layer.mlp).__name__.endswith(("MoeBlock", "MoE")) for layer in m.model.layers]
    assert sched == hf_sched and any(sched)
    if hf_type == "dots1":
        bias = m.model.layers[1].mlp.gate.e_score_correction_bias
        assert bias.abs().min() > 0
        assert torch.equal(imp.state_dict["layers.1.ffn.router.bias"], bias)
        assert imp.routing.gate == "sigmoid_topk" and imp.routing.bias_update_rate > 0
        assert imp.moe.n_shared == 2 and imp.routing.routed_scaling == 2.5
    if case == "qwen3_moe_nonorm":
        assert not imp.routing.renormalize
    x = ids()
    torch.testing.assert_close(imported_logits(d, x), hf_logits(m, x), atol=ATOL, rtol=0)


def test_dots1_bias_changes_selection(tmp_path):
    """The correction bias must steer selection in our model too: zeroing it in both
    changes both logits the same way (so the match above is not by luck)."""
    m = make_hf("dots1", **MOE_CASES["dots1"][1])
    with torch.no_grad():
        for layer in m.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.mul_(20)  # large enough to reorder
    x = ids()
    ref = hf_logits(m, x)
    imp = import_hf(save(m, tmp_path / "m"))
    ours = our_logits(imp.model, imp.moe, imp.routing, imp.state_dict, x)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    off = dataclasses.replace(imp.routing, bias_update_rate=0.0)  # ours ignores the bias
    assert not torch.allclose(our_logits(imp.model, imp.moe, off, imp.state_dict, x), ref, atol=1e-3)


def test_read_hf_checkpoint_formats(tmp_path):
    m = make_hf("llama")
    ref = {k: v for k, v in m.state_dict().items()}
    for how in ("safetensors", "sharded", "bin"):
        cfg, tensors = read_hf_checkpoint(save(m, tmp_path / how, how))
        assert cfg["model_type"] == "llama"
        assert set(tensors) == set(ref) and all(torch.equal(tensors[k], ref[k]) for k in ref)


# --------------------------------------------------------------------------- export


def our_model(kind: str) -> tuple[ModelConfig, MoEConfig, RoutingConfig]:
    base = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=KV, d_ff=48,
                max_seq_len=64, norm_eps=1e-5, rope_theta=1e4, moe_every=0)
    moe = MoEConfig(n_experts=4, d_expert=16, backend="torch")
    soft = RoutingConfig(gate="softmax_topk", top_k=2)
    if kind == "llama":
        return ModelConfig(**base, tie_embeddings=False, rope_scaling="llama3", rope_factor=4.0,
                           rope_original_max_len=32), moe, soft
    if kind == "qwen2":
        return ModelConfig(**base, qkv_bias=True, rope_scaling="linear", rope_factor=2.0), moe, soft
    if kind == "qwen3":
        return ModelConfig(**base, qk_norm=True, head_dim=16, tie_embeddings=False), moe, soft
    if kind == "mixtral":
        return ModelConfig(**{**base, "moe_every": 1}), moe, soft
    if kind == "qwen3_moe":  # granularity 2, dense layer 1 of 3, no renormalisation
        return (ModelConfig(**{**base, "moe_every": 2}, qk_norm=True),
                dataclasses.replace(moe, granularity=2),
                dataclasses.replace(soft, top_k=1, renormalize=False))
    if kind == "dots1":
        return (ModelConfig(**{**base, "moe_every": 1, "n_dense_layers": 1}, qk_norm=True),
                dataclasses.replace(moe, n_shared=1, n_experts=8),
                RoutingConfig(gate="sigmoid_topk", top_k=3, routed_scaling=2.5,
                              bias_update_rate=1e-3))
    raise KeyError(kind)


def effective(model: ModelConfig, moe: MoEConfig, routing: RoutingConfig) -> dict:
    """The config fields that determine logits, in a comparable form."""
    sched = ffn_schedule(model.n_layers, model.n_dense_layers, model.moe_every)
    skip = {"name", "head_dim", "n_dense_layers", "moe_every"} | ({"d_ff"} if all(sched) else set())
    out = {k: v for k, v in dataclasses.asdict(model).items() if k not in skip}
    out.update(head_dim=model.head_dim or model.d_model // model.n_heads, schedule=sched)
    if any(sched):
        out.update(sizes=dataclasses.replace(resolve_moe_sizes(moe, routing), granularity=1),
                   gate=routing.gate, scaling=routing.routed_scaling,
                   renormalize=routing.renormalize or routing.gate == "sigmoid_topk",
                   bias_used=routing.bias_update_rate > 0, capacity=routing.capacity_factor)
    return out


def check_export(model: ModelConfig, moe: MoEConfig, routing: RoutingConfig, kind: str,
                 out: Path) -> None:
    """Export a random model of ours; transformers must load it as ``kind`` with our
    logits, and importing it back must give the same configs and bit-identical tensors."""
    assert hf_class_for(model, moe, routing) == kind
    net = randomise(build_model(model, moe, routing, seed=1), seed=2)
    sd = net.state_dict()
    if routing.gate != "sigmoid_topk":  # unused (bias_update_rate=0) and absent from HF
        for k in sd:
            if k.endswith("router.bias"):
                sd[k].zero_()
    export_hf(sd, model, moe, routing, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["architectures"] == [CLASSES[kind][1].__name__]
    m = hf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(m) is CLASSES[kind][1]
    x = ids(3)
    with torch.no_grad():
        ours = net(x).logits
    torch.testing.assert_close(hf_logits(m, x), ours, atol=ATOL, rtol=0)
    back = import_hf(out)
    assert back.hf_type == kind
    assert effective(back.model, back.moe, back.routing) == effective(model, moe, routing)
    sched = ffn_schedule(model.n_layers, model.n_dense_layers, model.moe_every)
    if any(sched):  # aux coefficient: converted on export, converted back on import
        assert cfg["router_aux_loss_coef"] == pytest.approx(
            routing.aux_loss_coef * sum(sched) / cfg["num_experts_per_tok"], rel=1e-12)
        assert back.routing.aux_loss_coef == pytest.approx(routing.aux_loss_coef, rel=1e-12)
    assert set(back.state_dict) == set(sd)
    for k, v in sd.items():
        assert back.state_dict[k].dtype == v.dtype and torch.equal(back.state_dict[k], v), k


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe", "dots1"])
def test_export_logits_and_round_trip(kind, tmp_path):
    check_export(*our_model(kind), kind, tmp_path / "hf")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_export_dots1_without_shared_experts(tmp_path):
    """n_shared_experts=0: transformers builds a zero-width shared MLP (adds 0)."""
    model, moe, routing = our_model("dots1")
    check_export(model, dataclasses.replace(moe, n_shared=0), routing, "dots1", tmp_path / "hf")


def test_export_dtype_and_refuses_existing_dir(tmp_path):
    model, moe, routing = our_model("dots1")
    sd = randomise(build_model(model, moe, routing), 0).state_dict()
    out = export_hf(sd, model, moe, routing, tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="full"):
        export_hf(sd, model, moe, routing, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "full"]  # no temp dirs left
    (tmp_path / "empty").mkdir()
    assert (export_hf(sd, model, moe, routing, tmp_path / "empty") / "config.json").is_file()


# ------------------------------------------------------------- balance-loss coefficient


def test_aux_coef_conversion_round_trip_and_import_defaults(tmp_path):
    for coef, layers, k in [(0.01, 3, 2), (0.02, 1, 8), (1e-3, 48, 6), (0.0, 4, 2)]:
        hf_coef = aux_coef_to_hf(coef, layers, k)
        assert hf_coef == pytest.approx(coef * layers / k, rel=1e-15)
        assert aux_coef_from_hf(hf_coef, layers, k) == pytest.approx(coef, rel=1e-12)
    # a native config.json: 3 MoE layers of top-2 mixtral
    d = save(make_hf("mixtral", num_local_experts=4, router_aux_loss_coef=0.03), tmp_path / "a")
    assert import_hf(d).routing.aux_loss_coef == pytest.approx(0.03 * 2 / 3)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("router_aux_loss_coef")  # absent: transformers' default 0.001
    (d / "config.json").write_text(json.dumps(cfg))
    assert import_hf(d).routing.aux_loss_coef == pytest.approx(0.001 * 2 / 3)
    # qwen3_moe with one dense layer: 2 MoE layers, top-2
    d = save(make_hf("qwen3_moe", **MOE_CASES["qwen3_moe_norm"][1], router_aux_loss_coef=0.05),
             tmp_path / "b")
    assert import_hf(d).routing.aux_loss_coef == pytest.approx(0.05 * 2 / 2)
    # dots1 has no balance loss in transformers: ours stays at our default
    d = save(make_hf("dots1", **MOE_CASES["dots1"][1]), tmp_path / "c")
    assert "router_aux_loss_coef" not in json.loads((d / "config.json").read_text())
    assert import_hf(d).routing.aux_loss_coef == RoutingConfig().aux_loss_coef


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("hf_type", ["mixtral", "qwen3_moe"])
def test_hf_balance_loss_with_converted_coef_equals_ours(hf_type, layers):
    """transformers' load_balancing_loss_func x converted coefficient == our coefficient x
    the sum over layers of switch_aux_loss, when every layer routes alike; pooling layers
    that route differently gives the same scale only."""
    lb = importlib.import_module(f"transformers.models.{hf_type}.modeling_{hf_type}"
                                 ).load_balancing_loss_func
    n_exp, k, t, coef = 8, 3, 40, 0.01
    g = torch.Generator().manual_seed(7)
    skew = torch.linspace(0, 2, n_exp)  # favour the later experts: unbalanced
    logits = [torch.randn(t, n_exp, generator=g) + skew.roll(i) for i in range(2)]  # [T, E]

    def ours(lg: torch.Tensor) -> torch.Tensor:
        probs = lg.softmax(-1)
        return switch_aux_loss(probs, probs.topk(k, -1).indices, n_exp)

    assert ours(logits[0]) > 1.05  # unbalanced enough to be a real check
    hf_total = aux_coef_to_hf(coef, layers, k) * lb(tuple(logits[:1]) * layers, n_exp, k)
    torch.testing.assert_close(hf_total, coef * layers * ours(logits[0]), rtol=1e-6, atol=0)
    hf_mixed = aux_coef_to_hf(coef, 2, k) * lb(tuple(logits), n_exp, k)
    ours_mixed = coef * (ours(logits[0]) + ours(logits[1]))
    assert 0 < abs(float(hf_mixed / ours_mixed) - 1) < 0.5


def test_exported_aux_coef_weights_the_hf_loss_like_ours(tmp_path):
    """End to end on one random input: our model with one MoE layer, exported; the HF
    model's aux loss x its router_aux_loss_coef equals our routing loss."""
    model, moe, routing = our_model("qwen3_moe")
    model = dataclasses.replace(model, n_dense_layers=2, moe_every=1)  # layers 0, 1 dense
    routing = dataclasses.replace(routing, aux_loss_coef=0.02, z_loss_coef=0.0)
    net = randomise(build_model(model, moe, routing, seed=1), seed=4)
    sd = net.state_dict()
    sd["layers.2.ffn.router.bias"].zero_()
    export_hf(sd, model, moe, routing, tmp_path / "hf")
    m = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = ids(5)
    with torch.no_grad():
        out = net(x)
        ref = m(input_ids=x, output_router_logits=True)
    torch.testing.assert_close(ref.logits, out.logits, atol=ATOL, rtol=0)
    (r,) = out.routing
    assert r.aux_loss > 1.05  # unbalanced: the coefficient's scale matters
    torch.testing.assert_close(m.config.router_aux_loss_coef * ref.aux_loss, r.loss,
                               rtol=1e-5, atol=0)
    k = resolve_moe_sizes(moe, routing).top_k  # 2: one MoE layer, top-1 at granularity 2
    assert m.config.router_aux_loss_coef == pytest.approx(0.02 / k)


# --------------------------------------------------------------------------- errors


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_missing_and_wrong_shape_tensor(tmp_path):
    d = save(make_hf("qwen3_moe", **MOE_CASES["qwen3_moe_norm"][1]), tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    t = tensors.pop(key)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing tensor '{key}' \(expected shape \(16, 32\)\)"):
        import_hf(d)
    tensors[key] = t[:8].clone()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(8, 32\), expected \(16, 32\)"):
        import_hf(d)
    tensors[key] = t
    tensors["model.layers.9.mlp.gate.weight"] = torch.zeros(4, D)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not use: \['model.layers.9.mlp.gate.weight'\]"):
        import_hf(d)


def test_tied_duplicate_and_inv_freq(tmp_path):
    """A tied checkpoint may still hold lm_head.weight (older savers): fine if it equals
    the embedding, an error otherwise. Rotary inv_freq buffers are ignored."""
    m = make_hf("llama", tie_word_embeddings=True)
    d = save(m, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    x = ids()
    torch.testing.assert_close(imported_logits(d, x), hf_logits(m, x), atol=ATOL, rtol=0)
    tensors["lm_head.weight"] += 1
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'lm_head.weight' differs"):
        import_hf(d)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path)
    d = save(make_hf("llama"), tmp_path / "sharded", "sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (d / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        import_hf(d)
    for f in d.glob("model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        import_hf(d)


@pytest.mark.parametrize("hf_type,changes,match", [
    ("llama", dict(model_type="gemma"), "model_type='gemma' is not supported"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0,
                   layer_types=None), "sliding_window=8"),
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=1e4)), "yarn"),
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                        partial_rotary_factor=0.5)), "partial_rotary_factor"),
    ("dots1", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("dots1", dict(n_group=2, topk_group=1), "n_group=2"),
    ("qwen3_moe", dict(mlp_only_layers=[2]), "mlp_only_layers"),
])
def test_unsupported_config(hf_type, changes, match, tmp_path):
    kw = {"dots1": MOE_CASES["dots1"][1], "qwen3_moe": dict(num_experts=4)}.get(hf_type, {})
    d = save(make_hf(hf_type, **kw), tmp_path / "m")
    with pytest.raises(ValueError, match=match):
        import_hf(_edit_config(d, **changes))


def test_export_refusals(tmp_path):
    model, moe, routing = our_model("qwen3_moe")
    ec = dataclasses.replace(routing, gate="expert_choice")
    with pytest.raises(ValueError, match="expert_choice"):
        hf_class_for(model, moe, ec)
    shared = dataclasses.replace(moe, n_shared=1)
    with pytest.raises(ValueError, match="n_shared=1 shared experts with routing.gate=softmax_topk"):
        export_hf(build_model(model, shared, routing).state_dict(), model, shared, routing,
                  tmp_path / "x")
    dots, dmoe, drouting = our_model("dots1")
    every2 = dataclasses.replace(dots, n_layers=4, n_dense_layers=1, moe_every=2)
    with pytest.raises(ValueError, match="moe_every=2"):
        hf_class_for(every2, dmoe, drouting)
    mix, mmoe, mrouting = our_model("mixtral")
    with pytest.raises(ValueError, match="n_dense_layers=1"):
        hf_class_for(dataclasses.replace(mix, n_dense_layers=1), mmoe, mrouting)
    with pytest.raises(ValueError, match="routed_scaling"):
        hf_class_for(mix, mmoe, dataclasses.replace(mrouting, routed_scaling=2.0))
    with pytest.raises(ValueError, match="qk_norm together with model.qkv_bias"):
        hf_class_for(dataclasses.replace(mix, moe_every=0, qk_norm=True, qkv_bias=True), mmoe, mrouting)
    raw_top1 = dataclasses.replace(mrouting, top_k=1, normalize_top1=False)  # weight = prob
    with pytest.raises(ValueError, match="normalize_top1=false"):
        hf_class_for(mix, dataclasses.replace(mmoe, granularity=1), raw_top1)
    with pytest.raises(ValueError, match="normalize_top1=false"):
        hf_class_for(dots, dmoe, dataclasses.replace(drouting, top_k=1, normalize_top1=False))
    assert not (tmp_path / "x").exists()


def test_export_capacity_warns_and_bias_checks(tmp_path):
    mix, moe, routing = our_model("mixtral")
    with pytest.warns(UserWarning, match="dropless"):
        assert hf_class_for(mix, moe, dataclasses.replace(routing, capacity_factor=1.25)) == "mixtral"
    biased = dataclasses.replace(routing, bias_update_rate=1e-3)
    sd = build_model(mix, moe, biased).state_dict()
    sd["layers.0.ffn.router.bias"][0] = 0.5
    with pytest.raises(ValueError, match="layers.0.ffn.router.bias"):
        export_hf(sd, mix, moe, biased, tmp_path / "a")
    sd.pop("norm.weight")
    with pytest.raises(ValueError, match="norm.weight"):
        export_hf(sd, mix, moe, routing, tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_class_for(mix, moe, routing)  # no capacity factor: no warning
