"""Triton kernels for MoE expert compute (imports only torch + triton, never ``moe_vlm``).

- ``grouped_gemm(x, w, offsets)``: per-expert GEMMs over expert-sorted rows, one
  persistent launch, forward and backward (``grouped_gemm.py``).
- ``permute(x, experts, n_experts)`` / ``unpermute(rows, perm, weights)``: token order
  <-> expert order, with the weighted combine fused into unpermute (``permute.py``);
  ``n_experts`` is required, so ``offsets`` always has E entries.
- ``moe_experts(x, token_idx, expert_idx, weight, w_in, w_out)``: the fused SwiGLU MoE
  expert function (gather fused into GEMM 1, SwiGLU in its epilogue, GEMM 2, combine),
  the ``triton`` expert backend of the model (``moe.py``); ``moe_experts_topk`` takes
  ``experts/weights [T, K]`` directly; ``sorted_experts(rows, offsets, w_in, w_out)`` is the
  same SwiGLU on rows a dispatcher already sorted by expert (expert parallelism).

Each op has a plain-torch ``*_reference`` twin; ``inputs.py`` makes the inputs that
tests and benchmarks share. Kernels run compiled on CUDA and on the CPU under
``TRITON_INTERPRET=1`` (slow; for tests at small sizes).
"""

from triton_kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference
from triton_kernels.moe import (moe_experts, moe_experts_reference, moe_experts_topk, sorted_experts,
                                sorted_experts_reference)
from triton_kernels.permute import permute, permute_reference, unpermute, unpermute_reference

__all__ = [
    "grouped_gemm", "grouped_gemm_reference",
    "moe_experts", "moe_experts_reference", "moe_experts_topk", "sorted_experts",
    "sorted_experts_reference",
    "permute", "permute_reference", "unpermute", "unpermute_reference",
]
