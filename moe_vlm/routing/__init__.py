"""Routing suite: gates, balancing losses, capacity, metrics and the Router module."""

from moe_vlm.routing.balancing import router_z_loss, switch_aux_loss, update_balance_bias
from moe_vlm.routing.capacity import capacity_keep_mask, expert_capacity
from moe_vlm.routing.gates import (
    ExpertChoice,
    TopKChoice,
    expert_choice,
    expert_choice_capacity,
    sigmoid_topk,
    softmax_topk,
)
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.metrics import routing_stats
from moe_vlm.routing.router import Router, RouterOutput

__all__ = [
    "ExpertChoice", "LossNorm", "Router", "RouterOutput", "TopKChoice", "capacity_keep_mask",
    "expert_capacity", "expert_choice", "expert_choice_capacity", "router_z_loss",
    "routing_stats", "sigmoid_topk", "softmax_topk", "switch_aux_loss", "update_balance_bias",
]
