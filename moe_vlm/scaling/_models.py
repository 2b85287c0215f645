"""The three laws in the unconstrained coordinates the optimiser works in.

Each model holds one data set (logs of its inputs, ``[n]``) and maps a batch of raw
parameter vectors ``theta [K, p]`` to predicted log losses ``[K, n]`` (``forward``) and a
gradient (``backward``, a vector-Jacobian product). Positive quantities are optimised
as logs, so positivity needs no bounds:

- Chinchilla, as Hoffmann et al. (2022) / Besiroglu et al. (2024): ``theta = (a, b, e,
  alpha, beta)``, ``log L = LSE(a - alpha log N, b - beta log D, e)``, ``A, B, E = exp(a, b, e)``.
- Krajewski et al. (2024): ``theta = (log c, log a, log g, log b, alpha, beta, gamma)``,
  ``log L = LSE(log c, log a - alpha log N, log g - gamma log G - alpha log N, log b - beta log D)``.
- Clark et al. (2022): ``theta = (a, b', c, d', log u, log v)`` with ``u = 1/E_start - 1/E_max``,
  ``v = 1/E_max`` (both > 0, so ``E_start < E_max`` holds by construction) and
  ``log10 L = a x + b' z + c x z + d'``, where ``x = log10 N - m`` is centred on the data's
  mean ``m`` (conditioning) and ``z = log10 E_hat``. Un-centring is exact:
  ``b = b' - c m``, ``d = d' - a m``.

Shape legend: K parameter vectors, n points, p parameters.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import nnls

LN10 = float(np.log(10.0))


def _lse_terms(terms: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``log sum_t exp(terms[t])`` for a few ``[K, n]`` arrays, shifted by their max so
    nothing overflows. Returns ``(pred [K, n], exp(term - max) per term, their sum [K, n])``:
    the softmax weight of term t is ``exps[t] / total``. Terms are overwritten."""
    mx = terms[0].copy()
    for t in terms[1:]:
        np.maximum(mx, t, out=mx)
    exps = []
    for t in terms:
        t -= mx
        exps.append(np.exp(t, out=t))
    total = exps[0].copy()
    for t in exps[1:]:
        total += t
    pred = np.log(total)
    pred += mx
    return pred, exps, total


def _product(grid: Mapping[str, Sequence[float]], names: Sequence[str]) -> np.ndarray:
    """Cartesian product of ``grid[name]`` values in ``names`` order -> ``[K, len(names)]``."""
    missing = [k for k in names if k not in grid]
    extra = [k for k in grid if k not in names]
    if missing or extra:
        raise ValueError(f"grid needs exactly the keys {list(names)}; missing {missing}, unknown {extra}")
    vals = [np.atleast_1d(np.asarray(grid[k], dtype=float)) for k in names]
    if any(v.size == 0 or not np.all(np.isfinite(v)) for v in vals):
        raise ValueError("every grid entry needs at least one finite value")
    return np.array(list(itertools.product(*vals)), dtype=float)


class ChinchillaModel:
    """``log L = LSE(a - alpha log N, b - beta log D, e)`` (Besiroglu et al.'s parametrisation)."""

    law = "chinchilla"
    names = ("a", "b", "e", "alpha", "beta")
    n_params = 5

    def __init__(self, N: np.ndarray, D: np.ndarray):
        self.lnN, self.lnD = np.log(N), np.log(D)   # [n]
        self.one_lnN = np.column_stack([np.ones_like(self.lnN), self.lnN])  # [n, 2]
        self.one_lnD = np.column_stack([np.ones_like(self.lnD), self.lnD])  # [n, 2]

    def forward(self, theta: np.ndarray) -> tuple[np.ndarray, tuple]:
        a, b, e, al, be = (theta[:, i, None] for i in range(5))            # [K, 1]
        terms = [a - al * self.lnN, b - be * self.lnD,
                 np.broadcast_to(e, (theta.shape[0], self.lnN.size)).copy()]  # 3 x [K, n]
        pred, exps, total = _lse_terms(terms)
        return pred, (exps, total)

    def backward(self, cache: tuple, dpred: np.ndarray) -> np.ndarray:
        (w0, w1, w2), total = cache                 # softmax weight of term t: w_t / total
        q = dpred / total
        w0 *= q; w1 *= q; w2 *= q                   # [K, n] each: d f / d term_t
        g0, g1 = w0 @ self.one_lnN, w1 @ self.one_lnD                    # [K, 2]: (sum, sum * log x)
        return np.column_stack([g0[:, 0], g1[:, 0], w2.sum(1), -g0[:, 1], -g1[:, 1]])

    @staticmethod
    def to_params(theta: np.ndarray) -> dict[str, np.ndarray]:
        theta = np.atleast_2d(theta)
        return {"E": np.exp(theta[:, 2]), "A": np.exp(theta[:, 0]), "B": np.exp(theta[:, 1]),
                "alpha": theta[:, 3], "beta": theta[:, 4]}

    def inits(self, grid: Mapping[str, Sequence[float]], y: np.ndarray) -> np.ndarray:
        """Besiroglu et al.'s grid, as given: every combination of the listed values."""
        return _product(grid, self.names)


