"""Dense building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP, the GELU
activations of ViT MLPs.

Legend: B batch, S sequence, D model width, H query heads, G key/value heads,
Hd head dim, F MLP width.
"""

from __future__ import annotations

import math

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_len: int = 8192, device: Optional[torch.device] = None) -> Tensor:
    """Inverse frequencies [Hd/2], with transformers' ``linear`` or ``llama3`` scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":  # Llama 3.1: stretch low frequencies, keep high, blend between
        low_wavelen = original_max_len / low_freq_factor
        high_wavelen = original_max_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    if scaling != "none":
        raise ValueError(f"unknown rope scaling {scaling!r}; use none, linear or llama3")
    return inv_freq


def rotary_tables(head_dim: int, max_seq_len: int, theta: float,
                  device: Optional[torch.device] = None, **scaling) -> tuple[Tensor, Tensor]:
    """cos, sin tables [S, Hd/2] in fp32 (rotate-half convention, as Llama/Qwen);
    ``scaling``: keyword arguments of ``rope_inv_freq``."""
    inv_freq = rope_inv_freq(head_dim, theta, device=device, **scaling)  # [Hd/2]
    pos = torch.arange(max_seq_len, device=device).float()
    ang = torch.outer(pos, inv_freq)  # [S, Hd/2]
    return ang.cos(), ang.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, S, Hd]; cos/sin [S, Hd/2] (or [B, 1, S, Hd/2]: per-token positions).
    Rotate-half form."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, H, S, Hd/2] each
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary positions via SDPA."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 qk_norm: bool = False, norm_eps: float = 1e-5, qkv_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """x [B, S, D]; cos/sin the rotary table [S_max, Hd/2] (positions 0..S-1) or per
        token [B, 1, S, Hd/2]; ``attn_mask`` [B, 1, S, S] bool (True = may attend), already
        causal, or None for plain causal attention."""
        q, k, v = self.project(x, cos, sin)
        return self.attend(q, k, v, attn_mask)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, D] -> q [B, H, S, Hd], k, v [B, G, S, Hd]: projected, qk-normed and
        rotated (k and v before the GQA repeat: what a KV cache stores)."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)  # [B, S, H, Hd]
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, G, Hd]
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, G, Hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H|G, S, Hd]
        if cos.dim() == 2:
            cos, sin = cos[:s], sin[:s]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """q [B, H, Sq, Hd] over k, v [B, G, Sk, Hd] -> [B, Sq, D]; ``attn_mask`` [B, 1, Sq, Sk]
        bool (True = may attend), or None for causal attention with Sq = Sk."""
        b, _, s, _ = q.shape
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, Hd]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))  # [B, S, D]


class SwiGLU(nn.Module):
    """``w_out(silu(x W_gate) * (x W_up))``; gate and up share one ``[2F, D]`` weight
    (rows ``:F`` gate, ``F:`` up) so they run as one GEMM."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.d_hidden = d_hidden
        self.w_in = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)  # [..., F] each
        return self.w_out(F.silu(gate) * up)


GELU_ACTS = ("gelu", "gelu_tanh", "quick_gelu")  # ViT MLP activations (SigLIP, CLIP)


def gelu_act(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise activation ``name`` of a ViT MLP: ``gelu`` (erf), ``gelu_tanh``
    (SigLIP's tanh approximation), ``quick_gelu`` (CLIP's sigmoid approximation). One
    definition for the vision tower's dense MLPs and the experts that copy them, so an
    expert holding an MLP's weights computes its function exactly."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}; choose one of {list(GELU_ACTS)}")
