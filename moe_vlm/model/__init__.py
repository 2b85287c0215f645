"""Decoder LM with dense / sparse-MoE FFNs. No torch.distributed in here."""

from moe_vlm.model.counting import ParamCounts, count_params, flops_per_token
from moe_vlm.model.decoder import DecoderLM, ModelOutput, build_model, ffn_schedule
from moe_vlm.model.dispatch import LocalDispatcher
from moe_vlm.model.experts import (
    GroupedExperts,
    grouped_mm_supported,
    resolve_backend,
    swiglu_grouped_mm,
    swiglu_torch,
)
from moe_vlm.model.granularity import MoESizes, fine_grained, resolve_moe_sizes
from moe_vlm.model.layers import Attention, RMSNorm, SwiGLU
from moe_vlm.model.moe import MoELayer

__all__ = [
    "Attention", "DecoderLM", "GroupedExperts", "LocalDispatcher", "MoELayer", "MoESizes",
    "ModelOutput", "ParamCounts", "RMSNorm", "SwiGLU", "build_model", "count_params",
    "ffn_schedule", "fine_grained", "flops_per_token", "grouped_mm_supported",
    "resolve_backend", "resolve_moe_sizes", "swiglu_grouped_mm", "swiglu_torch",
]
