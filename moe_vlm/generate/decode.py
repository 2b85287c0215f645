"""Autoregressive generation with a KV cache, for ``DecoderLM`` and ``VisionLanguageModel``.

Legend: B batch (prompts), S prompt width (the longest prompt), N images, V vocabulary.

Prompts of different lengths are left-padded into one batch: padding is masked from
attention and from MoE routing, and each row's rotary positions count from its first
real token, so (greedy) a prompt generates in a batch exactly what it generates alone.
One prefill over the prompts (the VLM splices the image embeddings in there, as in
training), then one token per row per step, reading the cache. A row stops at a stop id
(the tokenizer's eos), when its text contains a stop string (cut before it), or after
``max_new_tokens`` (or at ``model.max_seq_len`` tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from moe_vlm.data.chat import render_prompt
from moe_vlm.data.images import load_image
from moe_vlm.data.v2pe import v2pe_positions
from moe_vlm.generate.sampling import Sampling, next_tokens
from moe_vlm.model.decoder import DecoderLM
from moe_vlm.model.kv_cache import KVCache, cached_forward, check_cacheable

ImageLike = Union[str, Path, Tensor]  # a file, or a normalised [3, H, W] tensor


def _decoder(model: nn.Module) -> DecoderLM:
    return model.decoder if hasattr(model, "image_token_id") else model


def _positions(ids: list[int], image_id: Optional[int], n_image_tokens: int, n_images: int,
               v2pe_delta: float) -> Tensor:
    """[len(ids)] float rotary positions of one prompt's real tokens, from 0."""
    if v2pe_delta != 1.0 and n_images:
        return v2pe_positions(torch.tensor(ids), image_id, n_image_tokens, [v2pe_delta] * n_images)
    return torch.arange(len(ids), dtype=torch.float32)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]],
                 pixel_values: Optional[Tensor] = None, max_new_tokens: int = 32,
                 sampling: Sampling = Sampling(), seed: int = 0,
                 stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 decode: Any = None, pad_id: int = 0, v2pe_delta: float = 1.0) -> list[list[int]]:
    """The generated token ids of each prompt (token ids, image placeholders included),
    without the stop id or the text from a stop string on (``decode``: ids -> text, needed
    for ``stop_strings``; a cut inside a token keeps that token).

    pixel_values [N, 3, H, W]: the images of all prompts in placeholder order (VLM only).
    ``v2pe_delta``: V2PE's inference delta (``data.v2pe_delta``) for image tokens' positions.
    Runs in eval mode (e.g. LSH-MoE's exact layer), restoring the model's mode after."""
    was_training = model.training
    model.eval()
    try:
        return _generate_ids(model, prompts, pixel_values, max_new_tokens, sampling, seed,
                             stop_ids, stop_strings, decode, pad_id, v2pe_delta)
    finally:
        model.train(was_training)


def _generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]],
                  pixel_values: Optional[Tensor], max_new_tokens: int, sampling: Sampling,
                  seed: int, stop_ids: Sequence[int], stop_strings: Sequence[str], decode: Any,
                  pad_id: int, v2pe_delta: float) -> list[list[int]]:
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and decode is None:
        raise ValueError("stop strings need a decode function (the tokenizer's)")
    dec = _decoder(model)
    check_cacheable(dec.routing_cfg)
    vlm = dec is not model
    image_id = model.image_token_id if vlm else None
    n_img_tok = model.n_image_tokens if vlm else 0
    max_len = dec.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if len(p) >= max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model takes at most "
                             f"model.max_seq_len={max_len} including the answer, so shorten it")
        if not vlm and pixel_values is not None:
            raise ValueError("images given to a text-only model (vision=none)")
    n_images = [sum(t == image_id for t in p) // max(1, n_img_tok) for p in prompts]
    # each row's budget; rows stop at their own, so a row in a batch is as it is alone
    budget = [min(max_new_tokens, max_len - len(p)) for p in prompts]
    device = dec.embed.weight.device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)  # [B, S] left-padded
    real = torch.zeros(b, width, dtype=torch.bool)  # [B, S]
    pos = torch.zeros(b, width)  # [B, S]
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        real[i, width - len(p):] = True
        pos[i, width - len(p):] = _positions(list(p), image_id, n_img_tok, n_images[i], v2pe_delta)
    ids, real, pos = ids.to(device), real.to(device), pos.to(device)
    if vlm:
        pv = None if pixel_values is None else pixel_values.to(device, dec.embed.weight.dtype)
        embeds, is_image, _ = model.embed_inputs(ids, pv)  # [B, S, D], [B, S]
    else:
        embeds, is_image = dec.embed(ids), None
    cache = KVCache.empty(dec, b, width + max(budget), embeds.dtype, device)
    logits = cached_forward(dec, embeds, pos, cache, real, is_image)[:, -1]  # [B, V]
    next_pos = pos[:, -1] + 1  # [B]
    g = torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    stops = set(int(t) for t in stop_ids)
    for step in range(max(budget)):
        tok = next_tokens(logits, sampling, g)  # [B]
        for i, t in enumerate(tok.tolist()):  # host sync: the stop tests
            if done[i]:
                continue
            if t in stops:
                done[i] = True
                continue
            out[i].append(t)
            if stop_strings and _cut_at_stop(out[i], decode, stop_strings):
                done[i] = True
            elif len(out[i]) >= budget[i]:
                done[i] = True
        if all(done):
            break
        step_ids = tok.unsqueeze(1)  # [B, 1]
        embeds = dec.embed(step_ids)
        step_mask = torch.ones(b, 1, dtype=torch.bool, device=device)
        logits = cached_forward(dec, embeds, next_pos.unsqueeze(1), cache, step_mask,
                                torch.zeros_like(step_mask) if vlm else None)[:, -1]
        next_pos = next_pos + 1
    return out


