"""Published Chinchilla-law estimates, for comparison with our fits."""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Mapping


@dataclass(frozen=True)
class PublishedFit:
    """A law's published parameters and, where the paper gives them, standard errors.

    ``params`` has the keys of :attr:`FitResult.params` for ``law``, so it can go straight
    into :func:`moe_vlm.scaling.compute_optimal` or :func:`moe_vlm.scaling.laws.chinchilla_loss`.
    """

    law: str
    params: Mapping[str, float]
    source: str
    se: Mapping[str, float] = field(default_factory=dict)
    note: str = ""

    def ci(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """Normal-approximation interval ``estimate +- z * se`` (the papers report standard
        errors, not intervals; this is only a like-for-like aid for comparing to our
        percentile CIs, and it is symmetric where the bootstrap distribution is not)."""
        z = NormalDist().inv_cdf(0.5 + level / 2)
        return {k: (self.params[k] - z * s, self.params[k] + z * s) for k, s in self.se.items()}


BESIROGLU_2024 = PublishedFit(
    law="chinchilla",
    params={"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658},
    se={"E": 0.03, "A": 124.58, "B": 1293.23, "alpha": 0.02, "beta": 0.02},
    source="Besiroglu, Erdil, Barnett, You (2024), Chinchilla Scaling: A replication attempt, "
           "arXiv:2404.10102",
    note="Refit of Hoffmann et al.'s Approach 3 on 240 points extracted from their Fig. 4 "
         "(the 5 highest-loss points dropped); Huber delta=1e-3 on log loss, L-BFGS from a "
         "4,500-point grid; standard errors from 4,000 bootstrap replicates. E is often "
         "quoted rounded as 1.82.",
)
"""Besiroglu et al. (2024)'s Chinchilla refit: ``E, A, B, alpha, beta`` and standard errors."""

HOFFMANN_2022 = PublishedFit(
    law="chinchilla",
    params={"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
    source="Hoffmann et al. (2022), Training Compute-Optimal Large Language Models, "
           "arXiv:2203.15556 (Approach 3)",
    note="As printed in the paper body (rounded); Besiroglu et al. show the rounding biases "
         "predictions.",
)
"""Hoffmann et al. (2022)'s published Approach-3 estimates (rounded, as printed)."""
