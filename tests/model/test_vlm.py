"""The vision-language model: projector, splicing image embeddings at placeholders."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.model.vlm import Projector, build_vlm

IMG = ByteTokenizer.image_id


def _model(*overrides: str):
    cfg = load_config(["moe.backend=torch", "projector.merge=1", *overrides])
    return build_vlm(cfg, IMG, seed=0).eval()


def _capture(model, monkeypatch):
    seen = {}
    orig = model.decoder.forward

    def fwd(*a, **kw):
        seen["embeds"] = kw["inputs_embeds"]
        return orig(*a, **kw)

    monkeypatch.setattr(model.decoder, "forward", fwd)
    return seen


def test_splice_positions_for_0_1_2_images(monkeypatch):
    model = _model()
    p = model.n_image_tokens
    assert p == 16  # 32x32 image, 8x8 patches
    g = torch.Generator().manual_seed(0)
    s = 2 * p + 12
    ids = torch.randint(0, 256, (3, s), generator=g)
    ids[1, 3:3 + p] = IMG  # one image
    ids[2, 1:1 + p] = IMG  # two images, separated by text
    ids[2, 5 + p:5 + 2 * p] = IMG
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    seen = _capture(model, monkeypatch)
    with torch.no_grad():
        model(ids, pixel_values=pixels)
        feats = model.image_embeddings(pixels)  # [3, P, D]
        text = model.decoder.embed(ids)  # [B, S, D]
    e = seen["embeds"]
    torch.testing.assert_close(e[0], text[0])
    torch.testing.assert_close(e[1, 3:3 + p], feats[0])
    torch.testing.assert_close(e[2, 1:1 + p], feats[1])
    torch.testing.assert_close(e[2, 5 + p:5 + 2 * p], feats[2])
    mask = ids == IMG
    torch.testing.assert_close(e[~mask], text[~mask])


def test_text_only_batch_without_pixels():
    model = _model()
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 10, model.cfg.vocab_size) and torch.isfinite(out.loss)


@pytest.mark.parametrize("n_images", [0, 2])
def test_placeholder_image_count_mismatch_raises(n_images):
    model = _model()
    ids = torch.randint(0, 256, (1, 40))
    ids[0, :model.n_image_tokens] = IMG  # room for exactly one image
    pixels = torch.randn(n_images, 3, 32, 32) if n_images else None
    with pytest.raises(ValueError, match="placeholder"):
        model(ids, pixel_values=pixels)


def test_causal_over_whole_sequence_including_images():
    model = _model("routing=mixtral_top2")
    p = model.n_image_tokens
    ids = torch.randint(0, 256, (1, 2 * p + 10))
    ids[0, 2:2 + p] = IMG
    ids[0, 6 + p:6 + 2 * p] = IMG
    pixels = torch.randn(2, 3, 32, 32)
    other = pixels.clone()
    other[1] = torch.randn(3, 32, 32)  # change only the second (later) image
    with torch.no_grad():
        a = model(ids, pixel_values=pixels).logits
        b = model(ids, pixel_values=other).logits
    cut = 6 + p
    torch.testing.assert_close(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_projector_merge_groups_2x2_neighbourhoods():
    proj = Projector(d_vision=2, d_model=3, merge=2)
    feats = torch.arange(16 * 2, dtype=torch.float).reshape(1, 16, 2)  # 4x4 grid, Dv=2
    captured = {}
    proj.fc1.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    out = proj(feats)
    assert out.shape == (1, 4, 3)
    x = captured["x"]  # [1, 4, 8]: each row = a 2x2 patch neighbourhood
    grid = feats.reshape(4, 4, 2)
    want0 = torch.cat([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]])
    want3 = torch.cat([grid[2, 2], grid[2, 3], grid[3, 2], grid[3, 3]])
    torch.testing.assert_close(x[0, 0], want0)
    torch.testing.assert_close(x[0, 3], want3)
    with pytest.raises(ValueError, match="merge"):
        proj(torch.randn(1, 15, 2))


def test_vlm_with_merge_uses_fewer_tokens():
    model = _model("projector.merge=2")
    assert model.n_image_tokens == 4
    ids = torch.randint(0, 256, (1, 12))
    ids[0, 1:5] = IMG
    out = model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert torch.isfinite(out.logits).all()
