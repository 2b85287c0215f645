"""KV-cached generation (``moe_vlm.generate``, ``moe_vlm.model.kv_cache``): cached decoding
equals recomputing the whole sequence every step (dense, MoE, grouped_mm, RMoE, modality
routing, VLM with an image), left-padded batches equal each prompt alone, sampling is
seeded and truncated as specified, stop strings and ids cut, bad input is refused, and
``moe-vlm generate`` answers from a trained run directory."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.data.byte_tokenizer import ByteTokenizer
from moe_vlm.generate import Sampling, filtered_logits, generate, generate_ids, next_tokens
from moe_vlm.model import build_model
from moe_vlm.model.kv_cache import KVCache, cached_forward
from moe_vlm.model.vlm import build_vlm
from moe_vlm.routing.router import Router

TOK = ByteTokenizer()
TEXT = ["vision=none", "data=synthetic_text"]
SHARP = ["model.init_std=0.3"]  # peaked logits: greedy choices far from float ties


@functools.lru_cache(maxsize=None)
def _built(vlm: bool, overrides: tuple[str, ...]):
    if vlm:
        return build_vlm(load_config([*SHARP, *overrides]), TOK.image_id, seed=0).eval()
    cfg = load_config([*TEXT, *SHARP, *overrides])
    return build_model(cfg.model, cfg.moe, cfg.routing, seed=0).eval()


def _text_model(*overrides: str):
    """A fresh copy (tests may convert it) of a cached model: composing and building once."""
    return copy.deepcopy(_built(False, overrides))


def _vlm(*overrides: str):
    return copy.deepcopy(_built(True, overrides))


def _vlm_prompt(model, text: str = "what?") -> list[int]:
    return [TOK.bos_id, *TOK.encode("USER: "), *[TOK.image_id] * model.n_image_tokens,
            *TOK.encode(text)]


def _full_logits(model, ids: list[int], pixels):
    with torch.no_grad():
        if pixels is None:
            return model(input_ids=torch.tensor([ids])).logits[0, -1]
        return model(torch.tensor([ids]), pixel_values=pixels).logits[0, -1]  # [V]


def _check_cached_equals_full(model, prompt: list[int], pixels=None, steps: int = 6,
                              dtype: torch.dtype = torch.float64) -> None:
    """Step by step: the cached logits of the newest token equal the full forward's over
    the whole sequence so far, and ``generate_ids`` picks the same greedy tokens. In float64
    (rotary runs in fp32 either way, so fp32 rounding remains: 1e-5 on logits of size ~1,
    far below what a wrong position or a leaked key does; float32 where a backend needs it,
    at 1e-4)."""
    model = model.to(dtype)
    pixels = None if pixels is None else pixels.to(dtype)
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    vlm = hasattr(model, "image_token_id")
    dec = model.decoder if vlm else model
    ids = torch.tensor([prompt])
    cache = KVCache.empty(dec, 1, len(prompt) + steps, dtype, torch.device("cpu"))
    with torch.no_grad():
        if vlm:
            embeds, is_image, _ = model.embed_inputs(ids, pixels)
        else:
            embeds, is_image = dec.embed(ids), None
    pos = torch.arange(len(prompt), dtype=torch.float32)[None]
    logits = cached_forward(dec, embeds, pos, cache, torch.ones_like(ids, dtype=torch.bool),
                            is_image)[0, -1]
    seq, greedy = list(prompt), []
    for step in range(steps):
        ref = _full_logits(model, seq, pixels)
        torch.testing.assert_close(logits, ref.float(), rtol=tol, atol=tol)
        t = int(ref.argmax())
        greedy.append(t)
        seq.append(t)
        one = torch.tensor([[t]])
        logits = cached_forward(dec, dec.embed(one), torch.tensor([[float(len(seq) - 1)]]), cache,
                                torch.ones(1, 1, dtype=torch.bool),
                                torch.zeros(1, 1, dtype=torch.bool) if vlm else None)[0, -1]
    assert generate_ids(model, [prompt], pixels, max_new_tokens=steps) == [greedy]


TEXT_CASES = {
    "dense": ["model.moe_every=0"],
    "moe": ["moe.backend=torch"],
    "moe_grouped_mm": ["moe.backend=grouped_mm"],
    "rmoe": ["routing.recurrent=true", "routing.recurrent_dim=16"],
    "qk_norm_mha_shared": ["model.qk_norm=true", "model.n_kv_heads=4", "model.n_dense_layers=1",
                           "model.n_layers=3"],
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_cached_decoding_equals_full_recompute_text(case):
    dtype = torch.float32 if case == "moe_grouped_mm" else torch.float64  # no fp64 grouped_mm
    _check_cached_equals_full(_text_model(*TEXT_CASES[case]), [3, 14, 15, 92, 65, 35, 89],
                              dtype=dtype)


@pytest.mark.parametrize("overrides", [
    [],
    ["routing.modality=groups", "routing.recurrent=true", "routing.recurrent_dim=16"],
    ["vision.moe_every=1"],  # V-MoE tower: runs once, in the prefill
    ["experiment=encoder_free"],  # patch embedding, no projector
], ids=["vit", "modality_rmoe", "vision_moe", "encoder_free"])
def test_cached_decoding_equals_full_recompute_vlm_with_image(overrides):
    model = _vlm(*overrides)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _check_cached_equals_full(model, _vlm_prompt(model), pixels)


def test_v2pe_positions_in_the_prefill():
    """With a V2PE delta, image tokens advance the rotary position by delta: the cached
    prefill equals the full forward given the same ``position_ids``."""
    from moe_vlm.data.v2pe import v2pe_positions

    model = _vlm()
    prompt = _vlm_prompt(model)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pos = v2pe_positions(torch.tensor(prompt), TOK.image_id, model.n_image_tokens, [0.25])
    with torch.no_grad():
        ref = model(torch.tensor([prompt]), pixel_values=pixels, position_ids=pos[None]).logits[0, -1]
        plain = model(torch.tensor([prompt]), pixel_values=pixels).logits[0, -1]
    got = generate_ids(model, [prompt], pixels, max_new_tokens=1, v2pe_delta=0.25)
    assert got == [[int(ref.argmax())]]
    assert not torch.allclose(ref, plain)  # the delta matters, so the check can fail


@pytest.mark.parametrize("kind", ["dense", "moe", "rmoe", "vlm"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(kind):
    if kind == "vlm":
        model = _vlm()
        prompts = [_vlm_prompt(model, "a longer question?"), TOK.encode("USER: hi"),
                   _vlm_prompt(model, "x")]
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        alone = [generate_ids(model, [prompts[0]], pixels[:1], 8),
                 generate_ids(model, [prompts[1]], None, 8),
                 generate_ids(model, [prompts[2]], pixels[1:], 8)]
    else:
        model = _text_model(*{"dense": ["model.moe_every=0"], "moe": [],
                              "rmoe": ["routing.recurrent=true", "routing.recurrent_dim=16"]}[kind])
        prompts = [[7, 8, 9], list(range(20, 33)), [101, 5, 77, 3, 2, 1]]
        pixels = None
        alone = [generate_ids(model, [p], None, 8) for p in prompts]
    batched = generate_ids(model, prompts, pixels, 8)
    assert batched == [a[0] for a in alone]
    assert all(len(b) == 8 for b in batched)


def test_left_padding_is_not_routed(monkeypatch):
    """The prefill's routers see exactly the real tokens (padding dropped), and each decode
    step one token per row."""
    model = _text_model()
    seen: list[int] = []
    orig = Router.forward

    def spy(self, x, *a, **kw):
        seen.append(x.shape[0])
        return orig(self, x, *a, **kw)

    monkeypatch.setattr(Router, "forward", spy)
    generate_ids(model, [[1, 2], [3, 4, 5, 6, 7]], max_new_tokens=2)
    n_moe = len(model.moe_layers())
    assert seen == [7] * n_moe + [2] * n_moe  # prefill: 2 + 5 real tokens; then 1 step


# -- sampling -------------------------------------------------------------------------


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize("sampling, support", [
    (Sampling(1.0, top_k=2), {0, 1}),
    (Sampling(1.0, top_k=1), {0}),
    (Sampling(1.0, top_p=0.5), {0}),  # 0.5 already reaches p
    (Sampling(1.0, top_p=0.7), {0, 1}),  # 0.5 < 0.7 <= 0.8
    (Sampling(1.0, top_p=0.81), {0, 1, 2}),
    (Sampling(1.0, top_k=3, top_p=0.7), {0, 1}),
    (Sampling(1.0), {0, 1, 2, 3}),
])
def test_top_k_top_p_restrict_the_support(sampling, support):
    x = filtered_logits(PROBS.log(), sampling)
    assert {i for i in range(4) if math.isfinite(x[0, i])} == support
    kept = torch.tensor(sorted(support))
    want = torch.zeros(4)
    want[kept] = PROBS[0, kept] / PROBS[0, kept].sum()  # renormalised over the support
    torch.testing.assert_close(x.softmax(-1)[0], want)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_tokens(PROBS.log(), sampling, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) <= support


def test_temperature_and_seeded_draws():
    logits = PROBS.log().repeat(4000, 1)  # [4000, 4]
    t = 0.5  # probabilities ~ p^(1/t)
    x = filtered_logits(logits[:1], Sampling(t))
    want = PROBS[0] ** (1 / t) / (PROBS[0] ** (1 / t)).sum()
    torch.testing.assert_close(x.softmax(-1)[0], want)
    a = next_tokens(logits, Sampling(t), torch.Generator().manual_seed(7))
    b = next_tokens(logits, Sampling(t), torch.Generator().manual_seed(7))
    c = next_tokens(logits, Sampling(t), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=4).float() / a.numel()
    assert torch.allclose(freq, want, atol=0.03)
    assert next_tokens(logits[:1], Sampling(0.0)).tolist() == [0]  # greedy


def test_sampled_generation_is_deterministic_under_a_seed():
    model = _text_model()
    s = Sampling(1.0, top_k=50, top_p=0.95)
    prompts = [[1, 2, 3], [4, 5]]
    a = generate_ids(model, prompts, None, 12, s, seed=11)
    assert a == generate_ids(model, prompts, None, 12, s, seed=11)
    assert a != generate_ids(model, prompts, None, 12, s, seed=12)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**bad)


# -- stops ----------------------------------------------------------------------------


def test_stop_strings_and_stop_ids_cut():
    model = _text_model()
    full = generate(model, TOK, ["The cat"], max_new_tokens=12, chat=False)[0]
    ids = generate_ids(model, [[TOK.bos_id, *TOK.encode("The cat")]], None, 12)[0]
    assert TOK.decode(ids) == full and len(full) >= 4
    stop = full[2:4]
    cut = generate(model, TOK, ["The cat"], max_new_tokens=12, stop=[stop], chat=False)[0]
    assert cut == full[:full.find(stop)]
    # a stop id ends the row before it; the other row of the batch runs on
    at = ids[3]
    got = generate_ids(model, [[TOK.bos_id, *TOK.encode("The cat")], [1, 2, 3]], None, 12,
                       stop_ids=[at])
    assert got[0] == ids[:ids.index(at)]
    alone = generate_ids(model, [[1, 2, 3]], None, 12, stop_ids=[at])[0]
    assert got[1] == alone


def test_max_seq_len_caps_each_row():
    model = _text_model("model.max_seq_len=16", "data.seq_len=8")
    out = generate_ids(model, [list(range(1, 13)), [1, 2]], None, 10)
    assert [len(o) for o in out] == [4, 10]


# -- bad input ------------------------------------------------------------------------


def test_bad_input_is_refused():
    model = _text_model("model.max_seq_len=16", "data.seq_len=8")
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate_ids(model, [list(range(16))], None, 4)
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [[1], []], None, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, [[1]], None, 0)
    with pytest.raises(ValueError, match="text-only"):
        generate(model, TOK, ["hi"], images=[torch.zeros(3, 32, 32)])
    vlm = _vlm()
    with pytest.raises(ValueError, match="<image> markers but 0 images"):
        generate(vlm, TOK, ["<image>\nwhat is it?"])
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        generate(vlm, TOK, ["what?"], images=[None, None])
    with pytest.raises(ValueError, match=r"\[3, 32, 32\]"):
        generate(vlm, TOK, ["what?"], images=[torch.zeros(3, 16, 16)])
    with pytest.raises(ValueError, match="placeholder"):  # ids with an image run, no pixels
        generate_ids(vlm, [_vlm_prompt(vlm)], None, 2)
    with pytest.raises(ValueError, match="missing image"):
        generate(vlm, TOK, ["what?"], images=["/nonexistent/scene.png"])
    for bad in (["routing.gate=expert_choice"], ["routing.capacity_factor=1.25"]):
        with pytest.raises(ValueError, match="routing"):
            generate_ids(_text_model(*bad), [[1, 2]], None, 2)


def test_chat_prompt_matches_the_training_layout():
    """A prompt with an image tokenises as the training sample's prefix (chat template,
    the placeholder run where training puts it)."""
    from moe_vlm.data.chat import render_conversation, render_prompt

    q = "is there a red circle?"
    train_ids, _, _ = render_conversation([{"from": "human", "value": q},
                                           {"from": "gpt", "value": "yes"}], TOK, 1, 4)
    prompt = render_prompt(q, TOK, 1, 4)
    assert train_ids[:len(prompt)] == prompt
    assert train_ids[len(prompt):len(prompt) + 3] == TOK.encode("yes")


# -- CLI on a trained run -------------------------------------------------------------


def test_cli_generates_from_a_trained_run(tiny_config, tmp_path, capsys):
    from moe_vlm.commands import main
    from moe_vlm.generate import load_for_generation
    from moe_vlm.train import train

    cfg = tiny_config("train.max_steps=3", "train.eval_every=3", "train.ckpt_every=3")
    train(cfg, cfg.run.dir)
    model, tok, _ = load_for_generation(cfg.run.dir)
    want = generate(model, tok, ["The ", "A"], max_new_tokens=5, chat=False)
    capsys.readouterr()
    main(["generate", str(cfg.run.dir), "--prompt", "The ", "--prompt", "A",
          "--max-new-tokens", "5"])  # a text run: prompts continued raw by default
    assert capsys.readouterr().out.split("\n")[:2] == [w.replace("\n", "\\n") for w in want]
    with pytest.raises(SystemExit) as e:
        main(["generate", str(cfg.run.dir), "--prompt", "x", "--image", str(tmp_path / "a.png")])
    assert e.value.code == 2 and "text-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert "no config.yaml" in capsys.readouterr().err


def test_image_file_prompt_equals_its_loaded_tensor(tmp_path):
    """An image path is loaded as training loads images (resize, normalise), and its answer
    is the answer to that tensor; a batch may mix prompts with and without an image."""
    from PIL import Image

    from moe_vlm.data.images import load_image

    model = _vlm()
    rng = torch.Generator().manual_seed(4)
    arr = (torch.rand(40, 40, 3, generator=rng) * 255).to(torch.uint8).numpy()
    path = tmp_path / "scene.png"
    Image.fromarray(arr).save(path)
    vc = model.vision.cfg
    tensor = load_image(path, vc.image_size, vc.image_mean, vc.image_std)
    by_path = generate(model, TOK, ["what is it?", "hi"], images=[str(path), None], max_new_tokens=6)
    by_tensor = generate(model, TOK, ["what is it?"], images=[tensor], max_new_tokens=6)
    assert by_path[0] == by_tensor[0]
    assert by_path[1] == generate(model, TOK, ["hi"], max_new_tokens=6)[0]
    other = generate(model, TOK, ["what is it?"], images=[-tensor], max_new_tokens=6)
    assert other != by_tensor  # the image reaches the answer
