"""Fits: recovery of known parameters, bootstrap CIs that cover the truth and are narrow
enough to mean something, the published Chinchilla refit, hold-out scoring, and the
batched optimiser against scipy's L-BFGS-B."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize

from moe_vlm.scaling import (BESIROGLU_2024, FitResult, chinchilla_loss, clark_loss, fit_chinchilla, fit_clark,
                             fit_krajewski, krajewski_loss, load_chinchilla_data)
from moe_vlm.scaling._models import ChinchillaModel
from moe_vlm.scaling._optim import huber_objective, lbfgs_batch

CH = dict(BESIROGLU_2024.params)
KR = dict(c=1.6, a=300.0, b=900.0, g=250.0, alpha=0.33, beta=0.3, gamma=0.55)
CL = dict(a=-0.08, b=-0.1, c=0.008, d=1.1, e_start=1.85, e_max=300.0)
SMALL_GRID = {"a": (5.0, 10.0), "b": (5.0, 10.0), "e": (0.0, 0.5), "alpha": (0.3, 0.6), "beta": (0.3, 0.6)}


def _grid(*axes):
    return [a.ravel() for a in np.meshgrid(*axes, indexing="ij")]


def _noisy(loss, sd, seed):
    return loss * np.exp(np.random.default_rng(seed).normal(0.0, sd, loss.shape))


def _rel_err(fit: FitResult, truth: dict) -> dict:
    return {k: abs(fit.params[k] / v - 1) for k, v in truth.items()}


def test_chinchilla_recovers_parameters():
    N, D = _grid(np.geomspace(5e7, 1e10, 7), np.geomspace(1e9, 3e11, 7))
    loss = _noisy(chinchilla_loss(N, D, **CH), 0.001, seed=1)
    fit = fit_chinchilla(N, D, loss, n_bootstrap=0, grid=SMALL_GRID)   # the full grid: real-data test
    err = _rel_err(fit, CH)
    assert max(err["E"], err["alpha"], err["beta"]) < 0.01, err
    assert max(err["A"], err["B"]) < 0.05, err
    assert fit.n_points == 49 and fit.n_inits == 32 and fit.converged
    assert fit.rmse < 0.002                                   # noise sd 0.001 in log L


def test_krajewski_recovers_parameters():
    N, D, G = _grid(np.geomspace(3e7, 3e9, 6), np.geomspace(1e9, 1e11, 6), np.array([1.0, 2, 4, 8, 16]))
    loss = _noisy(krajewski_loss(N, D, G, **KR), 0.001, seed=2)
    fit = fit_krajewski(N, D, G, loss, n_bootstrap=0)
    err = _rel_err(fit, KR)
    assert max(err[k] for k in ("c", "alpha", "beta", "gamma")) < 0.03, err
    assert max(err[k] for k in ("a", "b", "g")) < 0.05, err


def test_clark_recovers_parameters():
    N, E = _grid(np.geomspace(1e7, 1e9, 6), 2.0 ** np.arange(11))
    loss = _noisy(clark_loss(N, E, **CL), 0.001, seed=3)
    fit = fit_clark(N, E, loss, n_bootstrap=0)
    err = _rel_err(fit, CL)
    assert max(err[k] for k in ("a", "b", "d")) < 0.02, err
    assert err["c"] < 0.05 and err["e_start"] < 0.05 and err["e_max"] < 0.05, err


def test_bootstrap_cis_cover_truth_and_exclude_wrong_values():
    # Three data sets x five parameters, 95% percentile intervals. Coverage alone is cheap to
    # satisfy with huge intervals, so also require them narrow enough to rule out values
    # 20% (exponents) or 10% (E) away from the truth, e.g. Hoffmann et al.'s beta = 0.28.
    N, D = _grid(np.geomspace(5e7, 1e10, 7), np.geomspace(1e9, 3e11, 7))
    covered = []
    for seed in range(3):
        loss = _noisy(chinchilla_loss(N, D, **CH), 0.005, seed=100 + seed)
        fit = fit_chinchilla(N, D, loss, n_bootstrap=200, grid=SMALL_GRID, seed=seed)
        assert fit.n_bootstrap == 200 and fit.bootstrap["E"].size == 200
        for k, v in CH.items():
            lo, hi = fit.ci[k]
            assert lo <= fit.params[k] <= hi
            covered.append(lo <= v <= hi)
        for k, far in (("E", 0.1), ("alpha", 0.2), ("beta", 0.2)):
            lo, hi = fit.ci[k]
            assert not lo <= CH[k] * (1 - far) <= hi and not lo <= CH[k] * (1 + far) <= hi, (k, fit.ci[k])
        assert not fit.ci["beta"][0] <= 0.28 <= fit.ci["beta"][1]
    assert sum(covered) >= 14, covered                       # 15 intervals at 95%
    narrower = fit_chinchilla(N, D, loss, n_bootstrap=200, grid=SMALL_GRID, seed=seed, ci=0.5)
    assert all(narrower.ci[k][0] > fit.ci[k][0] and narrower.ci[k][1] < fit.ci[k][1] for k in CH)


def test_refit_of_published_chinchilla_data():
    N, D, loss = load_chinchilla_data(drop_highest_loss=5)
    assert N.size == 240
    fit = fit_chinchilla(N, D, loss, n_bootstrap=100)       # Besiroglu et al.'s 4,500-start grid
    assert fit.n_inits == 4500 and fit.converged and fit.bootstrap_converged >= 95
    pub = BESIROGLU_2024.params
    for k in ("E", "alpha", "beta"):
        assert fit.params[k] == pytest.approx(pub[k], rel=0.05), (k, fit.params[k], pub[k])
    for k in ("A", "B"):
        assert fit.params[k] == pytest.approx(pub[k], rel=0.15), (k, fit.params[k], pub[k])
    for k in ("E", "alpha", "beta"):
        assert fit.ci[k][0] < pub[k] < fit.ci[k][1]
    assert fit.n_at_best >= 10                               # many starts agree on the optimum


def test_holdout_fraction_and_mask():
    N, D = _grid(np.geomspace(5e7, 1e10, 7), np.geomspace(1e9, 3e11, 7))
    loss = _noisy(chinchilla_loss(N, D, **CH), 0.002, seed=5)
    fit = fit_chinchilla(N, D, loss, n_bootstrap=0, holdout=0.2, grid=SMALL_GRID, seed=4)
    assert fit.n_held_out == 10 and fit.n_points == 39 and fit.holdout_mask.sum() == 10
    assert 0 < fit.held_out_error < 0.006
    mask = N == N.max()                                      # extrapolate to the largest model
    fit2 = fit_chinchilla(N, D, loss, n_bootstrap=0, holdout=mask, grid=SMALL_GRID)
    assert fit2.n_points == 42 and 0 < fit2.held_out_error < 0.01
    assert fit_chinchilla(N, D, loss, n_bootstrap=0, grid=SMALL_GRID).held_out_error is None


def test_result_predict_to_dict_and_determinism():
    N, D = _grid(np.geomspace(5e7, 1e10, 5), np.geomspace(1e9, 3e11, 5))
    loss = _noisy(chinchilla_loss(N, D, **CH), 0.003, seed=6)
    a = fit_chinchilla(N, D, loss, n_bootstrap=30, grid=SMALL_GRID, seed=7)
    b = fit_chinchilla(N, D, loss, n_bootstrap=30, grid=SMALL_GRID, seed=7)
    c = fit_chinchilla(N, D, loss, n_bootstrap=30, grid=SMALL_GRID, seed=8)
    assert a.params == b.params and a.ci == b.ci and a.ci != c.ci
    np.testing.assert_allclose(a.predict(N, D), chinchilla_loss(N, D, **a.params))
    np.testing.assert_allclose(a.predict(N=N, D=D), a.predict(N, D))
    np.testing.assert_allclose(np.log(loss) - np.log(a.predict(N, D)), a.residuals, atol=1e-12)
    with pytest.raises(TypeError, match="N, D"):
        a.predict(N, D, N)
    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    assert d["law"] == "chinchilla" and set(d["params"]) == set(CH) and len(d["residuals"]) == 25
    assert d["ci"]["E"][0] < d["params"]["E"] < d["ci"]["E"][1]
    none = fit_chinchilla(N, D, loss, n_bootstrap=0, grid=SMALL_GRID).to_dict()
    assert none["ci"]["E"] == [None, None] and none["held_out_error"] is None
    json.dumps(none, allow_nan=False)
    assert "alpha" in a.summary() and "ci low" in a.summary()


def test_batched_lbfgs_matches_scipy():
    # The batched optimiser (used for the grid and the bootstrap) must land where scipy's
    # L-BFGS-B lands from the same start, on plain and on bootstrap-weighted problems.
    N, D = _grid(np.geomspace(5e7, 1e10, 6), np.geomspace(1e9, 3e11, 6))
    rng = np.random.default_rng(9)
    y = np.log(_noisy(chinchilla_loss(N, D, **CH), 0.005, seed=10))
    model = ChinchillaModel(N, D)
    truth = np.array([np.log(CH["A"]), np.log(CH["B"]), np.log(CH["E"]), CH["alpha"], CH["beta"]])
    x0 = truth + rng.normal(0, [0.5, 0.5, 0.05, 0.03, 0.03], (4, 5))
    W = np.vstack([np.ones(y.size), rng.multinomial(y.size, np.full(y.size, 1 / y.size), size=3)])  # [4, n]
    res = lbfgs_batch(huber_objective(model, y, W, 1e-3), x0, ftol=1e-12)
    for k in range(4):
        fg = huber_objective(model, y, W[k:k + 1], 1e-3)
        ref = minimize(lambda x: tuple(v[0] for v in fg(x[None], np.zeros(1, int))), x0[k], jac=True,
                       method="L-BFGS-B", options=dict(ftol=1e-15, gtol=1e-12, maxiter=20000))
        assert res.f[k] <= ref.fun * (1 + 1e-6)
        np.testing.assert_allclose(res.x[k, 2:], ref.x[2:], atol=2e-3)   # e, alpha, beta
