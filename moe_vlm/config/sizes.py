"""Fine-grained expert sizes (DeepSeekMoE; Krajewski et al. 2024's granularity G): the one
place the resolved MoE layer's sizes are computed, read by validation (so its limits are
the model's) and by the model (``moe_vlm.model.granularity`` re-exports it).

Splitting each of E experts of width F into m narrower ones gives m*E experts of
width F/m, of which m*K are active: the active FLOPs and parameter counts stay equal.
Pure arithmetic on the config, no torch, so ``moe_vlm.config`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_vlm.config.schema import MoEConfig, RoutingConfig


@dataclass(frozen=True)
class MoESizes:
    n_experts: int  # routed experts
    d_expert: int  # width of one routed expert
    top_k: int  # routed experts per token
    d_shared: int  # total width of the shared experts (0 = none)
    granularity: int


def fine_grained(n_experts: int, d_expert: int, top_k: int, m: int) -> tuple[int, int, int]:
    """(E, F, K) at granularity 1 -> (m*E, F/m, m*K)."""
    if m < 1 or d_expert % m:
        raise ValueError(f"granularity {m} must be >= 1 and divide the expert width {d_expert}")
    return n_experts * m, d_expert // m, top_k * m


def resolve_moe_sizes(moe: MoEConfig, routing: RoutingConfig) -> MoESizes:
    """Sizes of the MoE layer a config builds. Shared experts keep their total width
    ``n_shared * d_expert`` (equivalently m*n_shared experts of width d_expert/m)."""
    e, f, k = fine_grained(moe.n_experts, moe.d_expert, routing.top_k, moe.granularity)
    return MoESizes(e, f, k, moe.n_shared * moe.d_expert, moe.granularity)


def image_experts(n_experts: int, fraction: float) -> list[bool]:
    """``routing.modality=groups``: which of ``n_experts`` routed experts serve image tokens
    (the rest serve text): ``round(fraction * E)`` of them, spread evenly over the expert
    indices (Bresenham), so that expert parallelism, which gives each process a contiguous
    range of experts, gives every process its share of both groups."""
    n_img = round(fraction * n_experts)
    return [(e + 1) * n_img // n_experts > e * n_img // n_experts for e in range(n_experts)]
