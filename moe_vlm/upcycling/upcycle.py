"""Upcycle a dense model's weights into a built MoE model (decoder or VLM), layer by layer.

Every tensor that is not an FFN of a layer the target makes MoE is copied unchanged
(embeddings, attention, norms, head, dense FFN layers, and the vision tower and projector
of a VLM). Each MoE layer's experts, router and shared expert come from that layer's dense
FFN via ``methods.upcycle_ffn``. Which layers become MoE is the target's schedule
(``model.n_dense_layers``, ``model.moe_every``). A target whose vision tower has MoE
blocks (``vision.moe_every``) gets the dense tower's MLPs copied into every expert of
them (``model.vision_moe.upcycle_tower_state``), whatever ``upcycle.method``.
A recurrent router (``routing.recurrent``, RMoE) has nothing to come from: its projections,
per-layer routers and shared GRU keep the target's fresh init (router rows shared within a
replica's shards, as the virtual-group init).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from moe_vlm.config.schema import Config, RoutingConfig, UpcycleConfig
from moe_vlm.model.decoder import DecoderLM
from moe_vlm.model.vision_moe import upcycle_tower_state
from moe_vlm.routing.router import normalizes_weights
from moe_vlm.upcycling.methods import (
    DenseFFN,
    UpcycleSpec,
    preserves_function,
    upcycle_ffn,
)

_FFN = re.compile(r"^layers\.(\d+)\.ffn\.")


@dataclass(frozen=True)
class UpcycleReport:
    """What was done, for ``upcycle.json`` and the run summary."""

    method: str
    base: str
    shards: int  # m: dense units per copy split into this many experts (1 = copy)
    moe_layers: list[int]
    function_preserving: bool
    reason: str
    copied_vision: bool = False
    options: dict = field(default_factory=dict)


def _decoder_of(model: nn.Module) -> tuple[DecoderLM, str]:
    dec = getattr(model, "decoder", model)
    if not isinstance(dec, DecoderLM):
        raise TypeError(f"upcycle: expected a DecoderLM or a VLM with .decoder, got {type(model).__name__}")
    return dec, "decoder." if dec is not model else ""


def _split_source(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(decoder tensors without prefix, everything else of a VLM state dict)."""
    if any(k.startswith("decoder.") for k in sd):
        dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
        rest = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
        return dec, rest
    return dict(sd), {}


