"""Parametric scaling laws: the loss a model reaches as a function of its size and data.

Every function is vectorised: inputs broadcast against each other (numpy rules), so
``chinchilla_loss(N[:, None], D[None, :], **p)`` gives a ``[len(N), len(D)]`` surface.

Legend: N parameters (dense, or active for a sparse model), D training tokens,
G MoE granularity (Krajewski et al.), E number of routed experts (Clark et al.),
C training FLOPs (= 6 N D throughout this package).

- Chinchilla (Hoffmann et al. 2022, arXiv:2203.15556, the parametric fit of Approach 3):
  ``L(N, D) = E + A / N^alpha + B / D^beta``.
- Fine-grained MoE (Krajewski et al. 2024, arXiv:2402.07871):
  ``L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta``: granularity G (each
  expert is 1/G the width of the dense FFN) only rescales the parameter term.
- Routed language models (Clark et al. 2022, arXiv:2202.01169):
  ``log L(N, E) = a log N + b log E_hat + c log N log E_hat + d`` with the saturating
  expert count ``1/E_hat = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max``.
  ``E_hat`` equals ``E_start`` at ``E = 1`` (a dense model), grows like ``E`` in between
  and saturates at ``E_max``: it models both the weak gain of the first few experts and
  the diminishing returns of very many. Logs are base 10 here; ``a`` and ``b`` do not
  depend on the base, ``c`` and ``d`` do (``c_ln = c_10 / ln 10``, ``d_ln = d_10 ln 10``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["chinchilla_loss", "krajewski_loss", "clark_loss", "clark_e_hat", "LAWS", "LAW_INPUTS"]


def chinchilla_loss(N: ArrayLike, D: ArrayLike, *, E: float, A: float, B: float,
                    alpha: float, beta: float) -> np.ndarray:
    """Hoffmann et al. (2022) loss ``E + A/N^alpha + B/D^beta`` (broadcast over N, D)."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return E + A * N ** (-alpha) + B * D ** (-beta)


def krajewski_loss(N: ArrayLike, D: ArrayLike, G: ArrayLike, *, c: float, a: float, b: float,
                   g: float, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Krajewski et al. (2024) fine-grained MoE loss ``c + (g/G^gamma + a)/N^alpha + b/D^beta``.

    With G fixed this is the Chinchilla law with ``A = g/G^gamma + a``, ``E = c``, ``B = b``
    (that is how :func:`moe_vlm.scaling.compute_optimal` treats it).
    """
    N, D, G = (np.asarray(x, dtype=float) for x in (N, D, G))
    return c + (g * G ** (-gamma) + a) * N ** (-alpha) + b * D ** (-beta)


def clark_e_hat(E: ArrayLike, *, e_start: float, e_max: float) -> np.ndarray:
    """Clark et al. (2022) saturating expert count:
    ``1/E_hat = 1/(E - 1 + (1/e_start - 1/e_max)^-1) + 1/e_max``.

    ``E_hat(1) = e_start`` and ``E_hat -> e_max`` as ``E -> inf``; needs ``e_start < e_max``.
    """
    if not 0 < e_start < e_max:
        raise ValueError(f"Clark's transform needs 0 < e_start < e_max, got {e_start}, {e_max}")
    E = np.asarray(E, dtype=float)
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def clark_loss(N: ArrayLike, E: ArrayLike, *, a: float, b: float, c: float, d: float,
               e_start: float, e_max: float) -> np.ndarray:
    """Clark et al. (2022) routed-model loss:
    ``log10 L = a log10 N + b log10 E_hat + c log10 N log10 E_hat + d``.

    ``N`` is the dense (base) model's parameter count, i.e. the active parameters, and
    ``E`` the number of experts (1 = dense).
    """
    ln = np.log10(np.asarray(N, dtype=float))
    le = np.log10(clark_e_hat(E, e_start=e_start, e_max=e_max))
    return 10.0 ** (a * ln + b * le + c * ln * le + d)


LAWS: dict[str, Callable[..., np.ndarray]] = {
    "chinchilla": chinchilla_loss,
    "krajewski": krajewski_loss,
    "clark": clark_loss,
}
"""Law name -> loss function (keyword parameters as in :class:`FitResult.params`)."""

LAW_INPUTS: dict[str, tuple[str, ...]] = {
    "chinchilla": ("N", "D"),
    "krajewski": ("N", "D", "G"),
    "clark": ("N", "E"),
}
"""Law name -> the positional inputs its loss function takes, in order."""
