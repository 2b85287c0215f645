"""Fit scaling laws the way Hoffmann et al. (2022) and Besiroglu et al. (2024) fit Chinchilla's.

Method (Besiroglu, Erdil, Barnett, You 2024, arXiv:2404.10102, replicating Hoffmann et
al.'s Approach 3): minimise ``sum_i Huber_delta(log L_pred_i - log L_i)`` with
``delta = 1e-3`` (log-space residuals, so every point counts by its relative error and the
few outliers pull little), run L-BFGS from every point of a grid of initialisations, and
keep the best. Positive parameters are optimised as logs. Uncertainty comes from a
bootstrap: resample the points with replacement, refit, take percentiles.

Each bootstrap refit starts from the best full-data fit rather than from the whole grid:
a resample is a small perturbation of the data, so its optimum lies in the same basin;
re-running the grid per replicate would cost ``len(grid)`` times more; and a replicate that
hopped to a distant local optimum would widen the interval with optimiser noise rather
than sampling noise.

``fit_krajewski`` and ``fit_clark`` use the same loss and bootstrap; their grids cover
the exponents (Krajewski) or the expert-saturation constants (Clark), with the
remaining, linear coefficients solved by least squares for each grid point.

All fits run on CPU in seconds (see :mod:`moe_vlm.scaling._optim`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

from moe_vlm.scaling._models import ChinchillaModel, ClarkModel, KrajewskiModel
from moe_vlm.scaling._optim import LogModel, ObjFn, huber, huber_objective, lbfgs_batch, polish
from moe_vlm.scaling._validate import Holdout, as_columns, check_identifiable, holdout_mask
from moe_vlm.scaling.laws import LAWS
from moe_vlm.scaling.result import FitResult

Grid = Mapping[str, Sequence[float]]

CHINCHILLA_GRID: dict[str, tuple[float, ...]] = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
"""Besiroglu et al.'s initialisation grid (4,500 starts): ``A = exp(a)``, ``B = exp(b)``, ``E = exp(e)``."""

KRAJEWSKI_GRID: dict[str, tuple[float, ...]] = {
    "alpha": (0.05, 0.1, 0.2, 0.35, 0.5, 0.75),
    "beta": (0.05, 0.1, 0.2, 0.35, 0.5, 0.75),
    "gamma": (0.1, 0.3, 0.6, 1.0),
}
"""Exponent grid for :func:`fit_krajewski` (144 starts; c, a, g, b by NNLS per start)."""

CLARK_GRID: dict[str, tuple[float, ...]] = {
    "e_start": (1.1, 1.5, 2.0, 3.0, 5.0, 10.0),
    "e_max": (8.0, 32.0, 128.0, 512.0, 2048.0, 1e4),
}
"""Saturation grid for :func:`fit_clark` (pairs with ``e_start < e_max``; a, b, c, d by least squares)."""

GRID_STOP: dict[str, tuple[float, int]] = {
    # law: (relative decrease per step below which a start stops, iteration cap per start).
    # Chinchilla's 4,500 starts stop like scipy's L-BFGS-B defaults do (~2e-6 here), as in
    # Besiroglu et al.; ~99% stop before the cap, the rest grind on Huber kinks near an
    # optimum, and the best few are polished anyway. The small informed grids of the
    # other laws are cheap enough to run to tight convergence.
    "chinchilla": (1e-6, 200),
    "krajewski": (1e-10, 1000),
    "clark": (1e-10, 1000),
}
BOOT_FTOL = 1e-10     # bootstrap replicates start at the optimum: run them tight ...
BOOT_MAX_ITER = 500   # ... but bounded (FitResult.bootstrap_converged counts those that stopped on their own)
N_POLISH = 5          # distinct best grid optima refined with scipy's L-BFGS-B
BEST_RTOL = 1e-4      # a start "reached the best optimum" if its objective is this close to the best start's


