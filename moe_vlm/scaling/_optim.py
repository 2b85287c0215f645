"""Huber loss in log space and a batched L-BFGS that runs many fits at once.

Why batched: Besiroglu et al. (2024) fit the Chinchilla law by running L-BFGS from each
of 4,500 initialisations and keeping the best. With scipy that is one Python-level
optimiser loop per start (and scipy's L-BFGS-B pays BLAS-threading overhead per
iteration on small problems): one to two minutes on two cores, measured. Here all starts advance
together as arrays ``theta [K, p]``, one vectorised objective evaluation per step, so the
whole grid costs seconds. The same engine runs the bootstrap: resampling points with
replacement is the same as weighting each point by how often it was drawn
(``weights [K, n]``), so K bootstrap replicates are K rows of one batched problem.
The winner of the grid is then polished with scipy's L-BFGS-B (:func:`polish`), so the
reported optimum is scipy's, started from the best point the batch found.

Shape legend: K problems (inits or bootstrap replicates), n data points, p parameters,
m L-BFGS memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from scipy.optimize import minimize

ObjFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``(theta [k, p], rows [k] int) -> (f [k], grad [k, p])``: the objective of the problems
``rows`` (indices into the batch) at ``theta``."""


BLOCK_ELEMENTS = 16384
"""Problems x points evaluated per block in :func:`huber_objective`."""


