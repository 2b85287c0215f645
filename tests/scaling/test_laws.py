"""Law functions and their log-space models: values, limits, broadcasting, and that each
model's analytic gradient (what makes the 4,500-start grid cheap) matches finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from moe_vlm.scaling import chinchilla_loss, clark_e_hat, clark_loss, krajewski_loss
from moe_vlm.scaling._models import ChinchillaModel, ClarkModel, KrajewskiModel
from moe_vlm.scaling._optim import huber, huber_objective

CH = dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
KR = dict(c=1.6, a=300.0, b=900.0, g=250.0, alpha=0.33, beta=0.3, gamma=0.55)
CL = dict(a=-0.08, b=-0.1, c=0.008, d=1.1, e_start=1.85, e_max=300.0)


def test_chinchilla_value_and_broadcast():
    assert chinchilla_loss(1e9, 2e10, **CH) == pytest.approx(
        1.8172 + 482.01 / 1e9 ** 0.3478 + 2085.43 / 2e10 ** 0.3658, rel=1e-12)
    surf = chinchilla_loss(np.array([1e8, 1e9])[:, None], np.array([1e9, 1e10, 1e11])[None], **CH)
    assert surf.shape == (2, 3)
    assert np.all(np.diff(surf, axis=0) < 0) and np.all(np.diff(surf, axis=1) < 0)  # more N or D: lower loss


def test_krajewski_at_fixed_granularity_is_chinchilla():
    N, D, G = np.geomspace(1e7, 1e10, 5), np.geomspace(1e9, 1e12, 5), 8.0
    as_ch = dict(E=KR["c"], A=KR["g"] * G ** -KR["gamma"] + KR["a"], B=KR["b"], alpha=KR["alpha"], beta=KR["beta"])
    np.testing.assert_allclose(krajewski_loss(N, D, G, **KR), chinchilla_loss(N, D, **as_ch), rtol=1e-13)
    assert np.all(np.diff(krajewski_loss(1e8, 1e10, np.array([1, 2, 4, 8.0]), **KR)) < 0)  # finer: lower loss


def test_clark_saturating_transform():
    es, em = 1.85, 300.0
    assert clark_e_hat(1.0, e_start=es, e_max=em) == pytest.approx(es)       # a dense model
    assert clark_e_hat(1e12, e_start=es, e_max=em) == pytest.approx(em, rel=1e-6)
    E = np.array([1, 2, 8, 64, 512, 4096.0])
    e_hat = clark_e_hat(E, e_start=es, e_max=em)
    assert np.all(np.diff(e_hat) > 0) and np.all(e_hat < em)
    assert clark_e_hat(16.0, e_start=es, e_max=1e9) == pytest.approx(16 - 1 + es, rel=1e-6)  # ~E in between
    with pytest.raises(ValueError, match="e_start < e_max"):
        clark_e_hat(4.0, e_start=10.0, e_max=5.0)


def test_clark_loss_form():
    N, E = 3e8, 16.0
    z = np.log10(clark_e_hat(E, e_start=CL["e_start"], e_max=CL["e_max"]))
    x = np.log10(N)
    expect = 10 ** (CL["a"] * x + CL["b"] * z + CL["c"] * x * z + CL["d"])
    assert clark_loss(N, E, **CL) == pytest.approx(expect, rel=1e-12)


def _data(rng, n=30):
    N = np.geomspace(1e7, 1e10, n)
    D = rng.permutation(np.geomspace(1e9, 1e12, n))
    G = rng.choice([1.0, 2.0, 4.0, 8.0], n)
    E = rng.choice([1.0, 4.0, 16.0, 64.0], n)
    return N, D, G, E


@pytest.mark.parametrize("which", ["chinchilla", "krajewski", "clark"])
def test_model_forward_matches_law_and_gradient_matches_finite_differences(which):
    rng = np.random.default_rng(0)
    N, D, G, E = _data(rng)
    if which == "chinchilla":
        model, law = ChinchillaModel(N, D), chinchilla_loss(N, D, **CH)
        theta = np.array([np.log(CH["A"]), np.log(CH["B"]), np.log(CH["E"]), CH["alpha"], CH["beta"]])
    elif which == "krajewski":
        model, law = KrajewskiModel(N, D, G), krajewski_loss(N, D, G, **KR)
        theta = np.array([np.log(KR[k]) for k in ("c", "a", "g", "b")] + [KR["alpha"], KR["beta"], KR["gamma"]])
    else:
        model, law = ClarkModel(N, E), clark_loss(N, E, **CL)
        m = model.m
        u, v = 1 / CL["e_start"] - 1 / CL["e_max"], 1 / CL["e_max"]
        theta = np.array([CL["a"], CL["b"] + CL["c"] * m, CL["c"], CL["d"] + CL["a"] * m, np.log(u), np.log(v)])
    pred, _ = model.forward(theta[None])
    np.testing.assert_allclose(pred[0], np.log(law), rtol=1e-12, atol=1e-12)
    back = model.to_params(theta)
    ref = {"chinchilla": CH, "krajewski": KR, "clark": CL}[which]
    for k, v in ref.items():
        assert back[k][0] == pytest.approx(v, rel=1e-10, abs=1e-12)

    # gradient of the Huber objective at a perturbed point, two problems at once
    y = np.log(law) + rng.normal(0, 0.02, law.size)
    fg = huber_objective(model, y, np.ones((1, y.size)), delta=0.01)
    th = theta[None] + rng.normal(0, 0.01, (2, theta.size))
    f, g = fg(th, np.arange(2))
    eps = 1e-6
    for i in range(theta.size):
        step = np.zeros_like(th)
        step[:, i] = eps
        num = (fg(th + step, np.arange(2))[0] - fg(th - step, np.arange(2))[0]) / (2 * eps)
        np.testing.assert_allclose(g[:, i], num, rtol=1e-5, atol=1e-9)
    assert np.allclose(f, huber(model.forward(th)[0] - y, 0.01).sum(1))


def test_clark_model_stays_valid_far_out():
    """Without a dense point e_start is not identified and a start can walk log u out
    until exp overflows (CI saw e_start = 0.0, which clark_loss rejects). The model clips
    log u and log v, so predictions and parameters stay finite and valid there, with a
    zero gradient along the clipped coordinate."""
    N, E = np.repeat([1e7, 1e8, 1e9], 3), np.tile([8.0, 16.0, 64.0], 3)
    model = ClarkModel(N, E)
    theta = np.array([[-0.08, -0.1, 0.008, 1.1, 1000.0, np.log(1 / 300.0)]])
    pred, cache = model.forward(theta)
    assert np.all(np.isfinite(pred))
    p = {k: float(v[0]) for k, v in model.to_params(theta).items()}
    assert 0 < p["e_start"] < p["e_max"]
    np.testing.assert_allclose(np.log(clark_loss(N, E, **p)), pred[0], rtol=1e-12)
    g = model.backward(cache, np.ones_like(pred))
    assert np.all(np.isfinite(g)) and g[0, 4] == 0.0 and g[0, 5] != 0.0
