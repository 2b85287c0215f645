"""Grow a dense checkpoint into a wider and/or deeper dense one: the scale-up half of
AquilaMoE's EfficientScale (arXiv 2408.06567; scale up, then scale out by upcycling).

Legend: V vocabulary, D model width (residual stream), F dense MLP width, H query heads,
G key/value heads, Hd head dim (kept), L layers, ' the grown size.

Width, ``fpi`` (bert2BERT's function-preserving initialisation, arXiv 2110.07143): every
grown axis gets a unit map ``g: [n'] -> [n]`` (the first n units are themselves, the rest
copies; ``unit_map``) and ``c[i]`` = how many new units copy unit i. A tensor that *writes*
a grown axis has its rows copied, ``W'[j] = W[g(j)]``; a tensor that *reads* one has its
columns copied and divided by the copy count, ``W'[:, j] = W[:, g(j)] / c[g(j)]``, so the
reader sees the same sum. That is exact for the SwiGLU hidden units (``d_ff``: gate and up
rows copied, ``w_out`` columns divided), for attention heads (q rows of a head, k/v rows of
its group copied with ``Hd`` fixed, ``wo`` columns divided) and for the projector's hidden
units, for any n' >= n.

The residual width D is read through RMSNorm, which divides by the RMS over all D units.
Copying every unit the same number of times (D' = k D) keeps mean(x'^2) = mean(x^2), so
the norms (weights copied) give copies of the old outputs: exact. The embedding is copied
(it writes the stream); the final norm's weight is divided by the copy count when the head
is the tied embedding, so ``logits = norm(x') . E'`` counts each old unit once. A D' that
is not a multiple of D copies some units more often: the RMS changes and the model is not
the same function (the report says so and measures by how much).

Depth: ``stack`` (G_stack, Du et al. 2024, arXiv 2405.15319: the layer stack repeated,
new layer j = old layer j mod L; not function preserving) or ``identity`` (each old
layer followed by its copies with the output projections ``wo`` and ``w_out`` zeroed, so a
copy adds nothing to the residual stream at first: bert2BERT / Net2Net's identity layers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from moe_vlm.config.schema import Config, ModelConfig

WIDTH_METHODS = ("fpi",)
DEPTH_METHODS = ("identity", "stack")
GROWN = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")  # may only grow
KEPT = ("vocab_size", "tie_embeddings", "qk_norm", "qkv_bias", "norm_eps", "rope_theta",
        "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
        "rope_original_max_len", "moe_every")  # must equal the source's


@dataclass(frozen=True)
class UnitMap:
    """``g`` [n'] (long): the old unit each new unit copies; ``count`` [n] (float): how
    many new units copy each old one."""

    g: Tensor
    count: Tensor

    @property
    def uniform(self) -> bool:
        return bool((self.count == self.count[0]).all())


def unit_map(n_old: int, n_new: int, gen: torch.Generator) -> UnitMap:
    """The first ``n_old`` new units are the old ones; then whole copies of all of them
    while they fit; the remainder copies a random subset (without repeats), as bert2BERT
    picks its extra units. ``n_new = k n_old`` gives every unit exactly k copies."""
    if n_new < n_old:
        raise ValueError(f"cannot shrink {n_old} units to {n_new}")
    whole = torch.arange(n_new // n_old * n_old) % n_old
    rest = torch.randperm(n_old, generator=gen)[: n_new % n_old].sort().values
    g = torch.cat([whole, rest])  # [n']
    return UnitMap(g, torch.bincount(g, minlength=n_old).to(torch.float64))


def head_maps(h_old: int, kv_old: int, h_new: int, kv_new: int) -> tuple[UnitMap, UnitMap]:
    """(query-head map, key/value-group map) that keep grouped-query attention consistent:
    new group m copies old group m mod G, and the query heads of every new group copy
    query heads of the group it copies, taking that group's r = H/G heads in turn across
    all its copies, so every old head is copied at least once. Raises ``ValueError`` when
    the copies of a group have fewer query slots than it has heads."""
    r_old, r_new = h_old // kv_old, h_new // kv_new
    g_kv = torch.arange(kv_new) % kv_old  # [G']
    g_h = torch.empty(h_new, dtype=torch.long)  # [H']
    for o in range(kv_old):
        groups = (g_kv == o).nonzero().flatten().tolist()
        if len(groups) * r_new < r_old:
            raise ValueError(
                f"model.n_heads={h_new} with model.n_kv_heads={kv_new}: the {len(groups)} new "
                f"key/value group(s) copying old group {o} hold {len(groups) * r_new} query "
                f"heads, fewer than its {r_old}; grow model.n_heads at least as much as "
                "model.n_kv_heads")
        slots = [m * r_new + s for m in groups for s in range(r_new)]
        for t, j in enumerate(slots):
            g_h[j] = o * r_old + t % r_old
    count = lambda g, n: torch.bincount(g, minlength=n).to(torch.float64)  # noqa: E731
    return UnitMap(g_h, count(g_h, h_old)), UnitMap(g_kv, count(g_kv, kv_old))


def _blocks(m: UnitMap, size: int) -> UnitMap:
    """A map of heads -> the map of their ``size`` rows each (head i = rows i*size ...)."""
    g = (m.g[:, None] * size + torch.arange(size)).flatten()  # [n' * size]
    return UnitMap(g, m.count.repeat_interleave(size))


def write(w: Tensor, m: UnitMap, dim: int = 0) -> Tensor:
    """Copy the units of axis ``dim`` that write a grown axis: ``W'[j] = W[g(j)]``."""
    return w.index_select(dim, m.g)


def read(w: Tensor, m: UnitMap) -> Tensor:
    """Copy the input columns of a weight that reads a grown axis, each divided by its copy
    count: ``W'[:, j] = W[:, g(j)] / c[g(j)]`` (so ``W' x[g] = W x``)."""
    return (w.double().index_select(1, m.g) / m.count[m.g]).to(w.dtype)


@dataclass(frozen=True)
class GrowReport:
    """What ``grow`` did, for ``grow.json`` and the printed summary."""

    width: str
    depth: str
    function_preserving: bool  # promised by the methods (the measured gap is separate)
    reason: str
    sizes: dict  # key -> [source, target]
    layer_sources: list[int]  # new layer j copies old layer layer_sources[j]
    new_layers: list[int]  # the inserted layers (identity: outputs zeroed)
    seed: int = 0  # picked the copied units of a width that is not a whole multiple


def grown_config(src: ModelConfig, target: ModelConfig) -> ModelConfig:
    """``target`` with the source's head width written out (``model.head_dim`` fixed, so a
    wider d_model does not change it). Raises ``ValueError`` naming the key for a shrink, a
    changed key that growth cannot carry, or a target that is not dense."""
    hd = src.head_dim or src.d_model // src.n_heads
    if target.moe_every != 0 or src.moe_every != 0:
        which = "source" if src.moe_every != 0 else "target"
        raise ValueError(f"grow: the {which} has MoE layers (model.moe_every="
                         f"{src.moe_every if src.moe_every else target.moe_every}); grow a dense "
                         "checkpoint into a dense one, then upcycle it (moe-vlm upcycle)")
    if target.head_dim not in (None, hd):
        raise ValueError(f"grow: model.head_dim={target.head_dim} differs from the source's {hd}; "
                         "heads keep their width (rotary frequencies depend on it): grow "
                         "model.n_heads instead")
    target = replace(target, head_dim=hd)
    for k in GROWN:
        if getattr(target, k) < getattr(src, k):
            raise ValueError(f"grow: model.{k}={getattr(target, k)} is smaller than the "
                             f"source's {getattr(src, k)}; grow only grows (keep it >= "
                             f"{getattr(src, k)})")
    for k in KEPT:
        if getattr(target, k) != getattr(src, k):
            raise ValueError(f"grow: model.{k}={getattr(target, k)} differs from the source's "
                             f"{getattr(src, k)}; growth keeps it (remove the override)")
    if all(getattr(target, k) == getattr(src, k) for k in GROWN):
        raise ValueError("grow: nothing grows; set a larger model.d_model, model.d_ff, "
                         "model.n_heads / model.n_kv_heads or model.n_layers")
    head_maps(src.n_heads, src.n_kv_heads, target.n_heads, target.n_kv_heads)  # feasible?
    return target


def layer_plan(n_old: int, n_new: int, depth: str) -> tuple[list[int], list[int]]:
    """(the old layer each new layer copies, the inserted layers). ``stack``: j mod L.
    ``identity``: every old layer, followed by its copies (the first ``(L' - L) mod L``
    old layers get one more copy than the others)."""
    if depth not in DEPTH_METHODS:
        raise ValueError(f"grow: unknown depth method {depth!r}; choose one of "
                         f"{list(DEPTH_METHODS)}")
    if depth == "stack":
        return [j % n_old for j in range(n_new)], list(range(n_old, n_new))
    extra = n_new - n_old
    sources, new = [], []
    for i in range(n_old):
        sources.append(i)
        for _ in range(extra // n_old + (i < extra % n_old)):
            new.append(len(sources))
            sources.append(i)
    return sources, new


def _grow_layer(sd: dict[str, Tensor], p: str, d: UnitMap, q: UnitMap, kv: UnitMap,
                f: UnitMap) -> dict[str, Tensor]:
    """One decoder block's tensors (prefix ``p``) widened; ``q`` / ``kv`` are row maps of
    the query / key-value projections (heads expanded to their Hd rows)."""
    out: dict[str, Tensor] = {}
    for norm in ("attn_norm", "ffn_norm"):
        out[f"{p}{norm}.weight"] = write(sd[f"{p}{norm}.weight"], d)  # [D']
    for name, rows in (("wq", q), ("wk", kv), ("wv", kv)):
        out[f"{p}attn.{name}.weight"] = write(read(sd[f"{p}attn.{name}.weight"], d), rows)
        if f"{p}attn.{name}.bias" in sd:
            out[f"{p}attn.{name}.bias"] = write(sd[f"{p}attn.{name}.bias"], rows)
    out[f"{p}attn.wo.weight"] = write(read(sd[f"{p}attn.wo.weight"], q), d)  # [D', H' Hd]
    for norm in ("q_norm", "k_norm"):  # per head, [Hd]: heads keep their width
        if f"{p}attn.{norm}.weight" in sd:
            out[f"{p}attn.{norm}.weight"] = sd[f"{p}attn.{norm}.weight"]
    w_in = read(sd[f"{p}ffn.w_in.weight"], d)  # [2F, D']
    gate, up = w_in.chunk(2, dim=0)
    out[f"{p}ffn.w_in.weight"] = torch.cat([write(gate, f), write(up, f)])  # [2F', D']
    out[f"{p}ffn.w_out.weight"] = write(read(sd[f"{p}ffn.w_out.weight"], f), d)  # [D', F']
    return out


def grow_decoder_state(sd: dict[str, Tensor], src: ModelConfig, tgt: ModelConfig, depth: str,
                       d: UnitMap, gen: torch.Generator
                       ) -> tuple[dict[str, Tensor], list[int], list[int]]:
    """A dense decoder's state dict (no ``decoder.`` prefix) grown to ``tgt`` (from
    ``grown_config``) with the residual map ``d``; returns (state, layer sources, new
    layers). Raises ``ValueError`` for a tensor the plan has no place for."""
    hd = src.head_dim or src.d_model // src.n_heads
    qh, kvh = head_maps(src.n_heads, src.n_kv_heads, tgt.n_heads, tgt.n_kv_heads)
    q, kv = _blocks(qh, hd), _blocks(kvh, hd)
    f = unit_map(src.d_ff, tgt.d_ff, gen)
    top = ("embed.weight", "norm.weight") + (() if src.tie_embeddings else ("head.weight",))
    missing = [k for k in top if k not in sd]
    try:
        wide = [_grow_layer(sd, f"layers.{i}.", d, q, kv, f) for i in range(src.n_layers)]
    except KeyError as e:
        missing.append(str(e.args[0]))
    if missing:
        raise ValueError(f"grow: the source has no tensor {missing[0]!r}; it must be a dense "
                         "decoder with the shapes of its config (model.n_layers, tie_embeddings)")
    out = {"embed.weight": write(sd["embed.weight"], d, dim=1)}  # [V, D']
    norm = write(sd["norm.weight"], d)  # [D']
    if tgt.tie_embeddings:  # the head reads through the copied embedding: divide here
        norm = (norm.double() / d.count[d.g]).to(norm.dtype)
    else:
        out["head.weight"] = read(sd["head.weight"], d)  # [V, D']
    out["norm.weight"] = norm
    sources, new = layer_plan(src.n_layers, tgt.n_layers, depth)
    for j, i in enumerate(sources):
        for k, v in wide[i].items():
            out[f"layers.{j}." + k.split(".", 2)[2]] = v.clone()
    if depth == "identity":
        for j in new:
            out[f"layers.{j}.attn.wo.weight"].zero_()
            out[f"layers.{j}.ffn.w_out.weight"].zero_()
    read_keys = {"embed.weight", "norm.weight", "head.weight"}.union(*wide)
    unused = sorted(set(sd) - read_keys)
    if unused:
        raise ValueError(f"grow: source tensors growth has no rule for: {unused[:5]} (a dense "
                         "decoder of this repo's layout is expected)")
    return out, sources, new


def grow_vision_state(rest: dict[str, Tensor], vision_name: str, d: UnitMap) -> dict[str, Tensor]:
    """A VLM's non-decoder tensors with their decoder-width axis grown by ``d``: the
    projector (fc1 writes its hidden units, which fc2 reads; fc2 writes the stream; the
    hidden width follows D, copied by the same map) or the encoder-free patch embedding;
    the vision tower itself is unchanged."""
    out = dict(rest)
    if vision_name == "patch":
        out["vision.patch_embed.weight"] = write(rest["vision.patch_embed.weight"], d)
        out["vision.patch_embed.bias"] = write(rest["vision.patch_embed.bias"], d)
        if "vision.pos_embed.weight" in rest:
            out["vision.pos_embed.weight"] = write(rest["vision.pos_embed.weight"], d, dim=1)
        return out
    out["projector.fc1.weight"] = write(rest["projector.fc1.weight"], d)  # [D', Dv m^2]
    out["projector.fc1.bias"] = write(rest["projector.fc1.bias"], d)
    out["projector.fc2.weight"] = write(read(rest["projector.fc2.weight"], d), d)  # [D', D']
    out["projector.fc2.bias"] = write(rest["projector.fc2.bias"], d)
    return out


def grow_state(sd: dict[str, Tensor], src: Config, tgt: Config, width: str = "fpi",
               depth: str = "identity", seed: int = 0) -> tuple[dict[str, Tensor], GrowReport]:
    """A dense decoder's or dense VLM's state dict (``src``'s shapes) -> the state dict of
    ``tgt`` (same config but ``model.*`` grown, from ``grown_config``), and the report."""
    if width not in WIDTH_METHODS:
        raise ValueError(f"grow: unknown width method {width!r}; choose one of "
                         f"{list(WIDTH_METHODS)}")
    for k in sd:
        if ".ffn.router." in k or ".ffn.experts." in k:
            raise ValueError(f"grow: the source is an MoE model ({k}); grow a dense checkpoint, "
                             "then upcycle it")
    gen = torch.Generator().manual_seed(seed)
    s, t = src.model, tgt.model
    d = unit_map(s.d_model, t.d_model, gen)
    is_vlm = any(k.startswith("decoder.") for k in sd)
    dec = sd
    if is_vlm:
        dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    grown, sources, new = grow_decoder_state(dec, s, t, depth, d, gen)
    if is_vlm:
        rest = grow_vision_state({k: v for k, v in sd.items() if not k.startswith("decoder.")},
                                 src.vision.name, d)
        grown = {**{f"decoder.{k}": v for k, v in grown.items()}, **rest}
    why = []
    if not d.uniform:
        why.append(f"d_model {s.d_model} -> {t.d_model} is not a whole multiple: units copied "
                   "unequally change the RMS that every RMSNorm divides by")
    if depth == "stack" and new:
        why.append("stack repeats layers, which changes the function")
    ok = not why
    reason = "; ".join(why) if why else (
        "copied units with divided reads (bert2BERT FPI)"
        + (", inserted layers with zeroed output projections" if new else ""))
    sizes = {k: [getattr(s, k), getattr(t, k)] for k in GROWN}
    return grown, GrowReport(width, depth, ok, reason, sizes, sources, new, seed)


@torch.no_grad()
def max_logit_gap(a: torch.nn.Module, b: torch.nn.Module, cfg: Config, seed: int = 0,
                  image_token_id: Optional[int] = 0) -> float:
    """Max |logit difference| of two models of the same vocabulary on one fixed random
    batch: 2 sequences of random token ids; for a VLM, each starting with one random
    image's placeholder tokens (``image_token_id``, as the model was built with)."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.model.vocab_size
    vlm = hasattr(a, "decoder")
    n_img = a.n_image_tokens if vlm else 0
    seq = min(cfg.model.max_seq_len, n_img + 16)
    ids = torch.randint(1 if vlm else 0, v, (2, seq), generator=g)  # [B, S]
    if not vlm:
        return float((a.eval()(ids).logits - b.eval()(ids).logits).abs().max())
    ids[:, :n_img] = image_token_id
    s = cfg.vision.image_size
    pix = torch.randn(2, 3, s, s, generator=g)  # [N, 3, H, W]
    return float((a.eval()(ids, pixel_values=pix).logits
                  - b.eval()(ids, pixel_values=pix).logits).abs().max())
