"""Branch-Train-MiX merge (Sukhbaatar et al. 2024, arXiv 2403.07816): N dense branches of
one seed model, each trained on its own data, become one MoE model.

Legend: N branches (= routed experts E), D model width, F dense FFN width (= expert width),
V vocabulary, B batch, S sequence.

For every MoE layer l of the target (the target's schedule: ``model.moe_every``,
``model.n_dense_layers``):

    experts.w_in[e]  = branch e's layers.l.ffn.w_in.weight^T    # [D, 2F] (gate | up)
    experts.w_out[e] = branch e's layers.l.ffn.w_out.weight^T   # [F, D]
    router.weight    ~ N(0, router_std^2) from a generator seeded with the seed  # [N, D]
    router.bias      = 0

Every other tensor (embeddings, attention, norms, head, the FFNs of the target's dense
layers, a VLM's vision tower and projector) is the plain mean over the branches, computed
in float64 and cast back (the paper's choice). The experts are granularity 1 and there are
no shared experts: an expert is one branch's whole FFN.

Function check: with N identical branches every expert is the same FFN f and each
average is that tensor exactly, so a gate whose kept weights sum to 1 (softmax top-k with
``routing.renormalize``, sigmoid top-k; dropless, ``routed_scaling=1``) gives
sum_k w_k f(x) = f(x): the merged model is the dense model. With different branches the
merged model reproduces no branch (different FFNs are mixed by an untrained router over
averaged attention); the MiX finetune learns the routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from moe_vlm.routing.router import normalizes_weights
from moe_vlm.upcycling.methods import UpcycleSpec, preserves_function
from moe_vlm.upcycling.upcycle import _decoder_of, _split_source, load_built


@dataclass(frozen=True)
class BTXReport:
    """What the merge did, for ``btx.json`` and the printed summary."""

    n_branches: int
    moe_layers: list[int]
    experts: list[str]  # target tensors whose expert e is branch e's FFN
    averaged: list[str]  # target tensors set to the mean over branches
    differing: list[str]  # of those, the ones whose branches disagree (a true average)
    fresh: list[str]  # router tensors, freshly initialised
    identical_branches: bool  # every tensor of every branch equal to branch 0's
    function_preserving: bool  # the merged model equals every branch at step 0
    reason: str
    merged_vision: bool  # a VLM's vision tower and projector were averaged too


def _dense_ffn_keys(i: int) -> tuple[str, str]:
    return f"layers.{i}.ffn.w_in.weight", f"layers.{i}.ffn.w_out.weight"


def check_branches(branches: Sequence[Mapping[str, Tensor]], labels: Sequence[str]) -> None:
    """Refuse branches that cannot be merged: fewer than 2, an MoE branch, or tensor
    names/shapes/dtypes that differ from the first branch's (naming the tensor and the
    branches). Different values are expected: that is what training the branches does."""
    if len(branches) < 2:
        raise ValueError(f"btx: merging needs at least 2 branches, got {len(branches)}; for one "
                         "dense model use `moe-vlm upcycle --method copy`")
    if len(labels) != len(branches):
        raise ValueError(f"btx: {len(labels)} labels for {len(branches)} branches")
    first, a = branches[0], labels[0]
    for sd, b in zip(branches, labels):
        moe = [k for k in sd if ".ffn.router." in k or ".ffn.experts." in k or ".mlp.experts." in k]
        if moe:
            raise ValueError(f"btx: branch {b} is already an MoE model ({moe[0]}); BTX merges "
                             "dense branches (train them with model.moe_every=0)")
    for sd, b in zip(branches[1:], labels[1:]):
        only_a, only_b = sorted(set(first) - set(sd)), sorted(set(sd) - set(first))
        if only_a or only_b:
            raise ValueError(f"btx: branches {a} and {b} have different tensors (only in {a}: "
                             f"{only_a[:3]}, only in {b}: {only_b[:3]}); branches must share one "
                             "architecture (the seed model's model.*, vision.*, projector.*)")
        for k, v in first.items():
            if sd[k].shape != v.shape or sd[k].dtype != v.dtype:
                raise ValueError(f"btx: {k!r} is {tuple(v.shape)} {v.dtype} in {a} but "
                                 f"{tuple(sd[k].shape)} {sd[k].dtype} in {b}; branches must "
                                 "share one architecture (same model.* sizes as the seed run)")


def _mean(tensors: Sequence[Tensor], key: str, like: Tensor) -> Tensor:
    """The element-wise mean (float64, cast to ``like``'s dtype); integer/bool tensors must
    agree across branches and are copied."""
    if not tensors[0].is_floating_point():
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ValueError(f"btx: the non-float tensor {key!r} differs across branches and "
                             "cannot be averaged")
        return tensors[0].to(like.dtype)
    return torch.stack([t.double() for t in tensors]).mean(0).to(like.dtype)


def _check_target(dec: nn.Module, n: int, moe_ids: list[int], branch: Mapping[str, Tensor]) -> None:
    """The target's MoE shape must be BTX's: one granularity-1 expert per branch, each as
    wide as the branch's FFN, no shared experts; errors name the key to change."""
    s = dec.moe_sizes
    if not moe_ids:
        raise ValueError("btx: the target has no MoE layers; set model.moe_every >= 1")
    if s.granularity != 1:
        raise ValueError(f"btx: moe.granularity={s.granularity}; each expert is a branch's whole "
                         "FFN: set moe.granularity=1")
    if s.n_experts != n:
        raise ValueError(f"btx: moe.n_experts={s.n_experts} but there are {n} branches; BTX makes "
                         f"one expert per branch: set moe.n_experts={n}")
    if s.d_shared:
        raise ValueError("btx: the target has shared experts (moe.n_shared > 0), which no branch "
                         "provides: set moe.n_shared=0")
    for i in moe_ids:
        k_in, k_out = _dense_ffn_keys(i)
        if k_in not in branch or k_out not in branch:
            raise ValueError(f"btx: the branches have no dense FFN tensor {k_out!r} for MoE layer "
                             f"{i}; the target must have the branches' model.n_layers")
        f = branch[k_out].shape[1]
        if s.d_expert != f:
            raise ValueError(f"btx: moe.d_expert={s.d_expert} but the branches' FFN width "
                             f"(model.d_ff) is {f}: set moe.d_expert={f}")


def _routing_reason(dec: nn.Module, n: int, f: int) -> tuple[bool, str]:
    """Whether N identical branches would merge into their dense model (the gate's kept
    weights sum to 1, dropless, no routed scaling), via the upcycling rule for copy."""
    r = dec.routing_cfg
    k = dec.moe_sizes.top_k
    spec = UpcycleSpec(n_experts=n, d_expert=f, top_k=k, d_shared=0, method="copy")
    return preserves_function(spec, r.gate, normalizes_weights(r, k), r.routed_scaling,
                              r.capacity_factor, f)


@torch.no_grad()
def btx_merge_into(target: nn.Module, branches: Sequence[Mapping[str, Tensor]],
                   labels: Optional[Sequence[str]] = None, router_std: Optional[float] = None,
                   seed: int = 0) -> BTXReport:
    """Overwrite ``target`` (a built MoE decoder or VLM) with the BTX merge of ``branches``
    (dense state dicts of one architecture, e.g. our runs' checkpoints), in place.

    ``labels`` name the branches in errors (default ``branch0``, ...); ``router_std``
    defaults to ``model.init_std``; the routers are drawn layer by layer from a generator
    seeded with ``seed``. Raises ``ValueError`` naming the tensor or config key when the
    branches or the target do not fit."""
    labels = list(labels) if labels is not None else [f"branch{i}" for i in range(len(branches))]
    check_branches(branches, labels)
    dec, prefix = _decoder_of(target)
    split = [_split_source(dict(b)) for b in branches]
    srcs, rests = [s[0] for s in split], [s[1] for s in split]
    if prefix == "" and rests[0]:
        raise ValueError(f"btx: the branches are vision-language models ({len(rests[0])} "
                         "vision/projector tensors) but the target is text-only; keep vision.*")
    n = len(branches)
    moe_ids = [i for i, is_moe in enumerate(dec.schedule) if is_moe]
    _check_target(dec, n, moe_ids, srcs[0])
    std = router_std if router_std is not None else dec.cfg.init_std
    gen = torch.Generator().manual_seed(seed)
    own = dec.state_dict()
    new: dict[str, Tensor] = {}
    experts, fresh, used = [], [], set()
    for i in moe_ids:
        k_in, k_out = _dense_ffn_keys(i)
        p = f"layers.{i}.ffn."
        new[p + "experts.w_in"] = torch.stack([s[k_in].t() for s in srcs])  # [N, D, 2F]
        new[p + "experts.w_out"] = torch.stack([s[k_out].t() for s in srcs])  # [N, F, D]
        d = srcs[0][k_in].shape[1]
        new[p + "router.weight"] = torch.randn(n, d, generator=gen) * std  # [N, D]
        new[p + "router.bias"] = torch.zeros_like(own[p + "router.bias"])
        experts += [p + "experts.w_in", p + "experts.w_out"]
        fresh += [p + "router.weight", p + "router.bias"]
        used.update((k_in, k_out))
    averaged, differing = [], []
    for k, v in own.items():
        if k in new:
            continue
        if k not in srcs[0]:
            raise ValueError(f"btx: the target has {k!r}, which the branches lack; keep the "
                             "branches' model.* settings (only the MoE shape may change)")
        if srcs[0][k].shape != v.shape:
            raise ValueError(f"btx: {k!r} is {tuple(srcs[0][k].shape)} in the branches but "
                             f"{tuple(v.shape)} in the target; keep model.* sizes equal")
        new[k] = _mean([s[k] for s in srcs], k, v)
        averaged.append(k)
        if any(not torch.equal(s[k], srcs[0][k]) for s in srcs[1:]):
            differing.append(k)
        used.add(k)
    unused = sorted(set(srcs[0]) - used)
    if unused:
        raise ValueError(f"btx: branch tensors with no place in the target: {unused[:5]} (is "
                         "model.tie_embeddings the same as the branches'?)")
    load_built(dec, own, new, "btx")
    merged_vision = False
    if prefix and rests[0]:
        a, d = _merge_rest(target, rests)
        averaged += a
        differing += d
        merged_vision = True
    identical = all(torch.equal(b[k], branches[0][k]) for b in branches[1:] for k in branches[0])
    ok, why = _routing_reason(dec, n, int(srcs[0][_dense_ffn_keys(moe_ids[0])[1]].shape[1]))
    if not ok:
        preserving, reason = False, f"not even for identical branches: {why}"
    elif identical:
        preserving, reason = True, "identical branches, and the kept gate weights sum to 1"
    else:
        preserving, reason = False, ("the branches differ: the experts are different FFNs mixed "
                                     "by a fresh router, and the other weights are averages")
    return BTXReport(n, moe_ids, experts, averaged, differing, fresh, identical, preserving,
                     reason, merged_vision)


def _merge_rest(target: nn.Module, rests: Sequence[dict[str, Tensor]]) -> tuple[list[str], list[str]]:
    """Average a VLM's vision tower and projector into ``target``; (averaged, differing)."""
    tower = getattr(target, "vision", None)
    if any(getattr(tower, "schedule", [])):
        raise ValueError("btx: the target's vision tower has MoE blocks (vision.moe_every > 0); "
                         "BTX averages the branches' towers: set vision.moe_every=0")
    own = {k: v for k, v in target.state_dict().items() if not k.startswith("decoder.")}
    diff = sorted(set(own) ^ set(rests[0]))
    shape = sorted(k for k in set(own) & set(rests[0]) if own[k].shape != rests[0][k].shape)
    if diff or shape:
        raise ValueError(f"btx: the branches' vision tower/projector do not fit the target: names "
                         f"{diff[:5]}, shapes {shape[:5]}; keep vision.* and projector.* equal")
    merged = {k: _mean([r[k] for r in rests], k, own[k]) for k in own}
    target.load_state_dict(merged, strict=False)
    differing = [k for k in own if any(not torch.equal(r[k], rests[0][k]) for r in rests[1:])]
    return sorted(own), differing


@torch.no_grad()
def btx_logit_check(branches: Sequence[nn.Module], merged: nn.Module, vocab: int, seq: int,
                    seed: int = 0) -> dict:
    """Max |logit difference| (decoders, eval mode, random token ids ``[2, seq]``) of the
    merged model against the mean of the branches' logits and against each branch."""
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))  # [B, S]

    def logits(m: nn.Module) -> Tensor:
        return getattr(m, "decoder", m).eval()(ids).logits  # [B, S, V]

    per = [logits(b) for b in branches]
    got = logits(merged)
    mean = torch.stack([p.double() for p in per]).mean(0)  # [B, S, V]
    return {"max_abs_logit_diff_vs_branch_mean": float((got.double() - mean).abs().max()),
            "max_abs_logit_diff_vs_branches": [float((got - p).abs().max()) for p in per]}
