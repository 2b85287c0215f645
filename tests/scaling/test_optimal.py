"""Compute-optimal allocation (closed form vs brute force) and IsoFLOP profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from moe_vlm.scaling import (BESIROGLU_2024, HOFFMANN_2022, chinchilla_loss, compute_optimal, isoflop_fit,
                             krajewski_loss)

LAWS = [BESIROGLU_2024.params, HOFFMANN_2022.params, dict(E=1.5, A=100.0, B=5000.0, alpha=0.5, beta=0.25)]


@pytest.mark.parametrize("p", LAWS)
def test_compute_optimal_matches_brute_force(p):
    C = np.array([1e18, 1e21, 5.76e23, 1e26])
    opt = compute_optimal(p, C)
    assert opt.N.shape == C.shape
    np.testing.assert_allclose(6 * opt.N * opt.D, C, rtol=1e-12)
    for c, n_star, l_star in zip(C, opt.N, opt.loss):
        along = lambda x: chinchilla_loss(np.exp(x), c / (6 * np.exp(x)), **p)   # loss on the C = 6ND line
        grid = np.linspace(np.log(1e3), np.log(c / 6 / 1e3), 200001)
        x0 = grid[np.argmin(along(grid))]
        x = minimize_scalar(along, bracket=(x0 - 1e-3, x0, x0 + 1e-3), tol=1e-12).x
        assert n_star == pytest.approx(np.exp(x), rel=1e-5)
        assert l_star == pytest.approx(along(x), rel=1e-12)
        assert l_star <= along(np.log(n_star) + 0.01) and l_star <= along(np.log(n_star) - 0.01)


def test_compute_optimal_accepts_fits_and_krajewski_with_g():
    assert float(compute_optimal(BESIROGLU_2024, 1e22).N) == float(compute_optimal(BESIROGLU_2024.params, 1e22).N)
    kr = dict(c=1.6, a=300.0, b=900.0, g=250.0, alpha=0.33, beta=0.3, gamma=0.55)
    opt = compute_optimal(kr, [1e20, 1e21], G=8.0)
    for c, n in zip([1e20, 1e21], opt.N):
        f = lambda x: krajewski_loss(np.exp(x), c / (6 * np.exp(x)), 8.0, **kr)
        assert f(np.log(n)) < min(f(np.log(n) + 0.02), f(np.log(n) - 0.02))
    with pytest.raises(ValueError, match="needs the granularity G"):
        compute_optimal(kr, 1e20)
    with pytest.raises(ValueError, match="Clark's law has no token term"):
        compute_optimal(dict(a=-0.1, b=-0.1, c=0.01, d=1.0, e_start=2.0, e_max=100.0), 1e20)
    with pytest.raises(ValueError, match="C must be finite and > 0"):
        compute_optimal(BESIROGLU_2024, [1e20, -1.0])


def _isoflop_points(p, budgets, spread, per_budget, noise=0.0, seed=0):
    """Points on IsoFLOP lines, log-spaced around each budget's true optimum."""
    rng = np.random.default_rng(seed)
    N, D = [], []
    for c in budgets:
        n_star = float(compute_optimal(p, c).N)
        for n in n_star * np.exp(np.linspace(-spread, spread, per_budget)):
            N.append(n)
            D.append(c / (6 * n))
    N, D = np.array(N), np.array(D)
    return N, D, chinchilla_loss(N, D, **p) * np.exp(rng.normal(0, noise, N.size))


@pytest.mark.parametrize("p", LAWS)
def test_isoflop_recovers_exponents(p):
    budgets = np.geomspace(1e18, 1e22, 5)
    N, D, L = _isoflop_points(p, budgets, spread=1.0, per_budget=9)
    iso = isoflop_fit(N, D, L)
    a_true, b_true = p["beta"] / (p["alpha"] + p["beta"]), p["alpha"] / (p["alpha"] + p["beta"])
    assert iso.a == pytest.approx(a_true, abs=0.01) and iso.b == pytest.approx(b_true, abs=0.01)
    assert iso.a + iso.b == pytest.approx(1.0, abs=1e-9)         # D* = C / (6 N*)
    np.testing.assert_allclose(iso.budgets, budgets, rtol=1e-9)
    np.testing.assert_allclose(iso.n_opt, compute_optimal(p, budgets).N, rtol=0.1)
    assert iso.in_range.all() and (iso.n_points == 9).all() and (iso.group >= 0).all()
    np.testing.assert_allclose(iso.n_opt_at(budgets), iso.n_opt, rtol=0.05)
    json.dumps(iso.to_dict(), allow_nan=False)


def test_isoflop_with_noise_explicit_labels_and_flops():
    p = BESIROGLU_2024.params
    N, D, L = _isoflop_points(p, [1e19, 1e20, 1e21], spread=1.2, per_budget=7, noise=0.002, seed=1)
    labels = np.repeat(["small", "medium", "large"], 7)
    iso = isoflop_fit(N, D, L, budgets=labels)
    assert iso.labels == ("small", "medium", "large")
    assert iso.a == pytest.approx(p["beta"] / (p["alpha"] + p["beta"]), abs=0.05)
    jitter = 6 * N * D * np.exp(np.random.default_rng(2).uniform(-0.02, 0.02, N.size))  # measured FLOPs
    iso2 = isoflop_fit(N, D, L, flops=jitter, rtol=0.1)
    assert iso2.budgets.size == 3 and iso2.a == pytest.approx(iso.a, abs=0.02)


def test_isoflop_refuses_and_drops_small_budgets():
    p = BESIROGLU_2024.params
    N, D, L = _isoflop_points(p, [1e19, 1e20], spread=1.0, per_budget=5)
    N2, D2, L2 = np.append(N, [1e8, 2e8]), np.append(D, [1e21 / 6e8, 1e21 / 1.2e9]), np.append(L, [3.0, 2.9])
    with pytest.raises(ValueError, match=r"budget 1e\+21 \(C=1e\+21 FLOPs\) has 2 distinct model size\(s\)"):
        isoflop_fit(N2, D2, L2)
    iso = isoflop_fit(N2, D2, L2, drop_invalid=True)
    assert iso.budgets.size == 2 and len(iso.dropped) == 1 and (iso.group[-2:] == -1).all()
    one = isoflop_fit(N[:5], D[:5], L[:5])                       # one budget: minima, no exponent
    assert one.budgets.size == 1 and np.isnan(one.a)
    concave = 4.0 - 0.01 * (np.log(N[:5]) - np.log(N[2])) ** 2
    with pytest.raises(ValueError, match="not convex"):
        isoflop_fit(N[:5], D[:5], concave)
    with pytest.raises(ValueError, match="no budget could be fitted"):
        isoflop_fit(N[:5], D[:5], concave, drop_invalid=True)
