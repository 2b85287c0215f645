"""Training runs: optimiser and schedules, checkpoints, run directory, the loop."""

from moe_vlm.train.evaluate import evaluate
from moe_vlm.train.loop import NonFiniteLossError, train
from moe_vlm.train.optim import build_optimizer, lr_at, param_groups

__all__ = ["NonFiniteLossError", "build_optimizer", "evaluate", "lr_at", "param_groups", "train"]
