"""``FitResult``: what a scaling-law fit returns (parameters, bootstrap CIs, fit quality)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike

from moe_vlm.scaling.laws import LAW_INPUTS, LAWS


def _json_float(x: float) -> Optional[float]:
    """JSON has no NaN/inf: map them to null."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True, eq=False)
class FitResult:
    """One fitted law.

    ``params`` are in the law's own form (see :mod:`moe_vlm.scaling.laws`), ``ci`` the
    bootstrap percentile interval of each at ``ci_level`` ((nan, nan) without a
    bootstrap). ``residuals`` are ``log L_observed - log L_predicted`` on the ``n_points``
    points the fit used; ``rmse`` is their root mean square and ``huber_loss`` their mean
    Huber_delta loss (the quantity the fit minimises, up to the sum). ``held_out_error``
    is the root-mean-square log residual on the held-out points (None if none were held
    out). ``bootstrap`` holds each parameter's replicate values ``[n_bootstrap]`` (for
    derived quantities such as a CI on the compute-optimal N; not in :meth:`to_dict`);
    ``bootstrap_converged`` counts the replicates whose refit met a convergence test
    within its iteration cap. ``n_at_best`` of the ``n_inits`` starts reached the best
    optimum (objective within 1e-4 relative of the best start's, before polishing): few
    means a rugged objective.
    """

    law: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    ci_level: float
    residuals: np.ndarray = field(repr=False)
    rmse: float
    huber_loss: float
    held_out_error: Optional[float]
    n_points: int
    n_bootstrap: int
    delta: float
    objective: float
    n_inits: int
    n_at_best: int
    converged: bool
    message: str = field(repr=False)
    seed: int = field(repr=False)
    n_held_out: int = 0
    holdout_mask: Optional[np.ndarray] = field(default=None, repr=False)
    bootstrap: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    bootstrap_converged: int = 0

    @property
    def inputs(self) -> tuple[str, ...]:
        """The positional inputs :meth:`predict` takes, e.g. ``("N", "D")``."""
        return LAW_INPUTS[self.law]

    def predict(self, *args: ArrayLike, **kwargs: ArrayLike) -> np.ndarray:
        """Predicted loss at new points: ``predict(N, D)`` (Chinchilla), ``predict(N, D, G)``
        (Krajewski) or ``predict(N, E)`` (Clark); inputs broadcast (numpy rules)."""
        names = self.inputs
        if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
            raise TypeError(f"{self.law} predict takes {', '.join(names)}; "
                            f"got {len(args)} positional and {sorted(kwargs)}")
        values = dict(zip(names, args), **kwargs)
        missing = [k for k in names if k not in values]
        if missing:
            raise TypeError(f"{self.law} predict is missing {missing}")
        return LAWS[self.law](*(values[k] for k in names), **self.params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (NaN/inf become null; arrays become lists)."""
        return {
            "law": self.law,
            "params": {k: _json_float(v) for k, v in self.params.items()},
            "ci": {k: [_json_float(lo), _json_float(hi)] for k, (lo, hi) in self.ci.items()},
            "ci_level": self.ci_level,
            "rmse": _json_float(self.rmse),
            "huber_loss": _json_float(self.huber_loss),
            "held_out_error": None if self.held_out_error is None else _json_float(self.held_out_error),
            "n_points": self.n_points,
            "n_held_out": self.n_held_out,
            "n_bootstrap": self.n_bootstrap,
            "bootstrap_converged": self.bootstrap_converged,
            "delta": self.delta,
            "objective": _json_float(self.objective),
            "n_inits": self.n_inits,
            "n_at_best": self.n_at_best,
            "converged": self.converged,
            "message": self.message,
            "seed": self.seed,
            "residuals": [_json_float(r) for r in self.residuals],
        }

    def summary(self) -> str:
        """A small text table: each parameter with its CI, then the fit quality."""
        pct = f"{100 * self.ci_level:g}%"
        lines = [f"{self.law} fit on {self.n_points} points "
                 f"({self.n_bootstrap} bootstrap replicates, {pct} percentile CI)",
                 f"{'param':>8}  {'estimate':>12}  {'ci low':>12}  {'ci high':>12}"]
        for k, v in self.params.items():
            lo, hi = self.ci.get(k, (math.nan, math.nan))
            lines.append(f"{k:>8}  {v:12.5g}  {lo:12.5g}  {hi:12.5g}")
        lines.append(f"rmse(log L) {self.rmse:.4g}   mean Huber(delta={self.delta:g}) {self.huber_loss:.4g}"
                     + ("" if self.held_out_error is None
                        else f"   held-out rmse(log L) {self.held_out_error:.4g} ({self.n_held_out} points)"))
        lines.append(f"{self.n_at_best}/{self.n_inits} initialisations reached the best optimum; "
                     f"converged: {self.converged}"
                     + (f"; {self.bootstrap_converged}/{self.n_bootstrap} bootstrap refits converged"
                        if self.n_bootstrap else ""))
        return "\n".join(lines)
