"""Degenerate inputs are refused with messages that say what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from moe_vlm.scaling import fit_chinchilla, fit_clark, fit_krajewski

N = np.geomspace(1e7, 1e10, 12)
D = np.geomspace(1e9, 1e12, 12)[::-1].copy()
L = 2.0 + 400 * N ** -0.34 + 400 * D ** -0.28
G = np.tile([1.0, 2.0, 4.0, 8.0], 3)
E = np.tile([1.0, 4.0, 16.0, 64.0], 3)
FAST = dict(n_bootstrap=0, grid={"a": (5.0,), "b": (5.0,), "e": (0.5,), "alpha": (0.3,), "beta": (0.3,)})


@pytest.mark.parametrize("args, match", [
    ((N[:5], D[:5], L[:5]), r"5 parameters, so a fit needs at least 6 points; got 5"),
    ((N, D[:-1], L), r"mismatched lengths: N has 12, D has 11, loss has 12"),
    ((np.where(np.arange(12) == 3, np.nan, N), D, L), r"N has 1 non-finite value.*index 3"),
    ((N, np.where(np.arange(12) == 7, np.inf, D), L), r"D has 1 non-finite value.*index 7"),
    ((N, D, np.where(np.arange(12) == 2, -1.0, L)), r"loss must be > 0; index 2 is -1"),
    ((np.where(np.arange(12) == 0, 0.0, N), D, L), r"N must be > 0; index 0 is 0"),
    ((np.full(12, 1e8), D, L), r"all N are identical \(1e\+08\).*unidentifiable"),
    ((N, np.full(12, 1e10), L), r"all D are identical.*unidentifiable"),
    ((N.reshape(3, 4), D.reshape(3, 4), L.reshape(3, 4)), r"N must be a 1-D array"),
    ((["a"] * 12, D, L), r"N must be numeric"),
])
def test_chinchilla_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        fit_chinchilla(*args, **FAST)


def test_krajewski_refuses_too_few_granularities():
    with pytest.raises(ValueError, match=r"all G are identical"):
        fit_krajewski(N, D, np.full(12, 4.0), L, n_bootstrap=0)
    with pytest.raises(ValueError, match=r"G takes only 2 distinct values.*at least 3 granularities"):
        fit_krajewski(N, D, np.tile([1.0, 2.0], 6), L, n_bootstrap=0)
    with pytest.raises(ValueError, match=r"7 parameters, so a fit needs at least 8 points; got 7"):
        fit_krajewski(N[:7], D[:7], G[:7], L[:7], n_bootstrap=0)
    with pytest.raises(ValueError, match=r"G must be > 0"):
        fit_krajewski(N, D, G - 1.0, L, n_bootstrap=0)


def test_clark_refuses_bad_expert_counts():
    with pytest.raises(ValueError, match=r"E counts routed experts and must be >= 1.*index 0 is 0.5"):
        fit_clark(N, np.where(np.arange(12) == 0, 0.5, E), L, n_bootstrap=0)
    with pytest.raises(ValueError, match=r"all E are identical \(8\)"):
        fit_clark(N, np.full(12, 8.0), L, n_bootstrap=0)
    with pytest.raises(ValueError, match=r"all N are identical"):
        fit_clark(np.full(12, 1e8), E, L, n_bootstrap=0)


def test_bad_options_refused():
    with pytest.raises(ValueError, match=r"ci is a level in \(0, 1\)"):
        fit_chinchilla(N, D, L, ci=95, **FAST)
    with pytest.raises(ValueError, match=r"holdout fraction must be in \(0, 1\)"):
        fit_chinchilla(N, D, L, holdout=1.5, **FAST)
    with pytest.raises(ValueError, match=r"bool mask of shape \(12,\)"):
        fit_chinchilla(N, D, L, holdout=np.ones(5, dtype=bool), **FAST)
    with pytest.raises(ValueError, match=r"after holding out 7 point\(s\): .*at least 6 points; got 5"):
        fit_chinchilla(N, D, L, holdout=np.arange(12) < 7, **FAST)
    with pytest.raises(ValueError, match=r"grid needs exactly the keys"):
        fit_chinchilla(N, D, L, n_bootstrap=0, grid={"alpha": (0.3,)})
    with pytest.raises(ValueError, match=r"n_bootstrap must be a non-negative integer"):
        fit_chinchilla(N, D, L, n_bootstrap=-1, grid=FAST["grid"])
