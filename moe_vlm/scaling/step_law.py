"""Hyperparameter scaling law: the optimal learning rate and batch size as power laws of
model size N and training tokens D ("Predictable Scale: Part I", Li et al. 2025,
arXiv:2503.04715, the Step Law).

Method, as the paper fits it:

1. Group the runs by (N, D). In each group keep the runs whose loss is within
   ``threshold`` (0.25%) of the group's best: the loss surface is flat near its minimum,
   so every run in that basin is an equally good "optimal" configuration, and averaging
   over them is less noisy than taking the single argmin.
2. Least squares in log space over the kept runs:
   ``log lr* = a + b log N + c log D`` and ``log bs* = d + e log D`` (bs in tokens per
   batch; the paper finds no dependence of bs* on N).
3. Bootstrap: resample the kept runs with replacement, refit, take percentile intervals.

``params``: ``lr_scale`` (e^a), ``lr_N`` (b), ``lr_D`` (c), ``bs_scale`` (e^d), ``bs_D`` (e),
so ``lr* = lr_scale * N**lr_N * D**lr_D`` and ``bs* = bs_scale * D**bs_D``. The paper's law
(the mean of its bootstrap fits) is ``lr* = 1.79 N^-0.713 D^0.307``, ``bs* = 0.58 D^0.571``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:  # pandas is imported when a table is fitted, not with moe_vlm.scaling
    import pandas as pd

STEP_LAW_COLUMNS = ("N", "D", "lr", "bs", "loss")
PARAMS = ("lr_scale", "lr_N", "lr_D", "bs_scale", "bs_D")
LI_2025 = {"lr_scale": 1.79, "lr_N": -0.713, "lr_D": 0.307, "bs_scale": 0.58, "bs_D": 0.571}
"""The paper's published law (mean of its 1,000 bootstrap fits)."""


@dataclass(frozen=True, eq=False)
class StepLawFit:
    """A fitted Step Law. ``params`` from the least-squares fit on all kept runs, ``ci``
    the bootstrap percentile interval of each at ``ci_level``, ``bootstrap_mean`` the mean
    of the replicates (what the paper reports; scales as exp of the mean intercept).
    ``kept`` is the table of near-optimal runs the fit used (with ``group_best`` and
    ``rel_gap`` columns)."""

    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    ci_level: float
    bootstrap_mean: dict[str, float]
    threshold: float
    n_runs: int
    n_groups: int
    n_kept: int
    n_bootstrap: int
    rmse_log_lr: float
    rmse_log_bs: float
    seed: int
    kept: pd.DataFrame = field(repr=False)
    bootstrap: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def lr(self, N: Any, D: Any) -> np.ndarray:
        """Predicted optimal learning rate at model size ``N`` and tokens ``D``."""
        p = self.params
        return p["lr_scale"] * np.asarray(N, float) ** p["lr_N"] * np.asarray(D, float) ** p["lr_D"]

    def bs(self, D: Any) -> np.ndarray:
        """Predicted optimal batch size (tokens per batch) at tokens ``D``."""
        return self.params["bs_scale"] * np.asarray(D, float) ** self.params["bs_D"]

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> Optional[float]:
            return float(x) if math.isfinite(x) else None
        return {"law": "steplaw", "params": {k: num(v) for k, v in self.params.items()},
                "ci": {k: [num(lo), num(hi)] for k, (lo, hi) in self.ci.items()},
                "ci_level": self.ci_level,
                "bootstrap_mean": {k: num(v) for k, v in self.bootstrap_mean.items()},
                "threshold": self.threshold, "n_runs": self.n_runs, "n_groups": self.n_groups,
                "n_kept": self.n_kept, "n_bootstrap": self.n_bootstrap,
                "rmse_log_lr": num(self.rmse_log_lr), "rmse_log_bs": num(self.rmse_log_bs),
                "seed": self.seed, "published": dict(LI_2025)}

    def summary(self) -> str:
        pct = f"{100 * self.ci_level:g}%"
        lines = [f"steplaw fit on {self.n_kept} near-optimal runs (loss within "
                 f"{100 * self.threshold:g}% of their (N, D) group's best) of {self.n_runs} runs "
                 f"in {self.n_groups} groups ({self.n_bootstrap} bootstrap replicates, {pct} CI)",
                 f"{'param':>9}  {'estimate':>10}  {'ci low':>10}  {'ci high':>10}  {'Li 2025':>8}"]
        for k in PARAMS:
            lo, hi = self.ci.get(k, (math.nan, math.nan))
            lines.append(f"{k:>9}  {self.params[k]:10.4g}  {lo:10.4g}  {hi:10.4g}  {LI_2025[k]:8.4g}")
        lines.append(f"lr* = {self.params['lr_scale']:.3g} N^{self.params['lr_N']:.3f} "
                     f"D^{self.params['lr_D']:.3f}   bs* = {self.params['bs_scale']:.3g} "
                     f"D^{self.params['bs_D']:.3f}   rmse(log lr) {self.rmse_log_lr:.3g}, "
                     f"rmse(log bs) {self.rmse_log_bs:.3g}")
        return "\n".join(lines)


def _check_table(table: pd.DataFrame) -> pd.DataFrame:
    """The five columns as finite floats (lr, bs, N, D > 0); ValueError naming the problem."""
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"steplaw: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in STEP_LAW_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"steplaw: the table needs columns {list(STEP_LAW_COLUMNS)}; missing "
                         f"{missing} (bs is tokens per batch)")
    out = pd.DataFrame({c: pd.to_numeric(table[c], errors="coerce") for c in STEP_LAW_COLUMNS})
    for c in STEP_LAW_COLUMNS:
        bad = np.flatnonzero(~np.isfinite(out[c].to_numpy(float)))
        if bad.size:
            raise ValueError(f"steplaw: column {c!r} has {bad.size} missing, non-numeric or "
                             f"non-finite value(s), first at row {bad[0]}")
        if c != "loss" and (out[c] <= 0).any():
            raise ValueError(f"steplaw: column {c!r} must be > 0 (it is fitted in log space); "
                             f"row {int(np.flatnonzero(out[c].to_numpy() <= 0)[0])} is not")
    return out


