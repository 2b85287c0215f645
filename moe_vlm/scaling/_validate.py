"""Input checks shared by the fits: refuse data a law cannot be fitted to, and say why."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np
from numpy.typing import ArrayLike

Holdout = Union[None, float, ArrayLike]

# Minimum distinct values per input for each law's parameters to be identifiable.
# Chinchilla: a power law needs two distinct x to separate it from a constant.
# Krajewski: with two granularities, (a, g, gamma) map to two N-coefficients only.
# Clark: per model size the E-dependence is offset + slope * log E_hat(E; E_start, E_max);
# three distinct E (and two N, shared shape) pin it down.
MIN_DISTINCT: dict[str, dict[str, int]] = {
    "chinchilla": {"N": 2, "D": 2},
    "krajewski": {"N": 2, "D": 2, "G": 3},
    "clark": {"N": 2, "E": 3},
}

_WHY = {
    "N": "the parameter-count term (its coefficient and exponent) is unidentifiable; vary the model size",
    "D": "the data term (its coefficient and exponent) is unidentifiable; vary the token count",
    "G": "g and gamma are unidentifiable without at least 3 granularities; use fit_chinchilla",
    "E": "the expert terms (b, c, E_start, E_max) are unidentifiable without at least 3 expert counts",
}


def as_columns(law: str, cols: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """Each input as a finite, positive 1-D float array of one common length.

    Raises ValueError naming the input and the first offending index."""
    out: dict[str, np.ndarray] = {}
    for name, x in cols.items():
        try:
            a = np.asarray(x, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{law}: {name} must be numeric") from None
        if a.ndim != 1:
            raise ValueError(f"{law}: {name} must be a 1-D array (one value per run), got shape {a.shape}")
        out[name] = a
    lengths = {k: v.size for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{law}: mismatched lengths: " + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
    for name, a in out.items():
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(f"{law}: {name} has {bad.size} non-finite value(s) (NaN/inf), first at index {bad[0]}")
        if name == "E":
            low = np.flatnonzero(a < 1)
            if low.size:
                raise ValueError(f"{law}: E counts routed experts and must be >= 1 (E = 1 is a dense "
                                 f"model); index {low[0]} is {a[low[0]]:g}")
        bad = np.flatnonzero(a <= 0)
        if bad.size:
            raise ValueError(f"{law}: {name} must be > 0; index {bad[0]} is {a[bad[0]]:g}")
    return out


def check_identifiable(law: str, n_params: int, cols: Mapping[str, np.ndarray]) -> None:
    """Enough points for the parameters and enough distinct values per input."""
    n = next(iter(cols.values())).size
    if n < n_params + 1:
        raise ValueError(f"{law}: the law has {n_params} parameters, so a fit needs at least "
                         f"{n_params + 1} points; got {n}")
    for name, k in MIN_DISTINCT[law].items():
        distinct = np.unique(cols[name])
        if distinct.size < k:
            what = (f"all {name} are identical ({distinct[0]:g})" if distinct.size == 1
                    else f"{name} takes only {distinct.size} distinct values")
            raise ValueError(f"{law}: {what}: {_WHY[name]}")


def holdout_mask(holdout: Holdout, n: int, rng: np.random.Generator) -> Optional[np.ndarray]:
    """``[n]`` bool, True = held out: None, a fraction in (0, 1) drawn at random, or a mask."""
    if holdout is None:
        return None
    if np.isscalar(holdout) and not isinstance(holdout, (bool, np.bool_)):
        frac = float(holdout)
        if not 0 < frac < 1:
            raise ValueError(f"holdout fraction must be in (0, 1), got {frac}")
        k = max(1, int(round(frac * n)))
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=k, replace=False)] = True
        return mask
    mask = np.asarray(holdout)
    if mask.dtype != bool or mask.shape != (n,):
        raise ValueError(f"holdout must be None, a fraction in (0, 1), or a bool mask of shape ({n},); "
                         f"got dtype {mask.dtype}, shape {mask.shape}")
    if not mask.any():
        raise ValueError("holdout mask holds out no point")
    return mask.copy()
