"""Layerwise recurrent router state (RMoE; Qiu et al. 2024, arXiv 2408.06793).

Legend: T real tokens, D model width, R recurrent width (``routing.recurrent_dim``),
E routed experts.

For MoE layer i (counting MoE layers only; dense layers in between pass the state on):

    x'_i     = x_i W_proj^i                 [T, R]  per-layer projection (no bias)
    h_i      = GRU(x'_i, h_{i-1}), h_0 = 0  [T, R]  one GRU cell shared by all layers
    logits_i = h_i W_router^i               [T, E]  per-layer router (``Router.weight``)

The GRU is ``torch.nn.GRUCell``'s (gate order r, z, n in the stacked weights):

    r = sigmoid(W_ir x' + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x' + b_iz + W_hz h + b_hz)
    n = tanh(W_in x' + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

The recurrence runs over layers, not over the sequence: every token is independent, so a
layer costs two [T, R] x [R, 3R] matmuls on top of the projection. As in the authors' code
(qiuzh20/RMoE) the cell is shared across layers and takes ``x'`` of width R (input width =
hidden width). The cell lives once in the decoder (``DecoderLM.router_gru``) and is handed
to each MoE layer's router, so the state dict holds it once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RouterGRU(nn.Module):
    """The cross-layer GRU cell of the recurrent router, in ``nn.GRUCell``'s layout:
    ``weight_ih``/``weight_hh`` [3R, R] (rows: r, z, n), ``bias_ih``/``bias_hh`` [3R].

    Written out with ``F.linear`` rather than wrapping ``nn.GRUCell`` so the router can
    run it in fp32 under autocast and on zero rows, and so the math reads as the paper's."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight_ih = nn.Parameter(torch.empty(3 * dim, dim))  # [3R, R]
        self.weight_hh = nn.Parameter(torch.empty(3 * dim, dim))  # [3R, R]
        self.bias_ih = nn.Parameter(torch.empty(3 * dim))  # [3R]
        self.bias_hh = nn.Parameter(torch.empty(3 * dim))  # [3R]

    @torch.no_grad()
    def init_weights(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        """Weights Normal(0, std) (the authors' code draws every GRU tensor from the
        model's init); biases 0, as every other bias here, so h starts unbiased."""
        self.weight_ih.normal_(0.0, std, generator=generator)
        self.weight_hh.normal_(0.0, std, generator=generator)
        self.bias_ih.zero_()
        self.bias_hh.zero_()

    def forward(self, x: Tensor, h: Optional[Tensor]) -> Tensor:
        """x [T, R] (the projected router input), h [T, R] the previous MoE layer's state
        (None at the first MoE layer: h_0 = 0) -> the new state [T, R], in x's dtype."""
        if h is None:
            h = torch.zeros_like(x)
        dt = x.dtype
        gi = F.linear(x, self.weight_ih.to(dt), self.bias_ih.to(dt))  # [T, 3R]
        gh = F.linear(h, self.weight_hh.to(dt), self.bias_hh.to(dt))  # [T, 3R]
        i_r, i_z, i_n = gi.chunk(3, dim=-1)  # [T, R] each
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h
