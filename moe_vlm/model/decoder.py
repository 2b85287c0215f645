"""Decoder-only LM whose FFNs follow a dense/MoE schedule. Readable top to bottom.

Legend: B batch, S sequence, D model width, V vocabulary, L layers.

Build with ``build_model`` (meta device, then ``init_weights`` in one place).
``forward`` takes token ids or ready embeddings (the VLM splices image embeddings in
before the decoder) and returns logits, the LM loss and each MoE layer's router output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.data.sample import IGNORE_INDEX
from moe_vlm.model.granularity import MoESizes, resolve_moe_sizes
from moe_vlm.model.layers import Attention, RMSNorm, SwiGLU, rope_inv_freq, rotary_tables
from moe_vlm.model.moe import MoELayer, real_rows
from moe_vlm.model.ternary_experts import TernaryExperts
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.recurrent import RouterGRU
from moe_vlm.routing.router import RouterOutput


def rope_scaling(cfg: ModelConfig) -> dict:
    """The ``rotary_tables`` scaling keywords of a model config."""
    return dict(scaling=cfg.rope_scaling, factor=cfg.rope_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_len=cfg.rope_original_max_len)


def ffn_schedule(n_layers: int, n_dense_layers: int, moe_every: int) -> list[bool]:
    """``is_moe`` per layer: the first ``n_dense_layers`` dense, then every
    ``moe_every``-th layer MoE starting with the first one after them (0 = none)."""
    return [moe_every > 0 and i >= n_dense_layers and (i - n_dense_layers) % moe_every == 0
            for i in range(n_layers)]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, head_dim: int, ffn: Union[SwiGLU, MoELayer]):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim,
                              cfg.qk_norm, cfg.norm_eps, cfg.qkv_bias)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, rows: Optional[Tensor] = None,
                loss_norm: Optional[LossNorm] = None, attn_mask: Optional[Tensor] = None,
                image_mask: Optional[Tensor] = None, state: Optional[Tensor] = None,
                gru: Optional[RouterGRU] = None) -> tuple[Tensor, Optional[RouterOutput]]:
        """``rows`` [T]: the real tokens' flat indices (None: no padding), and
        ``image_mask`` [B, S] (the image tokens: modality-aware routing), for the MoE FFN.
        ``state`` [T, R], ``gru``: the recurrent router's (``routing.recurrent``)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)  # [B, S, D]
        return self.feed_forward(x, rows, loss_norm, image_mask, state, gru)

    def feed_forward(self, x: Tensor, rows: Optional[Tensor] = None,
                     loss_norm: Optional[LossNorm] = None, image_mask: Optional[Tensor] = None,
                     state: Optional[Tensor] = None, gru: Optional[RouterGRU] = None
                     ) -> tuple[Tensor, Optional[RouterOutput]]:
        """The block's second half, x [B, S, D] -> x + FFN(norm(x)) (and the MoE router's
        output); shared by ``forward`` and the KV-cached decoding (``moe_vlm.model.kv_cache``)."""
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, r = self.ffn(h, loss_norm=loss_norm, rows=rows, is_image=image_mask,
                            state=state, gru=gru)
            return x + y, r
        return x + self.ffn(h), None


