"""Input makers shared by the kernel tests and the benchmarks.

Legend: T tokens, D model width, F expert width, E experts, K experts per token,
N = T*K assignments, R rows of a grouped GEMM.

Routing patterns cover what kernels must survive: uniform and Zipf-skewed popularity,
empty experts, every token on one expert, a single token.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SKEWS = ("uniform", "zipf", "one_expert", "half_empty")


def make_topk(t: int, e: int, k: int, skew: str = "uniform", seed: int = 0,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token-choice routing: ``experts [T, K]`` (int64, K distinct per token) and
    ``weights [T, K]`` (fp32, positive, rows sum to 1).

    skew: ``uniform``; ``zipf`` (popularity 1/rank^1.2); ``one_expert`` (every token's first
    choice is expert E-1, so one group holds T rows; needs K=1 for all rows on it);
    ``half_empty`` (only even experts are used; needs K <= ceil(E/2))."""
    if k > e:
        raise ValueError(f"top-k {k} > experts {e}")
    gen = torch.Generator().manual_seed(seed)
    if skew == "uniform":
        pop = torch.ones(e)
    elif skew == "zipf":
        pop = 1.0 / torch.arange(1, e + 1).float() ** 1.2
    elif skew == "half_empty":
        pop = (torch.arange(e) % 2 == 0).float()
        if int(pop.sum()) < k:
            raise ValueError(f"half_empty needs K <= {int(pop.sum())}")
    elif skew == "one_expert":
        pop = torch.full((e,), 1e-3)
        pop[-1] = 1e6
    else:
        raise ValueError(f"unknown skew {skew!r}; choose from {SKEWS}")
    experts = torch.multinomial(pop.expand(t, e), k, replacement=False, generator=gen)  # [T, K]
    if skew == "one_expert":
        experts[:, 0] = e - 1
        if k > 1:  # keep choices distinct: the others avoid E-1
            rest = torch.stack([torch.randperm(e - 1, generator=gen)[: k - 1] for _ in range(t)])
            experts[:, 1:] = rest
    weights = torch.rand(t, k, generator=gen) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    return experts.to(device), weights.to(device)


def flat_assignments(experts: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``experts/weights [T, K]`` -> the router's flat form ``token_idx, expert_idx, weight [N]``."""
    t, k = experts.shape
    token_idx = torch.arange(t, device=experts.device).repeat_interleave(k)  # [N]
    return token_idx, experts.reshape(-1), weights.reshape(-1)


def group_offsets(counts: Tensor) -> Tensor:
    """``counts [E]`` -> int32 cumulative group ends ``offsets [E]``."""
    return torch.cumsum(counts, 0).to(torch.int32)


def make_grouped_gemm(counts: list[int] | Tensor, k: int, n: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", seed: int = 0
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs of ``grouped_gemm``: ``x [R, K]``, ``w [E, K, N]``, ``offsets [E]`` (int32),
    scaled so outputs are O(1) in any dtype."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    rows, e = int(counts.sum()), counts.numel()
    x = torch.randn(rows, k, generator=gen)  # [R, K]
    w = torch.randn(e, k, n, generator=gen) * k**-0.5  # [E, K, N]
    return x.to(device, dtype), w.to(device, dtype), group_offsets(counts).to(device)


def make_moe(t: int, d: int, f: int, e: int, k: int, skew: str = "uniform",
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             seed: int = 0, requires_grad: bool = False) -> dict[str, Tensor]:
    """A routed SwiGLU expert problem: ``x [T, D]``, ``experts/weights [T, K]``,
    ``w_in [E, D, 2F]`` (gate | up), ``w_out [E, F, D]``, and ``dy [T, D]`` for backward."""
    gen = torch.Generator().manual_seed(seed + 1)
    experts, weights = make_topk(t, e, k, skew, seed, device)
    out = {
        "x": torch.randn(t, d, generator=gen),
        "w_in": torch.randn(e, d, 2 * f, generator=gen) * d**-0.5,
        "w_out": torch.randn(e, f, d, generator=gen) * f**-0.5,
        "dy": torch.randn(t, d, generator=gen),
    }
    out = {n: v.to(device, dtype) for n, v in out.items()}
    out["weights"] = weights.to(dtype)
    out["experts"] = experts
    if requires_grad:
        for n in ("x", "w_in", "w_out", "weights"):
            out[n].requires_grad_()
    return out


def skew_counts(rows: int, e: int, skew: str, seed: int = 0) -> Tensor:
    """Group sizes summing to ``rows`` (grouped-GEMM benchmarks without a router)."""
    gen = torch.Generator().manual_seed(seed)
    if skew == "uniform":
        pop: Optional[Tensor] = torch.ones(e)
    elif skew == "zipf":
        pop = 1.0 / torch.arange(1, e + 1).float() ** 1.2
    else:
        raise ValueError(f"skew_counts: choose uniform or zipf, got {skew!r}")
    draws = torch.multinomial(pop, rows, replacement=True, generator=gen)
    return torch.bincount(draws, minlength=e)


# Test tolerances per compute dtype (atol, rtol), one table for every kernel test: fp32
# kernels accumulate in a different order than the reference; bf16/fp16 kernels round
# intermediate tensors (h, act) like the reference does, but at different points.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
