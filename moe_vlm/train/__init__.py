"""Training runs: optimiser and schedules, checkpoints, run directory, the loop."""

from moe_vlm.train.loop import NonFiniteLossError, evaluate, train
from moe_vlm.train.optim import build_optimizer, lr_at, param_groups

__all__ = ["NonFiniteLossError", "build_optimizer", "evaluate", "lr_at", "param_groups", "train"]