@dataclass
class ModelOutput:
    logits: Optional[Tensor]  # [B, S, V]; None when the loss was chunked (``model.loss_chunk``)
    loss: Optional[Tensor] = None  # lm_loss + routing_loss (what to backprop)
    # mean token cross-entropy over non-ignored labels (with ``loss_norm``: the sum over this
    # batch's targets / the step's target count, i.e. this micro-batch's share)
    lm_loss: Optional[Tensor] = None
    routing_loss: Optional[Tensor] = None  # sum of the MoE layers' weighted aux + z losses
    routing: list[RouterOutput] = field(default_factory=list)  # one per MoE layer, in order
    # a VLM's vision MoE layers (V-MoE), one per layer that ran, in block order; their
    # losses are in routing_loss
    vision_routing: list[RouterOutput] = field(default_factory=list)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, routing: RoutingConfig):
        super().__init__()
        self.cfg, self.moe_cfg, self.routing_cfg = cfg, moe, routing
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.moe_sizes: MoESizes = resolve_moe_sizes(moe, routing)
        self.schedule = ffn_schedule(cfg.n_layers, cfg.n_dense_layers, cfg.moe_every)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([
            Block(cfg, self.head_dim,
                  MoELayer(cfg.d_model, self.moe_sizes, routing, moe.backend) if is_moe
                  else SwiGLU(cfg.d_model, cfg.d_ff))
            for is_moe in self.schedule])
        if moe.ternary:  # MoTE: ternary routed experts; the shared experts stay full precision
            for layer in self.moe_layers():
                layer.experts.quant = TernaryExperts(moe.ternary_act_bits)
        # routing.recurrent (RMoE): the GRU cell every MoE layer's router shares
        self.router_gru: Optional[RouterGRU] = None
        if routing.recurrent and any(self.schedule):
            self.router_gru = RouterGRU(routing.recurrent_dim)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta, **rope_scaling(cfg))
        self.register_buffer("rope_cos", cos, persistent=False)  # [S_max, Hd/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> list[MoELayer]:
        return [blk.ffn for blk in self.layers if isinstance(blk.ffn, MoELayer)]

    def rotary_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, S, Hd/2] at float ``positions`` [B, S]: the angles
        ``rotary_tables`` makes (one fp32 product per entry), at any position."""
        inv_freq = rope_inv_freq(self.head_dim, self.cfg.rope_theta, device=positions.device,
                                 **rope_scaling(self.cfg))  # [Hd/2]
        ang = positions.float()[..., None] * inv_freq  # [B, S, Hd/2]
        return ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Every parameter and buffer is initialised here, deterministically from seed.

        Normal(0, init_std) everywhere; output projections (attention ``wo``, MLP and
        expert ``w_out``) scaled by 1/sqrt(2L) as in GPT-2; norms to 1; router bias 0; the
        recurrent router's GRU (``routing.recurrent``) last, its biases 0."""
        g = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        self.embed.weight.normal_(0.0, std, generator=g)
        for blk in self.layers:
            blk.attn_norm.init_weights()
            blk.ffn_norm.init_weights()
            a = blk.attn
            for lin in (a.wq, a.wk, a.wv):
                lin.weight.normal_(0.0, std, generator=g)
                if lin.bias is not None:
                    lin.bias.zero_()
            a.wo.weight.normal_(0.0, out_std, generator=g)
            for n in (a.q_norm, a.k_norm):
                if n is not None:
                    n.init_weights()
            ffn = blk.ffn
            if isinstance(ffn, MoELayer):
                ffn.router.init_weights(std, generator=g)
                ffn.experts.init_weights(std, out_std, generator=g)
                mlps = [ffn.shared] if ffn.shared is not None else []
            else:
                mlps = [ffn]
            for mlp in mlps:
                mlp.w_in.weight.normal_(0.0, std, generator=g)
                mlp.w_out.weight.normal_(0.0, out_std, generator=g)
        self.norm.init_weights()
        if self.head is not None:
            self.head.weight.normal_(0.0, std, generator=g)
        if self.router_gru is not None:  # after the rest: the plain model's draws are unchanged
            self.router_gru.init_weights(std, generator=g)
        cos, sin = rotary_tables(self.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                 self.rope_cos.device, **rope_scaling(self.cfg))
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, token_mask: Optional[Tensor] = None,
                loss_norm: Optional[LossNorm] = None, doc_ids: Optional[Tensor] = None,
                token_rows: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                image_mask: Optional[Tensor] = None) -> ModelOutput:
        """input_ids [B, S] or inputs_embeds [B, S, D]; labels [B, S] are the *next-token*
        targets of each position (already shifted), ``-100`` where no loss is taken.

        ``token_mask`` [B, S] bool, False at padding: padded positions are not routed by
        any MoE layer (right padding under a causal mask never reaches a real token's
        attention either). ``loss_norm``: the step's totals (``moe_vlm.routing.loss_norm``);
        with it every loss is this batch's share of the step loss, so the shares of all
        micro-batches and processes add up to the mean over the global batch. ``doc_ids``
        [B, S] (non-decreasing per row, ``data.doc_mask``): attention stays inside each
        document and rotary positions restart at every document start, so each document
        is computed as if it were alone. ``token_rows`` [T]: ``real_rows(token_mask)`` if
        the caller has it (the training loop finds it on the host from the CPU batch), else
        it is found here once for all MoE layers (one host sync on a device mask).
        ``position_ids`` [B, S] float: each token's rotary position, fractional allowed
        (V2PE, ``moe_vlm.data.v2pe``); None = 0, 1, 2, ...; integer positions give the
        table's angles bit for bit. ``image_mask`` [B, S] bool: the image tokens (the VLM
        passes it), for modality-aware routing (``routing.modality``).

        With ``model.loss_chunk`` > 0 and gradients on, the head and the cross-entropy run
        over that many positions at a time, each chunk recomputed in the backward, so the
        [B, S, V] logits are never held at once (``logits`` is then None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, D]
        s = x.shape[1]
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        routing: list[RouterOutput] = []
        if token_mask is not None and token_mask.shape != x.shape[:2]:
            raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, the batch "
                             f"{tuple(x.shape[:2])}; it needs one entry per token [B, S]")
        cos, sin, attn_mask = self.rope_cos, self.rope_sin, None
        if position_ids is not None:
            if doc_ids is not None:
                raise ValueError("pass doc_ids or position_ids, not both (documents restart "
                                 "their positions; V2PE sets them per token)")
            if position_ids.shape != x.shape[:2]:
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, the "
                                 f"batch {tuple(x.shape[:2])}; it needs one entry per token [B, S]")
            cos, sin = self.rotary_at(position_ids)  # [B, 1, S, Hd/2]
        if doc_ids is not None:
            if doc_ids.shape != x.shape[:2]:
                raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, the batch "
                                 f"{tuple(x.shape[:2])}; it needs one entry per token [B, S]")
            pos, attn_mask = document_positions(doc_ids)  # [B, S], [B, 1, S, S]
            cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # [B, 1, S, Hd/2]
        rows = token_rows
        if rows is None and token_mask is not None and any(self.schedule):
            rows = real_rows(token_mask)
        state = None  # routing.recurrent: the router state [T, R], carried across dense layers
        for blk in self.layers:
            x, r = blk(x, cos, sin, rows, loss_norm, attn_mask, image_mask, state, self.router_gru)
            if r is not None:
                routing.append(r)
                state = r.state
        x = self.norm(x)
        w = self.embed.weight if self.head is None else self.head.weight
        reduction = "mean" if loss_norm is None else "sum"  # sum: divided by the step's count
        if labels is not None and self.cfg.loss_chunk > 0 and torch.is_grad_enabled():
            out = ModelOutput(logits=None, routing=routing)
            out.lm_loss = chunked_cross_entropy(x.flatten(0, 1), w, labels.flatten(),
                                                self.cfg.loss_chunk, reduction)
        else:
            logits = F.linear(x, w)  # [B, S, V]
            out = ModelOutput(logits=logits, routing=routing)
            if labels is not None:
                out.lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                              ignore_index=IGNORE_INDEX, reduction=reduction)
        if labels is not None:
            if loss_norm is not None:
                out.lm_loss = out.lm_loss / max(1.0, loss_norm.n_targets)
            out.routing_loss = sum((r.loss for r in routing), torch.zeros((), device=x.device))
            out.loss = out.lm_loss + out.routing_loss
        return out


def _ce_sum(x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy of rows x [C, D] through the head w [V, D] (logits in fp32)."""
    return F.cross_entropy(F.linear(x, w).float(), labels, ignore_index=IGNORE_INDEX,
                           reduction="sum")