def _cut_at_stop(generated: list[int], decode: Any, stop_strings: Sequence[str]) -> bool:
    """Whether the decoded text contains a stop string; if so, drop the tokens from the
    one that completes the earliest stop string's start on (in place)."""
    text = decode(generated)
    hits = [text.find(s) for s in stop_strings if s and s in text]
    if not hits:
        return False
    cut = min(hits)
    while generated and len(decode(generated)) > cut:
        generated.pop()
    return True


def prompt_images(images: Optional[Sequence[Any]], n_prompts: int, image_size: int,
                  mean: Sequence[float], std: Sequence[float]) -> list[list[Tensor]]:
    """Per prompt, its images as normalised [3, H, W] tensors: ``images`` has one entry per
    prompt, each None, one image (a file path or a tensor) or a list of them."""
    if images is None:
        return [[] for _ in range(n_prompts)]
    if len(images) != n_prompts:
        raise ValueError(f"images has {len(images)} entries for {n_prompts} prompts; give one "
                         "per prompt (None for a prompt without an image)")
    out = []
    for entry in images:
        items = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        tensors = []
        for im in items:
            t = load_image(im, image_size, mean, std) if isinstance(im, (str, Path)) else im
            if t.shape != (3, image_size, image_size):
                raise ValueError(f"an image tensor must be [3, {image_size}, {image_size}] "
                                 f"(normalised, vision.image_size), got {tuple(t.shape)}")
            tensors.append(t)
        out.append(tensors)
    return out


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
             images: Optional[Sequence[Any]] = None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop: Sequence[str] = (), seed: int = 0, chat: bool = True,
             v2pe_delta: float = 1.0) -> list[str]:
    """The model's answer to each prompt, as text.

    ``chat=True`` wraps each prompt in the training chat template (``USER: ...\\nASSISTANT:
    ``, ``moe_vlm.data.chat.render_prompt``; the image placeholders laid out as in
    training), ``chat=False`` continues the raw text. ``images``: one entry per prompt
    (None, a file path, a normalised [3, H, W] tensor, or a list of them; files are
    loaded as training loads them). Greedy with ``temperature=0``, else sampled under
    ``seed`` (deterministic for a given batch; greedy answers do not depend on the batch).
    Generation stops at the tokenizer's eos (and its ``stop_ids``, if it lists more), at a
    ``stop`` string (cut before it) or after ``max_new_tokens``."""
    vlm = hasattr(model, "image_token_id")
    if images is not None and not vlm:
        raise ValueError("images given to a text-only model (vision=none)")
    if vlm:
        vc = model.vision.cfg
        per_prompt = prompt_images(images, len(prompts), vc.image_size, vc.image_mean, vc.image_std)
    else:
        per_prompt = [[] for _ in prompts]
    n_img_tok = model.n_image_tokens if vlm else 0
    ids = []
    for text, ims in zip(prompts, per_prompt):
        if chat:
            ids.append(render_prompt(text, tokenizer, len(ims), n_img_tok))
        else:
            if ims or "<image>" in text:
                raise ValueError("images need the chat template (chat=True), which places "
                                 "their tokens as in training")
            bos = getattr(tokenizer, "bos_id", None)
            ids.append(([bos] if bos is not None else []) + tokenizer.encode(text))
    flat = [t for ims in per_prompt for t in ims]
    pixel_values = torch.stack(flat) if flat else None  # [N, 3, H, W]
    out = generate_ids(model, ids, pixel_values, max_new_tokens,
                       Sampling(temperature, top_k, top_p), seed,
                       stop_ids=[tokenizer.eos_id, *getattr(tokenizer, "stop_ids", ())],
                       stop_strings=stop,
                       decode=tokenizer.decode, pad_id=tokenizer.pad_id, v2pe_delta=v2pe_delta)
    texts = [tokenizer.decode(o) for o in out]
    return [_cut_text(t, stop) for t in texts]


def _cut_text(text: str, stop: Sequence[str]) -> str:
    """``text`` up to its first stop string (a token may straddle the cut)."""
    hits = [text.find(s) for s in stop if s and s in text]
    return text[:min(hits)] if hits else text