class KrajewskiModel:
    """``log L = LSE(log c, log a - alpha log N, log g - gamma log G - alpha log N, log b - beta log D)``."""

    law = "krajewski"
    names = ("log_c", "log_a", "log_g", "log_b", "alpha", "beta", "gamma")
    n_params = 7

    def __init__(self, N: np.ndarray, D: np.ndarray, G: np.ndarray):
        self.N, self.D, self.G = N, D, G
        self.lnN, self.lnD, self.lnG = np.log(N), np.log(D), np.log(G)   # [n]
        self.one_lnD = np.column_stack([np.ones_like(self.lnD), self.lnD])  # [n, 2]
        self.one_lnG = np.column_stack([np.ones_like(self.lnG), self.lnG])  # [n, 2]

    def forward(self, theta: np.ndarray) -> tuple[np.ndarray, tuple]:
        lc, la, lg, lb, al, be, ga = (theta[:, i, None] for i in range(7))  # [K, 1]
        an = al * self.lnN                                                  # [K, n]
        terms = [np.broadcast_to(lc, an.shape).copy(), la - an, lg - ga * self.lnG - an,
                 lb - be * self.lnD]                                        # 4 x [K, n]
        pred, exps, total = _lse_terms(terms)
        return pred, (exps, total)

    def backward(self, cache: tuple, dpred: np.ndarray) -> np.ndarray:
        (w0, w1, w2, w3), total = cache
        q = dpred / total
        w0 *= q; w1 *= q; w2 *= q; w3 *= q          # [K, n] each: d f / d term_t
        g2 = w2 @ self.one_lnG                                              # [K, 2]
        g3 = w3 @ self.one_lnD
        w1 += w2
        g12 = w1 @ self.lnN                                                 # [K]
        return np.column_stack([w0.sum(1), w1.sum(1) - g2[:, 0], g2[:, 0], g3[:, 0],
                                -g12, -g3[:, 1], -g2[:, 1]])

    @staticmethod
    def to_params(theta: np.ndarray) -> dict[str, np.ndarray]:
        theta = np.atleast_2d(theta)
        return {"c": np.exp(theta[:, 0]), "a": np.exp(theta[:, 1]), "b": np.exp(theta[:, 3]),
                "g": np.exp(theta[:, 2]), "alpha": theta[:, 4], "beta": theta[:, 5],
                "gamma": theta[:, 6]}

    def inits(self, grid: Mapping[str, Sequence[float]], y: np.ndarray) -> np.ndarray:
        """A grid over the exponents ``(alpha, beta, gamma)``; for each, the linear
        coefficients ``(c, a, g, b) >= 0`` come from non-negative least squares on L.
        Given the exponents the law is linear in the rest, so this starts every run
        from the best coefficients for its exponents instead of a blind guess."""
        ex = _product(grid, ("alpha", "beta", "gamma"))                      # [K, 3]
        L = np.exp(y)
        out = []
        for al, be, ga in ex:
            X = np.column_stack([np.ones_like(L), self.N ** -al, self.G ** -ga * self.N ** -al,
                                 self.D ** -be])                             # [n, 4]
            scale = np.abs(X).max(0)
            coef, _ = nnls(X / scale, L)
            coef = np.maximum(coef / scale, 1e-6 * L.min() / scale)          # keep logs finite
            c, a, g, b = np.log(coef)
            out.append([c, a, g, b, al, be, ga])
        return np.array(out)


CLARK_LOG_UV_LIMIT = 40.0
"""``|log u|, |log v|`` cap for the Clark fit. Without a dense point (E = 1) ``e_start`` is
not identified: the loss flattens as ``u = 1/e_start - 1/e_max -> inf`` and a start may walk
until ``exp(log u)`` overflows, which reported ``e_start = 0.0`` (an invalid law). The cap
keeps every parameter finite and valid (``e_start >= ~4e-18``); the loss is flat there."""


