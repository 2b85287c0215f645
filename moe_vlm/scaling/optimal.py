"""Compute-optimal allocation: from a fitted law (closed form) and from IsoFLOP profiles.

With training compute ``C = 6 N D`` (Kaplan et al. 2020; Hoffmann et al. 2022), the
Chinchilla law ``E + A/N^alpha + B/D^beta`` is minimised at fixed C by (Hoffmann et al.,
Approach 3)::

    N*(C) = G (C/6)^(beta/(alpha+beta)),   D*(C) = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).

:func:`isoflop_fit` is Hoffmann et al.'s Approach 2: for each compute budget fit a
parabola of loss against log N, take its vertex as N*(C), then fit power laws
``N* = k_N C^a`` and ``D* = k_D C^b`` across budgets. (The parabola is a second-order
approximation: it is exact only near the vertex, so sample each budget around its
optimum.)

Shape legend: n points, G budgets (groups of points with the same compute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
from numpy.typing import ArrayLike

from moe_vlm.scaling._validate import as_columns
from moe_vlm.scaling.laws import chinchilla_loss

ParamsLike = Union[Mapping[str, float], Any]   # a dict, or anything with ``.params`` (FitResult, PublishedFit)


class ComputeOptimal(NamedTuple):
    """``N*``, ``D*`` and the law's loss there, each shaped like the broadcast of C (and G)."""

    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray


def chinchilla_form(params: ParamsLike, G: Optional[ArrayLike] = None) -> dict[str, Any]:
    """The Chinchilla-form ``E, A, B, alpha, beta`` of a Chinchilla fit, or of a Krajewski
    fit at granularity ``G`` (``A = g/G^gamma + a``, ``E = c``, ``B = b``)."""
    p = dict(getattr(params, "params", params))
    if {"E", "A", "B", "alpha", "beta"} <= p.keys():
        return {k: p[k] for k in ("E", "A", "B", "alpha", "beta")}
    if {"c", "a", "b", "g", "alpha", "beta", "gamma"} <= p.keys():
        if G is None:
            raise ValueError("a Krajewski law needs the granularity G for compute_optimal(params, C, G=...)")
        Gv = np.asarray(G, dtype=float)
        if np.any(~np.isfinite(Gv) | (Gv <= 0)):
            raise ValueError("G must be finite and > 0")
        return {"E": p["c"], "A": p["g"] * Gv ** (-p["gamma"]) + p["a"], "B": p["b"],
                "alpha": p["alpha"], "beta": p["beta"]}
    raise ValueError(f"compute_optimal needs a law in N and D (Chinchilla: E, A, B, alpha, beta; "
                     f"or Krajewski with G); got parameters {sorted(p)} (Clark's law has no token term)")


def compute_optimal(params: ParamsLike, C: ArrayLike, *, G: Optional[ArrayLike] = None) -> ComputeOptimal:
    """Loss-minimising ``(N*, D*)`` under ``6 N D = C`` for a fitted law, and the loss there.

    ``params``: a Chinchilla parameter dict (``E, A, B, alpha, beta``), a FitResult, a
    PublishedFit, or a Krajewski fit together with ``G`` (at fixed G it is a Chinchilla law
    with ``A = g/G^gamma + a``). ``C`` (FLOPs) broadcasts against ``G``.
    """
    p = chinchilla_form(params, G)
    al, be = float(p["alpha"]), float(p["beta"])
    if not (al > 0 and be > 0):
        raise ValueError(f"alpha and beta must be > 0 for a finite optimum, got {al}, {be}")
    C = np.asarray(C, dtype=float)
    if np.any(~np.isfinite(C) | (C <= 0)):
        raise ValueError("C must be finite and > 0 (FLOPs)")
    A, B = np.asarray(p["A"], dtype=float), float(p["B"])
    g = (al * A / (be * B)) ** (1.0 / (al + be))
    n_opt = g * (C / 6.0) ** (be / (al + be))
    d_opt = (C / 6.0) / n_opt
    loss = chinchilla_loss(n_opt, d_opt, E=p["E"], A=A, B=B, alpha=al, beta=be)
    return ComputeOptimal(N=n_opt, D=d_opt, loss=loss)


@dataclass(frozen=True, eq=False)
class IsoFlopResult:
    """Per-budget parabola minima ``[G]`` and the power laws ``N* = k_N C^a``, ``D* = k_D C^b``.

    ``a``, ``b``, ``k_N``, ``k_D`` are NaN when fewer than two budgets survive. ``group``
    ``[n]`` maps each input point to its budget index (-1: dropped). ``in_range`` says
    whether the vertex lies inside the budget's sampled N range (outside = extrapolated).
    ``curvature`` is the quadratic coefficient of loss in ``ln N``.
    """

    a: float
    b: float
    k_N: float
    k_D: float
    budgets: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss_opt: np.ndarray
    n_points: np.ndarray
    curvature: np.ndarray
    in_range: np.ndarray
    group: np.ndarray = field(repr=False)
    labels: tuple = ()
    dropped: tuple[tuple[Any, str], ...] = ()

    def n_opt_at(self, C: ArrayLike) -> np.ndarray:
        """``k_N C^a``: the fitted compute-optimal parameter count at budgets C."""
        return self.k_N * np.asarray(C, dtype=float) ** self.a

    def d_opt_at(self, C: ArrayLike) -> np.ndarray:
        """``k_D C^b``: the fitted compute-optimal token count at budgets C."""
        return self.k_D * np.asarray(C, dtype=float) ** self.b

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (NaN becomes null)."""
        def num(x: float) -> Optional[float]:
            return float(x) if math.isfinite(float(x)) else None
        return {"a": num(self.a), "b": num(self.b), "k_N": num(self.k_N), "k_D": num(self.k_D),
                "budgets": [{"label": str(lab), "flops": num(c), "n_opt": num(n), "d_opt": num(d),
                             "loss_opt": num(l), "n_points": int(k), "in_range": bool(r)}
                            for lab, c, n, d, l, k, r in zip(self.labels, self.budgets, self.n_opt,
                                                             self.d_opt, self.loss_opt, self.n_points,
                                                             self.in_range)],
                "dropped": [[str(b), why] for b, why in self.dropped]}


def _group_by_tolerance(C: np.ndarray, rtol: float) -> np.ndarray:
    """Group ids ``[n]``: sorted by C, a new group starts when C exceeds the current
    group's smallest member by more than a factor ``1 + rtol`` (no chaining)."""
    order = np.argsort(C)
    ids = np.empty(C.size, dtype=int)
    gid, start = -1, -np.inf
    for i in order:
        if C[i] > start * (1 + rtol):
            gid, start = gid + 1, C[i]
        ids[i] = gid
    return ids


