"""Vision tower: parity with Hugging Face SigLIP / CLIP, checkpoint loading and its
errors, and built-from-config ViTs (shapes, init, positions, input checks).

Legend: N images, C channels, S image side, g patches per side, P patches, T tokens,
Dv vision width, Hd head dim.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from safetensors.torch import load_file, save_file

from moe_vlm.config.schema import VisionConfig
from moe_vlm.model.layers import apply_rotary
from moe_vlm.model.vision import (
    HF_DEFAULTS,
    HF_IMAGE_STATS,
    VisionTransformer,
    build_vision,
    hf_vision_config,
    load_hf_vision,
    rope2d_tables,
)

S, PATCH, DV, L = 32, 8, 32, 2
P = (S // PATCH) ** 2  # 16 patches
TOWER = dict(image_size=S, patch_size=PATCH, hidden_size=DV, num_hidden_layers=L,
             num_attention_heads=4, intermediate_size=64)
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
ATOL = 1e-5


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF inits LayerNorms to 1/0 and many biases to 0, which would hide a swapped or
    dropped norm / bias in the name map; give every parameter distinct random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(base + 0.2 * noise)
    return model.eval()


def make_hf(kind: str, seed: int = 0, **tower) -> torch.nn.Module:
    torch.manual_seed(seed)
    t = {**TOWER, **tower}
    if kind == "siglip_vision":
        m = hf.SiglipVisionModel(hf.SiglipVisionConfig(**t))
    elif kind == "clip_vision":
        m = hf.CLIPVisionModel(hf.CLIPVisionConfig(**t))
    elif kind == "siglip":
        m = hf.SiglipModel(hf.SiglipConfig(vision_config=t, text_config=TEXT))
    elif kind == "clip":
        m = hf.CLIPModel(hf.CLIPConfig(vision_config=t, text_config=TEXT))
    else:
        raise AssertionError(kind)
    return randomise(m, seed)


def vision_part(m: torch.nn.Module) -> torch.nn.Module:
    return m.vision_model if hasattr(m, "text_model") else m


def pixels(n: int = 2, seed: int = 0, size: int = S) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [N, 3, S, S]


@torch.no_grad()
def hf_features(m: torch.nn.Module, x: torch.Tensor, select_layer: int) -> torch.Tensor:
    out = vision_part(m)(pixel_values=x, output_hidden_states=True)
    assert len(out.hidden_states) == L + 1  # embeddings + one per block
    return out.last_hidden_state if select_layer == -1 else out.hidden_states[select_layer]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(kind)`` -> (hf model, directory written by save_pretrained), cached."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            m = make_hf(kind)
            d = tmp_path_factory.mktemp(kind)
            m.save_pretrained(d)
            cache[kind] = (m, d)
        return cache[kind]

    return get


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- parity with Hugging Face -------------------------------------------------------


@pytest.mark.parametrize("kind", ["siglip_vision", "clip_vision", "siglip", "clip"])
@pytest.mark.parametrize("select_layer", [-1, -2])
def test_matches_hf(saved, kind, select_layer):
    m, d = saved(kind)
    ours, cfg = load_hf_vision(d, select_layer=select_layer, drop_cls=False)
    assert not ours.training
    x = pixels()
    ref = hf_features(m, x, select_layer)  # [N, T, Dv]
    with torch.no_grad():
        got = ours(x)
    assert got.shape == ref.shape == (2, ours.n_output_tokens, DV)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    clip = "clip" in kind
    assert (cfg.cls_token, cfg.pre_norm, cfg.post_norm) == (clip, clip, not clip)
    assert cfg.act == ("quick_gelu" if clip else "gelu_tanh")
    assert cfg.norm_eps == vision_part(m).config.layer_norm_eps


def test_clip_drop_cls_drops_first_token(saved):
    m, d = saved("clip_vision")
    ours, cfg = load_hf_vision(d, select_layer=-2, drop_cls=True)
    assert ours.n_output_tokens == P and cfg.drop_cls
    with torch.no_grad():
        got = ours(pixels())
    torch.testing.assert_close(got, hf_features(m, pixels(), -2)[:, 1:], atol=ATOL, rtol=0)


def test_sharded_safetensors_and_gelu(tmp_path):
    m = make_hf("clip_vision", seed=3, hidden_act="gelu")
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ours, cfg = load_hf_vision(tmp_path, select_layer=-1, drop_cls=False)
    assert cfg.act == "gelu"
    x = pixels(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_features(m, x, -1), atol=ATOL, rtol=0)


def test_pytorch_model_bin_with_wrapper_prefix(tmp_path):
    """A .bin state dict whose keys sit under another wrapper prefix still loads."""
    m = make_hf("siglip_vision", seed=4)
    m.config.save_pretrained(tmp_path)
    sd = {f"model.vision_tower.vision_model.{k}": v for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours, _ = load_hf_vision(tmp_path, select_layer=-2)
    x = pixels(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_features(m, x, -2), atol=ATOL, rtol=0)


def test_image_stats_from_preprocessor_or_defaults(saved, tmp_path):
    for kind, family in [("siglip_vision", "siglip"), ("clip_vision", "clip")]:
        cfg = hf_vision_config(saved(kind)[1])
        assert (cfg.image_mean, cfg.image_std) == HF_IMAGE_STATS[family]
    d = copy_dir(saved("clip_vision")[1], tmp_path / "c")
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "crop_size": 32}))
    cfg = hf_vision_config(d)
    assert cfg.image_mean == [0.1, 0.2, 0.3] and cfg.image_std == [0.4, 0.5, 0.6]
    assert (cfg.name, cfg.hf_path, cfg.image_size, cfg.patch_size, cfg.d_model, cfg.n_layers,
            cfg.n_heads, cfg.d_ff) == ("hf", str(d), S, PATCH, DV, L, 4, 64)


def test_hf_defaults_match_transformers():
    """Older config.json files omit default keys; ours must equal transformers' defaults."""
    for family, cls in [("siglip", hf.SiglipVisionConfig), ("clip", hf.CLIPVisionConfig)]:
        ref = cls()
        for key, value in HF_DEFAULTS[family].items():
            assert getattr(ref, key) == value, (family, key)