class ClarkModel:
    """``log10 L = a x + b' z + c x z + d'``, ``x = log10 N - m``, ``z = log10 E_hat(E; u, v)``.

    ``log u`` and ``log v`` are clipped to ``[-CLARK_LOG_UV_LIMIT, CLARK_LOG_UV_LIMIT]``
    (gradient zero outside), so no start can overflow them."""

    law = "clark"
    names = ("a", "b_c", "c", "d_c", "log_u", "log_v")
    n_params = 6

    def __init__(self, N: np.ndarray, E: np.ndarray):
        l10 = np.log10(N)
        self.m = float(l10.mean())
        self.x = l10 - self.m                       # [n], centred log10 N
        self.Em1 = E - 1.0                          # [n]

    def _z(self, log_u: np.ndarray, log_v: np.ndarray) -> tuple[np.ndarray, ...]:
        u, v = np.exp(log_u), np.exp(log_v)         # [K, 1]
        s = self.Em1 + 1.0 / u                      # [K, n]
        e_hat = 1.0 / (1.0 / s + v)
        return np.log(e_hat) / LN10, e_hat, s, u, v

    def forward(self, theta: np.ndarray) -> tuple[np.ndarray, tuple]:
        a, b, c, d = (theta[:, i, None] for i in range(4))
        luv = theta[:, 4:6]                                                  # [K, 2]
        inside = np.abs(luv) < CLARK_LOG_UV_LIMIT                            # [K, 2]
        luv = np.clip(luv, -CLARK_LOG_UV_LIMIT, CLARK_LOG_UV_LIMIT)
        z, e_hat, s, u, v = self._z(luv[:, 0, None], luv[:, 1, None])
        pred = LN10 * (a * self.x + b * z + c * self.x * z + d)              # [K, n] natural log
        return pred, (theta, inside, z, e_hat, s, u, v)

    def backward(self, cache: tuple, dpred: np.ndarray) -> np.ndarray:
        theta, inside, z, e_hat, s, u, v = cache
        b, c = theta[:, 1, None], theta[:, 2, None]
        k = dpred * LN10                                                    # [K, n]
        dz_coef = dpred * (b + c * self.x)          # d pred / d ln(E_hat) = (b + c x) (LN10 cancels)
        dln_du = -e_hat / (s * s * u)               # d ln E_hat / d log u
        dln_dv = -e_hat * v                         # d ln E_hat / d log v
        return np.column_stack([(k * self.x).sum(1), (k * z).sum(1), (k * self.x * z).sum(1),
                                k.sum(1), (dz_coef * dln_du).sum(1) * inside[:, 0],
                                (dz_coef * dln_dv).sum(1) * inside[:, 1]])

    def to_params(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        theta = np.atleast_2d(theta)
        a, b, c, d = theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3]
        luv = np.clip(theta[:, 4:6], -CLARK_LOG_UV_LIMIT, CLARK_LOG_UV_LIMIT)
        u, v = np.exp(luv[:, 0]), np.exp(luv[:, 1])
        return {"a": a, "b": b - c * self.m, "c": c, "d": d - a * self.m,
                "e_start": 1.0 / (u + v), "e_max": 1.0 / v}

    def inits(self, grid: Mapping[str, Sequence[float]], y: np.ndarray) -> np.ndarray:
        """A grid over the saturation ``(e_start, e_max)`` (pairs with ``e_start >= e_max``
        are skipped); for each, ``(a, b', c, d')`` by least squares on log10 L, which is
        linear in them once ``E_hat`` is fixed."""
        pairs = _product(grid, ("e_start", "e_max"))
        out = []
        for es, em in pairs:
            if not 0 < es < em:
                continue
            lu, lv = np.log(1.0 / es - 1.0 / em), np.log(1.0 / em)
            z = self._z(np.array([[lu]]), np.array([[lv]]))[0][0]            # [n]
            X = np.column_stack([self.x, z, self.x * z, np.ones_like(z)])   # [n, 4]
            coef = np.linalg.lstsq(X, y / LN10, rcond=None)[0]
            out.append([*coef, lu, lv])
        if not out:
            raise ValueError("the Clark grid has no pair with 0 < e_start < e_max")
        return np.array(out)