def _best_of_grid(fg: ObjFn, x0: np.ndarray, law: str) -> tuple[np.ndarray, float, bool, str, int]:
    """Batched L-BFGS from every start ``x0 [K, p]``; the ``N_POLISH`` best distinct end
    points are polished with scipy and the lowest wins. Returns ``(theta [p], objective,
    converged, message, n_at_best)``."""
    ftol, max_iter = GRID_STOP[law]
    batch = lbfgs_batch(fg, x0, ftol=ftol, max_iter=max_iter)
    f = np.where(np.isfinite(batch.f), batch.f, np.inf)          # [K]
    if not np.isfinite(f).any():
        raise ValueError(f"{law}: no initialisation gave a finite objective; check the data scale")
    picked: list[int] = []
    for i in np.argsort(f):
        if not np.isfinite(f[i]) or len(picked) == N_POLISH:
            break
        if all(np.abs(batch.x[i] - batch.x[j]).max() > 1e-6 * (1 + np.abs(batch.x[j]).max()) for j in picked):
            picked.append(int(i))
    theta, obj, converged, message = min((polish(fg, batch.x[i]) for i in picked), key=lambda r: r[1])
    n_at_best = int((f <= f.min() + BEST_RTOL * abs(f.min())).sum())   # agreement among the starts
    return theta, obj, converged, message, n_at_best


def _bootstrap(model: LogModel, y: np.ndarray, theta: np.ndarray, delta: float, n_bootstrap: int,
               ci: float, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, tuple], int]:
    """Refit ``n_bootstrap`` resamples (as multinomial point weights ``[B, n]``) from the
    full-data optimum ``theta``; returns per-parameter replicate values, percentile
    intervals at level ``ci``, and how many refits converged."""
    n = y.size
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(float)     # [B, n]
    boot = lbfgs_batch(huber_objective(model, y, W, delta), np.tile(theta, (n_bootstrap, 1)),
                       ftol=BOOT_FTOL, max_iter=BOOT_MAX_ITER)
    ok = np.isfinite(boot.f)
    samples = {k: v[ok] for k, v in model.to_params(boot.x).items()}                # each [<= B]
    q = 100 * np.array([(1 - ci) / 2, (1 + ci) / 2])
    intervals = {k: tuple(float(x) for x in np.percentile(v, q)) if v.size else (float("nan"), float("nan"))
                 for k, v in samples.items()}
    return samples, intervals, int((boot.converged & ok).sum())