class LogModel(Protocol):
    """A law in log space: ``forward`` gives ``log L`` per point, ``backward`` its
    vector-Jacobian product (the gradient of ``sum(dpred * log L)`` w.r.t. ``theta``)."""

    names: tuple[str, ...]

    def forward(self, theta: np.ndarray) -> tuple[np.ndarray, object]: ...

    def backward(self, cache: object, dpred: np.ndarray) -> np.ndarray: ...


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss, elementwise: ``r^2/2`` for ``|r| <= delta``, else ``delta (|r| - delta/2)``."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_objective(model: LogModel, y: np.ndarray, weights: np.ndarray, delta: float) -> ObjFn:
    """Batched ``f(theta) = sum_i w_i Huber_delta(log L_pred_i(theta) - y_i)`` and its gradient.

    ``y [n]`` is the observed log loss; ``weights`` is ``[1, n]`` (shared by all problems)
    or ``[K, n]`` (one row per problem: bootstrap draw counts). Summed, not averaged:
    Besiroglu et al. traced Hoffmann et al.'s premature L-BFGS stop to averaging, which
    shrinks the objective ~400x below the optimiser's tolerances.
    """

    unweighted = weights.shape[0] == 1 and bool(np.all(weights == 1))

    def chunk(theta: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred, cache = model.forward(theta)                      # [k, n]
        r = pred - y
        a = np.abs(r)
        c = np.minimum(a, delta)                                # Huber = c (|r| - c/2), psi = sign(r) c
        a -= 0.5 * c
        a *= c
        psi = np.copysign(c, r, out=c)
        if not unweighted:
            a *= w
            psi *= w
        return a.sum(1), model.backward(cache, psi)

    @np.errstate(over="ignore", invalid="ignore", divide="ignore")  # trial steps may overflow: f = inf rejects them
    def fg(theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Blocks of ~BLOCK_ELEMENTS keep the [k, n] temporaries in cache (about 2x faster
        # than one big batch, whose fresh pages cost more than the arithmetic).
        f = np.empty(theta.shape[0])
        g = np.empty(theta.shape)
        rows_per_block = max(16, BLOCK_ELEMENTS // y.size)
        for s in range(0, theta.shape[0], rows_per_block):
            sl = slice(s, s + rows_per_block)
            w = weights if weights.shape[0] == 1 else weights[rows[sl]]  # [k or 1, n]
            f[sl], g[sl] = chunk(theta[sl], w)
        return f, g

    return fg


@dataclass(frozen=True)
class BatchResult:
    """Outcome of :func:`lbfgs_batch`: ``x [K, p]``, ``f [K]``, iterations ``[K]``, and
    whether each problem met a convergence test (not just the iteration cap)."""

    x: np.ndarray
    f: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray


def _two_loop(g: np.ndarray, S: np.ndarray, Y: np.ndarray, rho: np.ndarray, newest: int) -> np.ndarray:
    """L-BFGS direction ``-H g`` for a batch. ``S, Y [k, m, p]`` are ring buffers of the
    last m steps and gradient changes, slot ``newest`` the latest; ``rho [k, m]`` = 1/(s.y),
    0 for empty or discarded slots (which then drop out of both loops)."""
    q = g.copy()
    m = S.shape[1]
    order = [(newest - j) % m for j in range(m)]            # newest -> oldest
    alpha = np.zeros(rho.shape)
    for i in order:
        alpha[:, i] = rho[:, i] * np.einsum("kp,kp->k", S[:, i], q)
        q -= alpha[:, i, None] * Y[:, i]
    sy = np.einsum("kp,kp->k", S[:, newest], Y[:, newest])
    yy = np.einsum("kp,kp->k", Y[:, newest], Y[:, newest])
    gamma = np.where((rho[:, newest] > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)
    r = gamma[:, None] * q
    for i in reversed(order):                                # oldest -> newest
        b = rho[:, i] * np.einsum("kp,kp->k", Y[:, i], r)
        r += S[:, i] * (alpha[:, i] - b)[:, None]
    return -r


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def lbfgs_batch(fg: ObjFn, x0: np.ndarray, *, memory: int = 10, max_iter: int = 1000,
                ftol: float = 1e-12, gtol: float = 1e-10, c1: float = 1e-4,
                max_backtrack: int = 50) -> BatchResult:
    """Minimise K independent problems at once with L-BFGS and Armijo backtracking.

    Each problem stops on its own: relative decrease ``(f_old - f_new) <= ftol * |f_old|``,
    gradient ``max|g| <= gtol``, or no acceptable step after ``max_backtrack`` halvings
    (a kink or a numerical floor; counted as converged since no descent is left).
    Backtracking steps to the minimiser of the quadratic fitted to the failed trial. Only
    the problems still running are evaluated, so the cost shrinks as they finish.
    Curvature pairs with ``s.y <= 0`` (possible without a Wolfe line search) are dropped.
    """
    x = np.array(x0, dtype=float)                  # [K, p]
    K, p = x.shape
    f, g = fg(x, np.arange(K))
    S = np.zeros((K, memory, p))                   # ring buffers, slot it % memory is newest
    Y = np.zeros((K, memory, p))
    rho = np.zeros((K, memory))
    n_iter = np.zeros(K, dtype=int)
    done = ~np.isfinite(f) | (np.abs(g).max(1) <= gtol)
    converged = done & np.isfinite(f)
    for it in range(max_iter):
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        everyone = act.size == K
        ga = g.copy() if everyone else g[act]
        ra = rho if everyone else rho[act]
        d = _two_loop(ga, S if everyone else S[act], Y if everyone else Y[act], ra, (it - 1) % memory)
        gd = np.einsum("kp,kp->k", ga, d)
        bad = ~(gd < 0) | ~np.isfinite(gd)            # not a descent direction: restart
        if bad.any():
            d[bad] = -ga[bad]
            gd[bad] = -np.einsum("kp,kp->k", ga[bad], ga[bad])
            rho[act[bad]] = 0.0
        fresh = rho[act].max(1) == 0                  # no curvature pairs yet
        t = np.where(fresh, np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(d, axis=1), 1e-300)), 1.0)
        x_new = np.empty_like(d)
        f_new = np.full(act.size, np.inf)
        g_new = np.empty_like(ga)
        f_act = f[act]
        pending = np.arange(act.size)
        for _ in range(max_backtrack):
            xt = x[act[pending]] + t[pending, None] * d[pending]
            ft, gt = fg(xt, act[pending])
            ok = np.isfinite(ft) & (ft <= f_act[pending] + c1 * t[pending] * gd[pending])
            acc = pending[ok]
            x_new[acc], f_new[acc], g_new[acc] = xt[ok], ft[ok], gt[ok]
            fail, pending = ~ok, pending[~ok]
            if pending.size == 0:
                break
            # next trial: minimiser of the quadratic through f(0), f'(0), f(t), kept in [t/10, t/2]
            tp, gdp, ftp = t[pending], gd[pending], ft[fail]
            curv = 2.0 * (ftp - f_act[pending] - gdp * tp)
            tq = np.where(np.isfinite(ftp) & (curv > 0), -gdp * tp * tp / np.where(curv > 0, curv, 1.0), 0.1 * tp)
            t[pending] = np.clip(tq, 0.1 * tp, 0.5 * tp)
        moved = np.ones(act.size, dtype=bool)
        moved[pending] = False
        idx = act[moved]
        s = x_new[moved] - x[idx]
        yv = g_new[moved] - ga[moved]
        sy = np.einsum("kp,kp->k", s, yv)
        upd = sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(yv, axis=1)
        slot = it % memory
        S[idx, slot], Y[idx, slot] = s, yv
        rho[idx, slot] = np.where(upd, 1.0 / np.where(upd, sy, 1.0), 0.0)
        small = f_act[moved] - f_new[moved] <= ftol * np.maximum(np.abs(f_act[moved]), 1e-300)
        x[idx], f[idx], g[idx] = x_new[moved], f_new[moved], g_new[moved]
        n_iter[act] += 1
        flat = np.abs(g[idx]).max(1) <= gtol
        stop = np.concatenate([idx[small | flat], act[pending]])   # converged, or no descent left
        done[stop] = True
        converged[stop] = True
    return BatchResult(x=x, f=f, n_iter=n_iter, converged=converged)


def polish(fg: ObjFn, x0: np.ndarray, *, maxiter: int = 15000) -> tuple[np.ndarray, float, bool, str]:
    """Refine one solution with scipy's L-BFGS-B at tight tolerances.

    Returns ``(x [p], f, converged, message)``; ``converged`` is scipy's ``success``. If
    scipy ends above ``f(x0)`` (it should not: L-BFGS-B is monotone), ``x0`` is kept."""
    one = np.zeros(1, dtype=int)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = fg(x[None], one)
        return float(f[0]), g[0]

    f0 = fun(x0)[0]
    res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                   options=dict(maxiter=maxiter, ftol=1e-15, gtol=1e-12, maxcor=20))
    if not np.isfinite(res.fun) or res.fun > f0:
        return np.asarray(x0, dtype=float), f0, False, f"kept the batched optimum (scipy: {res.message})"
    return res.x, float(res.fun), bool(res.success), str(res.message)
