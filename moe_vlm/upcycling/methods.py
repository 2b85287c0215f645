"""Upcycling one dense SwiGLU FFN into routed (and shared) experts: pure tensor functions.

Legend: D model width, F dense FFN width, Fp width of the pool the routed experts come
from (F, or F minus the shared slice), Fe routed expert width, Fs shared width,
E routed experts, m = Fp / Fe shards per copy (``split``), K experts per token.

Dense weights in our layout: ``gate [F, D]``, ``up [F, D]``, ``down [D, F]``
(``SwiGLU.w_in.weight = cat(gate, up)``, ``SwiGLU.w_out.weight = down``). Experts come out
stacked as the MoE layer stores them: ``w_in [E, D, 2Fe]`` (gate | up), ``w_out [E, Fe, D]``.

Methods (``UpcycleConfig.method``):
- ``copy`` (Komatsuzaki et al. 2023, Sparse Upcycling): every expert is the whole pool;
  the router is freshly initialised. Needs Fe == Fp.
- ``split`` (He et al. 2024, NVIDIA, fine-grained upcycling; Qwen1.5-MoE with
  ``permute``): the pool's hidden units are cut into m = Fp/Fe shards, each replicated
  E/m times (expert ``i*m + j`` = shard j of replica i). Virtual-group router init: the m
  shards of a replica share one router row, so top-(m*k) picks whole replicas; each
  shard's down projection is scaled by m, so at step 0 the layer sums to the dense FFN.
- ``drop`` (Nakamura et al. 2025, Drop-Upcycling): copy or split, then in every expert a
  fraction r of the intermediate units (gate/up rows, down columns) is re-drawn from a
  normal with the mean and std of the original matrix; each expert drops its own units.
- ``noise``: copy or split plus Gaussian noise of ``noise_std`` x the matrix's std.
``fitting_d_expert`` gives the ``moe.d_expert`` the dense width fixes for a method (copy has
exactly one; split's natural one cuts the pool into ``moe.granularity`` shards), which
``moe-vlm upcycle`` uses when the user does not set ``moe.d_expert``.
Shared experts (``UpcycleConfig.shared``): ``slice`` (the first Fs units, after the
optional permutation; the routed experts are built from the other units), ``whole``
(a copy of the dense FFN; needs Fs == F), or ``random`` (keep the fresh init).

Function preservation at step 0: ``copy`` and ``split`` (``drop``/``noise`` change the
weights on purpose) with shared ``slice`` or no shared experts, dropless routing,
``routed_scaling = 1``, and a gate whose selected weights sum to 1: softmax top-k with
``renormalize`` or sigmoid top-k. ``split`` also needs K to be a multiple of m.
Softmax top-k without renormalisation scales the routed output by the selected
probability mass; expert choice routes a variable number of experts per token; a whole
shared copy doubles the FFN: none of those preserve the dense function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

METHODS = ("copy", "split", "drop", "noise")
SHARED_INITS = ("slice", "whole", "random")
BASES = ("auto", "copy", "split")


@dataclass(frozen=True)
class DenseFFN:
    gate: Tensor  # [F, D]
    up: Tensor  # [F, D]
    down: Tensor  # [D, F]

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def units(self, idx: Tensor) -> "DenseFFN":
        """The sub-FFN made of hidden units ``idx`` (a slice or permutation)."""
        return DenseFFN(self.gate[idx], self.up[idx], self.down[:, idx])


@dataclass(frozen=True)
class UpcycledFFN:
    w_in: Tensor  # [E, D, 2Fe]
    w_out: Tensor  # [E, Fe, D]
    router: Tensor  # [E, D]
    shared_in: Optional[Tensor]  # [2Fs, D] (SwiGLU.w_in.weight) or None = keep fresh init
    shared_out: Optional[Tensor]  # [D, Fs]
    base: str  # copy | split: how the routed experts were laid out
    shards: int  # m (1 for copy)


@dataclass(frozen=True)
class UpcycleSpec:
    """Target sizes and options for one layer (from the configs)."""

    n_experts: int
    d_expert: int
    top_k: int
    d_shared: int
    method: str = "copy"
    base: str = "auto"
    shared: str = "slice"
    permute: bool = False
    drop_ratio: float = 0.5
    noise_std: float = 0.01
    router_std: float = 0.02
    granularity: int = 1  # moe.granularity: only for the moe.d_expert hint in errors
    n_shared: int = 0  # moe.n_shared: likewise


def _stack(pool: DenseFFN, copies: int, shard: int, scale: float) -> tuple[Tensor, Tensor]:
    """Experts ``i*m + j`` = shard j (width ``shard``) of replica i -> (w_in, w_out)."""
    m = pool.width // shard
    ins, outs = [], []
    for j in range(m):
        sl = slice(j * shard, (j + 1) * shard)
        gate, up = pool.gate[sl], pool.up[sl]  # [Fe, D]
        ins.append(torch.cat([gate, up], 0).t())  # [D, 2Fe]
        outs.append(pool.down[:, sl].t() * scale)  # [Fe, D]
    w_in_e = torch.stack(ins).repeat(copies, 1, 1)  # [E, D, 2Fe], expert i*m + j
    w_out_e = torch.stack(outs).repeat(copies, 1, 1)  # [E, Fe, D]
    return w_in_e.contiguous(), w_out_e.contiguous()


def _choose_base(spec: UpcycleSpec, pool_width: int) -> str:
    if spec.method in ("copy", "split"):
        return spec.method
    if spec.base != "auto":
        return spec.base
    return "copy" if spec.d_expert == pool_width else "split"


def fitting_d_expert(dense_width: int, method: str, n_shared: int = 0, granularity: int = 1,
                     shared: str = "slice", base: str = "auto") -> int:
    """The ``moe.d_expert`` (granularity-1 width, as ``MoEConfig`` counts it) that the dense
    FFN width F fixes for ``method``, for a user who does not choose one.

    Routed experts are ``d / g`` wide and the shared experts ``s * d`` (d = ``moe.d_expert``,
    g = ``moe.granularity``, s = ``moe.n_shared``); a shared ``slice`` takes its units from
    the dense FFN, so the routed pool is F - s*d (all of F for ``whole`` / ``random``).

    - copy layout (``copy``; ``drop`` / ``noise`` with ``upcycle.base=copy``): every routed
      expert is the whole pool, d/g = F - s*d, so d = g*F / (1 + s*g). No other width works.
    - split layout (``split``; ``drop`` / ``noise`` with base ``split`` or ``auto``): the
      granularity-1 expert is the whole pool, cut into m = g shards: d = F - s*d, so
      d = F / (1 + s) (routed width F / (g(1 + s))). Any routed width that divides the pool
      also works; set ``moe.d_expert`` for those.
    - ``upcycle.shared=whole`` copies the dense FFN into the shared experts, s*d = F: d = F/s.

    At g = 1 both layouts give F / (1 + s). Raises ValueError naming the keys when no
    integer width fits (d must also be a multiple of g)."""
    if method not in METHODS:
        raise ValueError(f"upcycle.method={method!r}: choose one of {', '.join(METHODS)}")
    if granularity < 1 or n_shared < 0:
        raise ValueError(f"moe.granularity={granularity} must be >= 1 and moe.n_shared="
                         f"{n_shared} >= 0")
    layout = method if method in ("copy", "split") else ("copy" if base == "copy" else "split")
    f, g = dense_width, granularity
    if n_shared and shared == "whole":
        num, den = f, n_shared
    else:
        s = n_shared if shared == "slice" else 0
        num, den = (g * f, 1 + s * g) if layout == "copy" else (f, 1 + s)
    if num % den or (num // den) % g:
        raise ValueError(
            f"upcycle: no moe.d_expert fits {method} ({layout} layout) exactly: the dense d_ff "
            f"{f} with moe.n_shared={n_shared} (upcycle.shared={shared}) and moe.granularity={g} "
            f"would need moe.d_expert = {num}/{den}{f' as a multiple of {g}' if g > 1 else ''}; "
            "set moe.d_expert, moe.n_shared or moe.granularity")
    return num // den


def _hint(spec: UpcycleSpec, base: str, dense_width: int) -> str:
    """`` (moe.d_expert=N fits)`` for a size error, or '' when no width fits."""
    try:
        d = fitting_d_expert(dense_width, base, spec.n_shared, spec.granularity, spec.shared)
    except ValueError:
        return ""
    return (f" (moe.d_expert={d} fits, with moe.granularity={spec.granularity} and "
            f"moe.n_shared={spec.n_shared})")


def _check_sizes(spec: UpcycleSpec, base: str, pool_width: int, dense_width: int) -> int:
    """Validate sizes for ``base``; return the shard count m."""
    fe, e = spec.d_expert, spec.n_experts
    if base == "copy":
        if fe != pool_width:
            raise ValueError(
                f"upcycle: copy needs routed experts as wide as the dense FFN pool ({pool_width} = "
                f"dense d_ff {dense_width} minus the shared slice {dense_width - pool_width}); the "
                f"target has width {fe}. Set moe.d_expert/moe.granularity to match"
                f"{_hint(spec, base, dense_width)}, or use upcycle.method=split")
        return 1
    if fe > pool_width or pool_width % fe:
        raise ValueError(
            f"upcycle: split cuts the {pool_width} pool units into shards of the routed width; "
            f"{fe} does not divide {pool_width}. Choose moe.d_expert/moe.granularity so it does"
            f"{_hint(spec, base, dense_width)}")
    m = pool_width // fe
    if e % m:
        raise ValueError(f"upcycle: split into m={m} shards needs the routed expert count "
                         f"({e}) to be a multiple of m; change moe.n_experts or moe.granularity")
    return m


def _redraw(shape: torch.Size, stats: tuple[float, float], like: Tensor,
            gen: torch.Generator) -> Tensor:
    """Samples of ``shape`` from N(mean, std) in ``like``'s dtype/device."""
    mean, std = stats
    return (torch.randn(shape, generator=gen) * std + mean).to(like)