def spec_for(target: DecoderLM, ucfg: UpcycleConfig) -> UpcycleSpec:
    s = target.moe_sizes
    return UpcycleSpec(
        n_experts=s.n_experts, d_expert=s.d_expert, top_k=s.top_k, d_shared=s.d_shared,
        method=ucfg.method, base=ucfg.base, shared=ucfg.shared, permute=ucfg.permute,
        drop_ratio=ucfg.drop_ratio, noise_std=ucfg.noise_std,
        router_std=ucfg.router_std if ucfg.router_std is not None else target.cfg.init_std,
        granularity=s.granularity, n_shared=s.d_shared // (s.d_expert * s.granularity))


@torch.no_grad()
def upcycle_into(target: nn.Module, dense_state: dict[str, Tensor], ucfg: UpcycleConfig,
                 seed: int = 0) -> UpcycleReport:
    """Overwrite ``target``'s weights with the upcycled dense weights (in place).

    ``dense_state``: a dense decoder's or dense VLM's state dict (ours; Hugging Face
    checkpoints are mapped to it by ``moe_vlm.upcycling.hf.import_hf``). Raises
    ``ValueError`` naming the tensor when shapes or names do not fit."""
    if ucfg.method == "none":
        raise ValueError("upcycle.method=none: nothing to upcycle; choose copy, split, drop or noise")
    dec, prefix = _decoder_of(target)
    src, src_rest = _split_source(dense_state)
    if prefix == "" and src_rest:
        raise ValueError(f"upcycle: the source is a vision-language model ({len(src_rest)} "
                         "vision/projector tensors) but the target is text-only; set vision to "
                         "match the source")
    for k in src:
        if ".ffn.router." in k or ".ffn.experts." in k:
            raise ValueError(f"upcycle: the source is already an MoE model ({k}); upcycle a "
                             "dense checkpoint")
    spec = spec_for(dec, ucfg)
    gen = torch.Generator().manual_seed(seed if ucfg.seed is None else ucfg.seed)
    own = dec.state_dict()
    new: dict[str, Tensor] = {}
    used: set[str] = set()
    moe_ids = [i for i, is_moe in enumerate(dec.schedule) if is_moe]
    base, shards = "copy", 1
    for i in moe_ids:
        keys = (f"layers.{i}.ffn.w_in.weight", f"layers.{i}.ffn.w_out.weight")
        for k in keys:
            if k not in src:
                raise ValueError(f"upcycle: the source has no dense FFN tensor {k!r} for MoE layer {i}")
        w_in, w_out = src[keys[0]], src[keys[1]]  # [2F, D], [D, F]
        f = w_out.shape[1]
        if tuple(w_in.shape) != (2 * f, dec.cfg.d_model):
            raise ValueError(f"upcycle: {keys[0]} has shape {tuple(w_in.shape)}, expected "
                             f"{(2 * f, dec.cfg.d_model)} (model.d_model={dec.cfg.d_model})")
        up = upcycle_ffn(DenseFFN(w_in[:f], w_in[f:], w_out), spec, gen)
        base, shards = up.base, up.shards
        p = f"layers.{i}.ffn."
        new[p + "experts.w_in"], new[p + "experts.w_out"] = up.w_in, up.w_out
        new[p + "router.weight"] = up.router
        if dec.routing_cfg.recurrent:  # RMoE: the router reads h [T, R], not x; keep its fresh
            # init, shards of a replica sharing one row as the virtual-group init does
            new[p + "router.weight"] = own[p + "router.weight"][::up.shards].repeat_interleave(up.shards, 0)
        new[p + "router.bias"] = torch.zeros_like(own[p + "router.bias"])
        if up.shared_in is not None:
            new[p + "shared.w_in.weight"], new[p + "shared.w_out.weight"] = up.shared_in, up.shared_out
        used.update(keys)
    for k, v in own.items():
        if k in new:
            continue
        if k.startswith("router_gru."):  # routing.recurrent: the GRU is new, at its fresh init
            new[k] = v
            continue
        m = _FFN.match(k)
        if m and int(m.group(1)) in moe_ids:  # shared expert kept at its fresh init
            new[k] = v
            continue
        if k not in src:
            raise ValueError(f"upcycle: the source has no tensor {k!r}; it must be the same "
                             "model except for its FFNs (check model.* sizes and tie_embeddings)")
        if src[k].shape != v.shape:
            raise ValueError(f"upcycle: {k!r} is {tuple(src[k].shape)} in the source but "
                             f"{tuple(v.shape)} in the target; keep model.* sizes equal")
        new[k] = src[k]
        used.add(k)
    unused = sorted(set(src) - used)
    if unused:
        raise ValueError(f"upcycle: source tensors with no place in the target: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''} (is model.tie_embeddings the same?)")
    load_built(dec, own, new, "upcycle")
    copied_vision = False
    if prefix and src_rest:
        src_rest = _upcycle_vision_mlps(target, src_rest)
        rest_own = {k: v for k, v in target.state_dict().items() if not k.startswith("decoder.")}
        diff = sorted(set(rest_own) ^ set(src_rest))
        shape = sorted(k for k in set(rest_own) & set(src_rest) if rest_own[k].shape != src_rest[k].shape)
        if diff or shape:
            raise ValueError(f"upcycle: the source's vision tower/projector do not fit the target: "
                             f"names {diff[:5]}, shapes {shape[:5]}; keep vision.* and projector.* equal")
        target.load_state_dict({**{prefix + k: v for k, v in dec.state_dict().items()}, **src_rest})
        copied_vision = True
    r: RoutingConfig = dec.routing_cfg
    ok, why = preserves_function(spec, r.gate, normalizes_weights(r, spec.top_k), r.routed_scaling,
                                 r.capacity_factor,
                                 int(src[f"layers.{moe_ids[0]}.ffn.w_out.weight"].shape[1])
                                 if moe_ids else 0)
    opts = {"shared": ucfg.shared, "permute": ucfg.permute, "base": ucfg.base}
    if ucfg.method == "drop":
        opts["drop_ratio"] = ucfg.drop_ratio
    if ucfg.method == "noise":
        opts["noise_std"] = ucfg.noise_std
    return UpcycleReport(ucfg.method, base, shards, moe_ids, ok, why, copied_vision, opts)


def load_built(dec: nn.Module, own: dict[str, Tensor], new: dict[str, Tensor], what: str) -> None:
    """Load the built decoder tensors ``new`` into ``dec`` (whose state dict was ``own``)
    in its dtypes, after checking every shape; errors start with ``what``."""
    for k, v in new.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{what}: built {k!r} with shape {tuple(v.shape)}, the target "
                             f"expects {tuple(own[k].shape)}")
    dec.load_state_dict({k: v.to(own[k].dtype) for k, v in new.items()})


def _upcycle_vision_mlps(target: nn.Module, src_rest: dict[str, Tensor]) -> dict[str, Tensor]:
    """A dense VLM's vision/projector tensors ``src_rest``, with the target tower's MoE
    blocks (if any, and if the source's are dense) filled from the source's MLPs."""
    tower = getattr(target, "vision", None)
    blocks = [i for i, m in enumerate(getattr(tower, "schedule", [])) if m]
    dense = {k[len("vision."):]: v for k, v in src_rest.items() if k.startswith("vision.")}
    if not blocks or any(".mlp.experts." in k for k in dense):
        return src_rest
    vision = upcycle_tower_state(dense, tower.state_dict(), blocks)
    rest = {k: v for k, v in src_rest.items() if not k.startswith("vision.")}
    return {**rest, **{f"vision.{k}": v for k, v in vision.items()}}


def upcycle_from_config(target: nn.Module, cfg: Config) -> dict:
    """``upcycle.source`` -> ``target`` with ``cfg.upcycle``; returns the report as a dict
    (with the source path) for ``summary.json``."""
    from moe_vlm.upcycling.source import load_checkpoint

    src = load_checkpoint(cfg.upcycle.source, trust=cfg.train.trust_checkpoint, what="upcycle.source")
    report = upcycle_into(target, src.state_dict, cfg.upcycle, seed=cfg.seed)
    return {**asdict(report), "source": str(src.path), "source_kind": src.kind}