def test_build_vision_hf(saved):
    m, d = saved("siglip_vision")
    cfg = VisionConfig(name="hf", hf_path=str(d), d_model=999, select_layer=-2)
    model = build_vision(cfg, "cpu", seed=0)
    assert model.cfg.d_model == DV and model.cfg.select_layer == -2
    with torch.no_grad():
        torch.testing.assert_close(model(pixels()), hf_features(m, pixels(), -2), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="vision.hf_path"):
        build_vision(VisionConfig(name="hf"))


# ---- checkpoint errors --------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_vision(tmp_path / "nope")


def test_missing_config(saved, tmp_path):
    d = copy_dir(saved("siglip_vision")[1], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_vision(d)


def test_missing_weights(saved, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(saved("siglip_vision")[1] / "config.json", d)
    with pytest.raises(FileNotFoundError, match="no weights .*model.safetensors"):
        load_hf_vision(d)


def test_unsupported_model_type(tmp_path):
    hf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'llama' is not supported.*clip_vision_model.*siglip"):
        load_hf_vision(tmp_path)


def test_wrong_shape_names_key_and_file(saved, tmp_path):
    d = copy_dir(saved("siglip_vision")[1], tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    key = "encoder.layers.1.mlp.fc1.weight"
    sd[key] = torch.zeros(65, DV)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{key}' has shape "
                                         rf"\(65, 32\), expected \(64, 32\)"):
        load_hf_vision(d)


def test_missing_tensor_names_key_and_file(saved, tmp_path):
    d = copy_dir(saved("clip")[1], tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    del sd["vision_model.pre_layrnorm.bias"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor "
                                         r"'vision_model\.pre_layrnorm\.bias'"):
        load_hf_vision(d)


def test_not_a_vision_checkpoint(saved, tmp_path):
    d = copy_dir(saved("siglip_vision")[1], tmp_path / "c")
    sd = {k: v for k, v in load_file(d / "model.safetensors").items() if "patch" not in k}
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no 'embeddings.patch_embedding.weight'"):
        load_hf_vision(d)


def _shard_out(d: Path) -> None:
    keys = list(load_file(d / "model.safetensors"))
    (d / "model.safetensors").rename(d.parent / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../outside.safetensors" for k in keys}}))


def _shard_missing(d: Path) -> None:
    keys = list(load_file(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))


@pytest.mark.parametrize("edit,match", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x07garbage"),
     r"model\.safetensors: cannot read the weights"),
    (_shard_out, r"weights shard '\.\./outside\.safetensors' is outside the model directory"),
    (_shard_missing, r"model-00001-of-00001\.safetensors \(listed in model\.safetensors\.index\.json\) "
                     r"does not exist"),
])
def test_unreadable_or_escaping_weights(saved, tmp_path, edit, match):
    """The vision loader reads through ``moe_vlm.hf_io``, with the decoder import's checks:
    a damaged file is named, a shard outside the directory is never read."""
    d = copy_dir(saved("siglip_vision")[1], tmp_path / "c")
    edit(d)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_hf_vision(d)


# ---- built from config --------------------------------------------------------------


def vit_cfg(**kw) -> VisionConfig:
    base = dict(name="vit", image_size=S, patch_size=PATCH, d_model=DV, n_layers=3, n_heads=2,
                d_ff=48, act="gelu_tanh")
    base.update(kw)
    return VisionConfig(**base)


def vit(seed: int = 0, **kw) -> VisionTransformer:
    return build_vision(vit_cfg(**kw), "cpu", seed).eval()


@pytest.mark.parametrize("pos_emb", ["learned", "rope2d"])
@pytest.mark.parametrize("cls_token,drop_cls,tokens", [(False, True, P), (True, True, P),
                                                        (True, False, P + 1)])
@pytest.mark.parametrize("select_layer", [-1, 0])
def test_output_shape(pos_emb, cls_token, drop_cls, tokens, select_layer):
    model = vit(pos_emb=pos_emb, cls_token=cls_token, drop_cls=drop_cls, pre_norm=cls_token,
                select_layer=select_layer, act="quick_gelu")
    assert model.n_output_tokens == tokens
    out = model(pixels(3))
    assert out.shape == (3, tokens, DV) and torch.isfinite(out).all()
    assert (model.pos_embed is None) == (pos_emb == "rope2d")


def test_select_layer_and_post_norm():
    """post_norm only on the last block's output; select_layer is a python index."""
    x = pixels()
    normed, plain = vit(post_norm=True), vit(post_norm=False)  # same seed -> same weights
    with torch.no_grad():
        last = plain(x)
        torch.testing.assert_close(normed(x), F.layer_norm(last, (DV,), eps=normed.cfg.norm_eps))
        mid = vit(post_norm=True, select_layer=-2)(x)
        torch.testing.assert_close(mid, vit(post_norm=False, select_layer=1)(x))
        torch.testing.assert_close(vit(post_norm=True, select_layer=2)(x), normed(x))
        assert (mid - last).abs().max() > 1e-3
    for bad in (3, -4):
        with pytest.raises(ValueError, match="vision.select_layer"):
            vit(select_layer=bad)


def test_init_deterministic_and_materialised():
    a, b, c = vit(seed=0, cls_token=True, pre_norm=True), vit(seed=0, cls_token=True, pre_norm=True), \
        vit(seed=1, cls_token=True, pre_norm=True)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert not pa.is_meta and torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb), name
        if name.endswith("weight") and "norm" not in name or name in ("cls_embed",):
            assert not torch.equal(pa, pc), name
            assert pa.abs().max() <= 0.04 + 1e-6 and 0.01 < pa.std() < 0.03, name
        elif "norm" in name and name.endswith("weight"):
            assert torch.equal(pa, torch.ones_like(pa)), name
        else:
            assert torch.equal(pa, torch.zeros_like(pa)), name
    r = vit(pos_emb="rope2d", cls_token=True)
    assert all(not t.is_meta for t in [*r.parameters(), *r.buffers()])
    cos, sin = rope2d_tables(r.head_dim, S // PATCH, n_prefix=1)
    assert torch.equal(r.rope_cos, cos) and torch.equal(r.rope_sin, sin)


@pytest.mark.parametrize("pos_emb", ["learned", "rope2d"])
def test_gradients_reach_patch_embedding(pos_emb):
    model = vit(pos_emb=pos_emb, cls_token=True, drop_cls=False).train()
    model(pixels()).pow(2).mean().backward()
    for p in (model.patch_embed.weight, model.patch_embed.bias, model.cls_embed):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if pos_emb == "learned":
        assert model.pos_embed.weight.grad.abs().sum() > 0


def shuffle_patches(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Move patch perm[j] of each image to slot j (row-major patch order)."""
    g = S // PATCH
    p = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [N, 3, g, g, p, p]
    p = p.reshape(x.shape[0], 3, g * g, PATCH, PATCH)[:, :, perm]  # [N, 3, P, p, p]
    p = p.reshape(x.shape[0], 3, g, g, PATCH, PATCH).permute(0, 1, 2, 4, 3, 5)
    return p.reshape(x.shape)  # [N, 3, S, S]


@pytest.mark.parametrize("pos_emb", ["learned", "rope2d"])
def test_positions_make_it_permutation_sensitive(pos_emb):
    """Without positions a ViT is permutation-equivariant over patches; with them,
    shuffling the patches changes more than the token order."""
    model = vit(pos_emb=pos_emb)
    x, perm = pixels(), torch.randperm(P, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for blk in model.blocks:  # at init (std 0.02) attention is near-uniform: sharpen it
            blk.attn.q_proj.weight.mul_(10)
            blk.attn.k_proj.weight.mul_(10)
        ref = model(x)  # [N, P, Dv]
        assert (model(shuffle_patches(x, perm)) - ref[:, perm]).abs().max() > 1e-3
        # control: strip the positions and the same check finds equivariance
        if pos_emb == "learned":
            model.pos_embed.weight.zero_()
        else:
            model.rope_cos.fill_(1.0)
            model.rope_sin.zero_()
        torch.testing.assert_close(model(shuffle_patches(x, perm)), model(x)[:, perm])


def test_rope2d_depends_on_relative_offset_only():
    hd, g = 8, 4
    cos, sin = rope2d_tables(hd, g)  # [P, Hd/2]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(hd, generator=gen).expand(1, 1, g * g, hd)  # [1, 1, P, Hd]
    k = torch.randn(hd, generator=gen).expand(1, 1, g * g, hd)
    s = (apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2))[0, 0]  # [P, P]
    at = lambda r, c: r * g + c  # noqa: E731
    torch.testing.assert_close(s[at(0, 0), at(1, 2)], s[at(2, 1), at(3, 3)])
    torch.testing.assert_close(s[at(0, 1), at(2, 0)], s[at(1, 2), at(3, 1)])
    assert (s[at(0, 0), at(1, 2)] - s[at(0, 0), at(2, 1)]).abs() > 1e-4  # rows != columns
    for moved in (at(0, 2), at(2, 0)):  # both axes rotate
        assert (s[at(0, 0), moved] - s[at(0, 0), at(0, 0)]).abs() > 1e-4
    cls_cos, cls_sin = rope2d_tables(hd, g, n_prefix=1)
    assert torch.equal(cls_cos[0], torch.ones(hd // 2)) and torch.equal(cls_sin[0], torch.zeros(hd // 2))
    torch.testing.assert_close(cls_cos[1:], cos)


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 1, S, S), "1 channels.*RGB"),
    (torch.randn(2, 3, 24, 24), r"24x24 pixels.*vision.image_size=32"),
    (torch.randn(2, 3, S, 24), r"32x24 pixels"),
    (torch.zeros(2, 3, S, S, dtype=torch.uint8), "dtype torch.uint8.*float"),
    (torch.randn(3, S, S), r"\[N, 3, H, W\]"),
])
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        vit()(x)


@pytest.mark.parametrize("kw,match", [
    (dict(d_model=30, n_heads=4), "vision.d_model"),
    (dict(image_size=30), "vision.image_size"),
    (dict(act="relu"), "vision.act"),
    (dict(pos_emb="sincos"), "vision.pos_emb"),
    (dict(pos_emb="rope2d", n_heads=16), "divisible by 4"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        vit(**kw)


def test_build_vision_names():
    with pytest.raises(ValueError, match="text-only"):
        build_vision(VisionConfig(name="none"))
    with pytest.raises(ValueError, match="unknown value 'dino'"):
        build_vision(VisionConfig(name="dino"))