def isoflop_fit(N: ArrayLike, D: ArrayLike, loss: ArrayLike, flops: Optional[ArrayLike] = None, *,
                budgets: Optional[Sequence[Any]] = None, rtol: float = 0.05, min_points: int = 3,
                drop_invalid: bool = False) -> IsoFlopResult:
    """Hoffmann et al.'s Approach 2 on points ``[n]`` (N params, D tokens, final loss).

    Budgets: ``budgets`` labels one per point if given; otherwise points are grouped by
    compute ``flops`` (default ``6 N D``) within a relative tolerance ``rtol``. Each
    budget needs ``min_points`` (>= 3) distinct N and a convex parabola; otherwise this
    raises ValueError naming the budget, or with ``drop_invalid=True`` skips it (listed
    in ``dropped``). Exponents need at least two budgets (else NaN).
    """
    if min_points < 3:
        raise ValueError("a parabola needs min_points >= 3")
    cols = as_columns("isoflop_fit", {"N": N, "D": D, "loss": loss,
                                      **({} if flops is None else {"flops": flops})})
    Nv, Dv, Lv = cols["N"], cols["D"], cols["loss"]
    C = cols.get("flops", 6.0 * Nv * Dv)                      # [n]
    if budgets is not None:
        lab = np.asarray(budgets, dtype=object)
        if lab.shape != Nv.shape:
            raise ValueError(f"budgets must give one label per point ({Nv.size}), got shape {lab.shape}")
        uniq = list(dict.fromkeys(lab.tolist()))
        ids = np.array([uniq.index(x) for x in lab.tolist()])
        order = sorted(range(len(uniq)), key=lambda g: float(np.exp(np.log(C[ids == g]).mean())))
        remap = np.empty(len(uniq), dtype=int)
        remap[order] = np.arange(len(uniq))
        ids, uniq = remap[ids], [uniq[g] for g in order]
    else:
        if not rtol >= 0:
            raise ValueError(f"rtol must be >= 0, got {rtol}")
        ids = _group_by_tolerance(C, rtol)
        uniq = [None] * (ids.max() + 1)

    rows: list[tuple] = []
    dropped: list[tuple[Any, str]] = []
    group = np.full(Nv.size, -1)
    for g in range(len(uniq)):
        m = ids == g
        c_g = float(np.exp(np.log(C[m]).mean()))              # geometric mean budget
        label = uniq[g] if uniq[g] is not None else f"{c_g:.3g}"
        x, l = np.log(Nv[m]), Lv[m]
        why = None
        if np.unique(x).size < min_points:
            why = (f"budget {label} (C={c_g:.3g} FLOPs) has {np.unique(x).size} distinct model "
                   f"size(s); a parabola fit needs at least {min_points}")
        else:
            q2, q1, q0 = np.polyfit(x, l, 2)
            if not q2 > 0:
                why = (f"budget {label} (C={c_g:.3g} FLOPs): loss against log N is not convex "
                       f"(curvature {q2:.3g}), so it has no minimum; sample model sizes around the optimum")
        if why is not None:
            if not drop_invalid:
                raise ValueError(f"isoflop_fit: {why}")
            dropped.append((label, why))
            continue
        xv = -q1 / (2 * q2)
        group[m] = len(rows)
        rows.append((label, c_g, math.exp(xv), c_g / (6 * math.exp(xv)), q0 - q1 * q1 / (4 * q2),
                     int(m.sum()), q2, bool(x.min() <= xv <= x.max())))
    if not rows:
        raise ValueError("isoflop_fit: no budget could be fitted: " + "; ".join(w for _, w in dropped))
    labels, cb, n_opt, d_opt, l_opt, npts, curv, inr = (np.array(v) for v in zip(*rows))
    a = b = k_n = k_d = float("nan")
    if len(rows) >= 2:
        a, ln_kn = np.polyfit(np.log(cb), np.log(n_opt), 1)
        b, ln_kd = np.polyfit(np.log(cb), np.log(d_opt), 1)
        k_n, k_d = math.exp(ln_kn), math.exp(ln_kd)
    return IsoFlopResult(a=float(a), b=float(b), k_N=float(k_n), k_D=float(k_d), budgets=cb.astype(float),
                         n_opt=n_opt.astype(float), d_opt=d_opt.astype(float), loss_opt=l_opt.astype(float),
                         n_points=npts.astype(int), curvature=curv.astype(float), in_range=inr.astype(bool),
                         group=group, labels=tuple(labels.tolist()), dropped=tuple(dropped))
