"""Triton grouped-GEMM and token permute/unpermute kernels (imports only torch + triton).

The kernels arrive with the kernels issue; ``moe_vlm.model.experts`` already looks for
``triton_kernels.moe_experts`` and falls back to ``grouped_mm`` / ``torch`` until then.
"""