def chunked_cross_entropy(x: Tensor, w: Tensor, labels: Tensor, chunk: int,
                          reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(F.linear(x, w).float(), labels)`` for x [N, D], w [V, D], labels
    [N], computed ``chunk`` rows at a time under activation checkpointing: only one chunk's
    [chunk, V] logits live at once (forward or backward), instead of [N, V] in the compute
    dtype plus its fp32 copy, whose memory dominates at large vocabularies. The sum is
    taken chunk by chunk, so the loss equals the unchunked one to float rounding."""
    total = x.new_zeros((), dtype=torch.float32)
    for i in range(0, x.shape[0], chunk):
        total = total + checkpoint(_ce_sum, x[i:i + chunk], w, labels[i:i + chunk],
                                   use_reentrant=False)
    if reduction == "sum":
        return total
    return total / (labels != IGNORE_INDEX).sum()


def document_positions(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """doc_ids [B, S] (each row non-decreasing) -> (positions [B, S] counting from 0 at
    every document start, attention mask [B, 1, S, S]: causal and within a document)."""
    s = doc_ids.shape[1]
    idx = torch.arange(s, device=doc_ids.device)  # [S]
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # [B, S]
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, S]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, S, S]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return idx - first, (same & causal).unsqueeze(1)


def build_model(cfg: ModelConfig, moe: MoEConfig, routing: RoutingConfig,
                device: Union[str, torch.device] = "cpu", seed: int = 0) -> DecoderLM:
    """Construct on the meta device (no memory, no init work), materialise on ``device``,
    then initialise every weight once in ``init_weights``."""
    with torch.device("meta"):
        model = DecoderLM(cfg, moe, routing)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
