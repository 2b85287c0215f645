"""Scaling-law fits: Chinchilla (Hoffmann et al. 2022, refit as Besiroglu et al. 2024),
fine-grained MoE (Krajewski et al. 2024) and routed models (Clark et al. 2022), with
bootstrap confidence intervals, compute-optimal allocation and IsoFLOP analysis; and the
hyperparameter law of the optimal learning rate and batch size (Step Law, Li et al. 2025).

Pure numpy/scipy: imports no model code and no torch.
"""

from moe_vlm.scaling.chinchilla_data import CHINCHILLA_CSV, load_chinchilla_data
from moe_vlm.scaling.fit import (CHINCHILLA_GRID, CLARK_GRID, KRAJEWSKI_GRID, fit_chinchilla,
                                 fit_clark, fit_krajewski)
from moe_vlm.scaling.laws import LAW_INPUTS, LAWS, chinchilla_loss, clark_e_hat, clark_loss, krajewski_loss
from moe_vlm.scaling.optimal import ComputeOptimal, IsoFlopResult, compute_optimal, isoflop_fit
from moe_vlm.scaling.published import BESIROGLU_2024, HOFFMANN_2022, PublishedFit
from moe_vlm.scaling.result import FitResult
from moe_vlm.scaling.step_law import LI_2025, StepLawFit, fit_step_law, near_optimal

__all__ = [
    "fit_chinchilla", "fit_krajewski", "fit_clark", "FitResult",
    "fit_step_law", "StepLawFit", "near_optimal", "LI_2025",
    "compute_optimal", "ComputeOptimal", "isoflop_fit", "IsoFlopResult",
    "chinchilla_loss", "krajewski_loss", "clark_loss", "clark_e_hat", "LAWS", "LAW_INPUTS",
    "BESIROGLU_2024", "HOFFMANN_2022", "PublishedFit",
    "load_chinchilla_data", "CHINCHILLA_CSV",
    "CHINCHILLA_GRID", "KRAJEWSKI_GRID", "CLARK_GRID",
]