def upcycle_ffn(ffn: DenseFFN, spec: UpcycleSpec, gen: torch.Generator) -> UpcycledFFN:
    """Build one MoE layer's experts, router and shared expert from a dense FFN."""
    if spec.method not in METHODS:
        raise ValueError(f"upcycle.method={spec.method!r}: choose one of {', '.join(METHODS)}")
    if spec.shared not in SHARED_INITS:
        raise ValueError(f"upcycle.shared={spec.shared!r}: choose one of {', '.join(SHARED_INITS)}")
    if spec.base not in BASES:
        raise ValueError(f"upcycle.base={spec.base!r}: choose one of {', '.join(BASES)}")
    f = ffn.width
    order = torch.randperm(f, generator=gen) if spec.permute else torch.arange(f)
    ffn = ffn.units(order.to(ffn.gate.device))
    shared_in = shared_out = None
    pool = ffn
    if spec.d_shared:
        if spec.shared == "slice":
            if spec.d_shared >= f:
                raise ValueError(f"upcycle.shared=slice: the shared width {spec.d_shared} leaves "
                                 f"no units of the dense d_ff {f} for routed experts; use "
                                 "upcycle.shared=whole or fewer moe.n_shared")
            head = ffn.units(torch.arange(spec.d_shared))
            pool = ffn.units(torch.arange(spec.d_shared, f))
            shared_in, shared_out = torch.cat([head.gate, head.up], 0), head.down
        elif spec.shared == "whole":
            if spec.d_shared != f:
                raise ValueError(f"upcycle.shared=whole copies the dense FFN, so the shared width "
                                 f"(moe.n_shared x moe.d_expert = {spec.d_shared}) must equal "
                                 f"model.d_ff={f}")
            shared_in, shared_out = torch.cat([ffn.gate, ffn.up], 0), ffn.down
    base = _choose_base(spec, pool.width)
    m = _check_sizes(spec, base, pool.width, f)
    w_in, w_out = _stack(pool, spec.n_experts // m, spec.d_expert, float(m))
    d = ffn.gate.shape[1]
    rows = torch.randn(spec.n_experts // m, d, generator=gen) * spec.router_std  # [E/m, D]
    router = rows.repeat_interleave(m, 0).to(w_in)  # [E, D]: shards of a replica share a row
    if spec.method == "drop":
        w_in, w_out = _drop(w_in, w_out, spec.drop_ratio, gen)
    elif spec.method == "noise":
        w_in = w_in + torch.randn(w_in.shape, generator=gen).to(w_in) * spec.noise_std * w_in.std()
        w_out = w_out + torch.randn(w_out.shape, generator=gen).to(w_out) * spec.noise_std * w_out.std()
    return UpcycledFFN(w_in, w_out, router, shared_in, shared_out, base, m)


def _drop(w_in: Tensor, w_out: Tensor, ratio: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Re-draw ``ratio`` of each expert's units from the statistics of the originals."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"upcycle.drop_ratio must be in [0, 1], got {ratio}")
    e, d, f2 = w_in.shape
    fe = f2 // 2
    n_drop = int(round(ratio * fe))

    def stats(t: Tensor) -> tuple[float, float]:
        return float(t.float().mean()), float(t.float().std())

    s_gate, s_up, s_down = stats(w_in[..., :fe]), stats(w_in[..., fe:]), stats(w_out)
    w_in, w_out = w_in.clone(), w_out.clone()
    for i in range(e):
        idx = torch.randperm(fe, generator=gen)[:n_drop].to(w_in.device)
        w_in[i][:, idx] = _redraw((d, n_drop), s_gate, w_in, gen)
        w_in[i][:, fe + idx] = _redraw((d, n_drop), s_up, w_in, gen)
        w_out[i][idx] = _redraw((n_drop, w_out.shape[2]), s_down, w_out, gen)
    return w_in, w_out


def preserves_function(spec: UpcycleSpec, gate: str, renormalize: bool, routed_scaling: float,
                       capacity_factor: Optional[float], dense_width: int) -> tuple[bool, str]:
    """Whether the upcycled layer equals the dense FFN at step 0, and why not if not.
    ``renormalize``: whether the gate normalises the k kept weights to sum 1
    (``routing.router.normalizes_weights``: false for softmax without renormalisation and
    for any gate at k=1 with ``routing.normalize_top1=false``)."""
    if spec.method not in ("copy", "split"):
        return False, f"{spec.method} perturbs the copied weights on purpose"
    if gate == "expert_choice":
        return False, "expert-choice routing gives tokens a variable number of experts"
    if not renormalize:
        return False, (f"{gate} weights that are not renormalised weight experts by less than 1")
    if routed_scaling != 1.0:
        return False, f"routing.routed_scaling={routed_scaling} scales the routed output"
    if capacity_factor is not None:
        return False, "capacity dropping removes some tokens' experts"
    if spec.d_shared and spec.shared != "slice":
        return False, f"shared experts initialised as '{spec.shared}' add to the routed copy"
    pool = dense_width - (spec.d_shared if spec.d_shared else 0)
    m = pool // spec.d_expert if spec.d_expert else 1
    if spec.method == "split" and spec.top_k % m:
        return False, f"top-k {spec.top_k} is not a multiple of the {m} shards per replica"
    return True, "copy/split with weights summing to 1"