def _fit(model_cls: type, law: str, cols: Mapping[str, ArrayLike], loss: ArrayLike, *,
         delta: float, n_bootstrap: int, ci: float, holdout: Holdout, seed: int,
         grid: Grid) -> FitResult:
    """Shared driver: validate, hold out, grid + batched L-BFGS, polish, bootstrap, score."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if not 0 < ci < 1:
        raise ValueError(f"ci is a level in (0, 1), e.g. 0.95; got {ci}")
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap}")
    n_bootstrap = int(n_bootstrap)
    data = as_columns(law, {**cols, "loss": loss})               # each [n_all]
    n_params = model_cls.n_params
    check_identifiable(law, n_params, data)
    rng = np.random.default_rng(seed)                            # hold-out draw first, then bootstrap
    held = holdout_mask(holdout, data["loss"].size, rng)
    train = {k: (v if held is None else v[~held]) for k, v in data.items()}
    try:
        check_identifiable(law, n_params, train)
    except ValueError as e:
        raise ValueError(f"after holding out {int(held.sum())} point(s): {e}") from None

    inputs = [k for k in train if k != "loss"]
    model = model_cls(*(train[k] for k in inputs))
    y = np.log(train["loss"])                                    # [n]
    fg = huber_objective(model, y, np.ones((1, y.size)), delta)
    x0 = model.inits(grid, y)                                    # [K, p]
    theta, obj, converged, message, n_at_best = _best_of_grid(fg, x0, law)
    residuals = y - model.forward(theta[None])[0][0]             # [n] log obs - log pred
    params = {k: float(v[0]) for k, v in model.to_params(theta).items()}

    samples: dict[str, np.ndarray] = {}
    intervals = {k: (float("nan"), float("nan")) for k in params}
    boot_converged = 0
    if n_bootstrap > 0:
        samples, intervals, boot_converged = _bootstrap(model, y, theta, delta, n_bootstrap, ci, rng)

    held_err = None
    if held is not None:
        out = {k: v[held] for k, v in data.items()}
        pred_out = LAWS[law](*(out[k] for k in inputs), **params)
        held_err = float(np.sqrt(np.mean((np.log(out["loss"]) - np.log(pred_out)) ** 2)))

    return FitResult(
        law=law, params=params, ci=intervals, ci_level=float(ci), residuals=residuals,
        rmse=float(np.sqrt(np.mean(residuals ** 2))), huber_loss=float(np.mean(huber(residuals, delta))),
        held_out_error=held_err, n_points=y.size, n_bootstrap=n_bootstrap, delta=float(delta),
        objective=float(obj), n_inits=len(x0), n_at_best=n_at_best, converged=bool(converged),
        message=message, seed=seed, n_held_out=0 if held is None else int(held.sum()),
        holdout_mask=held, bootstrap=samples, bootstrap_converged=boot_converged)


def fit_chinchilla(N: ArrayLike, D: ArrayLike, loss: ArrayLike, *, delta: float = 1e-3,
                   n_bootstrap: int = 1000, ci: float = 0.95, holdout: Holdout = None,
                   seed: int = 0, grid: Optional[Grid] = None) -> FitResult:
    """Fit ``L = E + A/N^alpha + B/D^beta`` (Hoffmann et al. 2022) as Besiroglu et al. (2024) do.

    Minimises ``sum Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L)`` from
    every start of ``grid`` (default :data:`CHINCHILLA_GRID`, their 4,500 starts; keys
    ``a, b, e, alpha, beta``), keeps the best, bootstraps ``n_bootstrap`` replicates for
    ``ci``-level percentile intervals. ``holdout``: a fraction (random, from ``seed``) or
    a bool mask of points left out of the fit and scored in ``held_out_error``.

    Args are per-run arrays ``[n]``: N parameters, D training tokens, loss (nats/token).
    Raises ValueError on inputs the law cannot be fitted to.
    """
    return _fit(ChinchillaModel, "chinchilla", {"N": N, "D": D}, loss, delta=delta,
                n_bootstrap=n_bootstrap, ci=ci, holdout=holdout, seed=seed,
                grid=CHINCHILLA_GRID if grid is None else grid)


def fit_krajewski(N: ArrayLike, D: ArrayLike, G: ArrayLike, loss: ArrayLike, *, delta: float = 1e-3,
                  n_bootstrap: int = 1000, ci: float = 0.95, holdout: Holdout = None,
                  seed: int = 0, grid: Optional[Grid] = None) -> FitResult:
    """Fit Krajewski et al. (2024)'s ``L = c + (g/G^gamma + a)/N^alpha + b/D^beta``.

    N active parameters, D tokens, G granularity (each expert 1/G of the dense FFN width;
    needs at least 3 distinct values). Same Huber-in-log-space loss and bootstrap as
    :func:`fit_chinchilla`; ``grid`` spans ``alpha, beta, gamma`` (default
    :data:`KRAJEWSKI_GRID`) and each start takes ``c, a, g, b`` from NNLS on L.
    Returns params ``c, a, b, g, alpha, beta, gamma``.
    """
    return _fit(KrajewskiModel, "krajewski", {"N": N, "D": D, "G": G}, loss, delta=delta,
                n_bootstrap=n_bootstrap, ci=ci, holdout=holdout, seed=seed,
                grid=KRAJEWSKI_GRID if grid is None else grid)


def fit_clark(N: ArrayLike, E: ArrayLike, loss: ArrayLike, *, delta: float = 1e-3,
              n_bootstrap: int = 1000, ci: float = 0.95, holdout: Holdout = None,
              seed: int = 0, grid: Optional[Grid] = None) -> FitResult:
    """Fit Clark et al. (2022)'s routed-model law
    ``log10 L = a log10 N + b log10 E_hat + c log10 N log10 E_hat + d`` with the saturating
    ``E_hat(E; e_start, e_max)`` (:func:`moe_vlm.scaling.laws.clark_e_hat`).

    N is the dense base model's (= active) parameter count, E the expert count (>= 1; 1 =
    dense; at least 3 distinct values). The fit is at a fixed token budget, as in the
    paper: D does not enter. ``grid`` spans ``e_start, e_max`` (default
    :data:`CLARK_GRID`); each start takes ``a, b, c, d`` from least squares.
    Returns params ``a, b, c, d, e_start, e_max``.
    """
    return _fit(ClarkModel, "clark", {"N": N, "E": E}, loss, delta=delta,
                n_bootstrap=n_bootstrap, ci=ci, holdout=holdout, seed=seed,
                grid=CLARK_GRID if grid is None else grid)