def near_optimal(table: pd.DataFrame, threshold: float = 0.0025) -> pd.DataFrame:
    """The runs within ``threshold`` (relative) of their (N, D) group's lowest loss, with
    ``group_best`` and ``rel_gap`` (loss / best - 1) added."""
    return _near_optimal(_check_table(table), threshold)


def _near_optimal(t: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """``near_optimal`` on an already checked table."""
    best = t.groupby(["N", "D"])["loss"].transform("min")
    t = t.assign(group_best=best, rel_gap=t["loss"] / best - 1)
    return t[t["rel_gap"].abs() <= threshold].reset_index(drop=True)


def _solve(logN: np.ndarray, logD: np.ndarray, loglr: np.ndarray, logbs: np.ndarray
           ) -> Optional[np.ndarray]:
    """(a, b, c, d, e) by least squares, or None when the design is rank-deficient."""
    x_lr = np.column_stack([np.ones_like(logN), logN, logD])
    x_bs = np.column_stack([np.ones_like(logD), logD])
    if np.linalg.matrix_rank(x_lr) < 3 or np.linalg.matrix_rank(x_bs) < 2:
        return None
    abc = np.linalg.lstsq(x_lr, loglr, rcond=None)[0]
    de = np.linalg.lstsq(x_bs, logbs, rcond=None)[0]
    return np.concatenate([abc, de])


def _as_params(v: np.ndarray) -> dict[str, float]:
    a, b, c, d, e = (float(x) for x in v)
    with np.errstate(over="ignore"):  # a near-degenerate resample: inf, not an exception
        return {"lr_scale": float(np.exp(a)), "lr_N": b, "lr_D": c, "bs_scale": float(np.exp(d)),
                "bs_D": e}


def fit_step_law(table: pd.DataFrame, *, threshold: float = 0.0025, n_bootstrap: int = 1000,
                 ci: float = 0.95, seed: int = 0) -> StepLawFit:
    """Fit ``lr* = lr_scale N^lr_N D^lr_D`` and ``bs* = bs_scale D^bs_D`` to a table with
    columns ``N``, ``D``, ``lr``, ``bs`` (tokens per batch) and ``loss``, one row per run
    (see the module docstring for the method). Needs near-optimal runs at three or more
    (N, D) points that are not all on one line in (log N, log D), and two or more D."""
    if not 0 < threshold < 1:
        raise ValueError(f"steplaw: threshold must be in (0, 1), got {threshold}")
    if not 0 < ci < 1:
        raise ValueError(f"steplaw: ci must be in (0, 1), got {ci}")
    if n_bootstrap < 0:
        raise ValueError(f"steplaw: n_bootstrap must be >= 0, got {n_bootstrap}")
    t = _check_table(table)
    kept = _near_optimal(t, threshold)
    logs = [np.log(kept[c].to_numpy(float)) for c in ("N", "D", "lr", "bs")]
    v = _solve(*logs)
    if v is None:
        raise ValueError(
            f"steplaw: the {len(kept)} near-optimal runs span too few (N, D) points to fit "
            "lr* against log N and log D (need 3 not on one line) and bs* against log D "
            "(need 2 distinct D); add model sizes or token budgets")
    logN, logD, loglr, logbs = logs
    for name, x in (("N", logN), ("D", logD)):
        if np.ptp(x) < math.log(1.5):  # a fit can only be as good as the spread it sees
            warnings.warn(f"steplaw: {name} spans only a factor {math.exp(np.ptp(x)):.4g} among "
                          f"the near-optimal runs; the exponents on {name} are poorly identified "
                          "(see their CIs)", stacklevel=2)
    rmse_lr = float(np.sqrt(np.mean((loglr - (v[0] + v[1] * logN + v[2] * logD)) ** 2)))
    rmse_bs = float(np.sqrt(np.mean((logbs - (v[3] + v[4] * logD)) ** 2)))
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_bootstrap):
        i = rng.integers(0, len(kept), len(kept))
        r = _solve(*(x[i] for x in logs))
        if r is not None:  # a resample on too few (N, D) points identifies nothing
            reps.append(r)
    raw = np.array(reps).reshape(-1, 5)  # [replicates, (a, b, c, d, e)], scales as logs
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    intervals, means, boot = {}, {}, {}
    with np.errstate(over="ignore"):  # a near-degenerate resample may give an inf scale
        for j, k in enumerate(PARAMS):
            col, to = raw[:, j], (np.exp if k.endswith("_scale") else (lambda x: x))
            boot[k] = to(col)
            intervals[k] = ((float(to(np.percentile(col, lo_q))), float(to(np.percentile(col, hi_q))))
                            if col.size else (math.nan, math.nan))
            means[k] = float(to(col.mean())) if col.size else math.nan  # scales: exp(mean log)
    return StepLawFit(
        params=_as_params(v), ci=intervals, ci_level=ci,
        bootstrap_mean=means,
        threshold=threshold, n_runs=len(t), n_groups=int(t.groupby(["N", "D"]).ngroups),
        n_kept=len(kept), n_bootstrap=len(raw), rmse_log_lr=rmse_lr, rmse_log_bs=rmse_bs,
        seed=seed, kept=kept, bootstrap=boot)
