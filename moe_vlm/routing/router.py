"""The router module: gate + capacity + balancing losses + metrics, in one forward.

Legend: T tokens, D model width, E routed experts, K experts per token, N assignments.

Every gate is turned into a flat list of (token, expert, weight) assignments, so
token-choice with or without dropping and expert-choice all feed the same expert
backends. Losses and metrics are returned in a frozen ``RouterOutput``, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.config.sizes import image_experts
from moe_vlm.routing.balancing import CountReducer, router_z_loss, switch_aux_loss
from moe_vlm.routing.capacity import capacity_keep_mask, expert_capacity
from moe_vlm.routing.counts import count_ids
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.recurrent import RouterGRU
from moe_vlm.routing.gates import (
    expert_choice,
    expert_choice_capacity,
    round_robin_experts,
    sigmoid_topk,
    softmax_topk,
)
from moe_vlm.routing.metrics import routing_stats


# Given the selection the router would use ([T, K] expert ids; expert choice: [E, C] token
# ids), return the one to use instead, same shape. Set on a router from outside the model
# math: router replay (``moe_vlm.train.routing_replay``) and activation checkpointing
# (``moe_vlm.parallel.routing_reuse``); the router never sets it.
SelectHook = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class RouterOutput:
    token_idx: Tensor  # [N] int64, token (row of the router's input) each assignment reads/writes
    expert_idx: Tensor  # [N] int64
    weight: Tensor  # [N] combine weight (differentiable w.r.t. the router)
    counts: Tensor  # [E] float, assignments per expert after dropping (detached)
    aux_loss: Tensor  # scalar, balance loss (1.0 = balanced), unweighted: this call's share
    z_loss: Tensor  # scalar, unweighted: this call's share
    loss: Tensor  # scalar, aux_loss_coef * aux_loss + z_loss_coef * z_loss
    stats: dict[str, Tensor]  # detached metrics (routing.metrics); {} when not collected
    # routing.recurrent (RMoE): this layer's GRU state h_i [T, R], for the next MoE layer
    state: Optional[Tensor] = None


def normalizes_weights(cfg: RoutingConfig, k: int) -> bool:
    """Whether the gate normalises the k kept weights to sum 1 (softmax with
    ``routing.renormalize``, sigmoid always), after ``routing.normalize_top1`` at k=1."""
    if cfg.gate == "expert_choice":
        return False
    norm = cfg.renormalize if cfg.gate == "softmax_topk" else True
    return norm and (k > 1 or cfg.normalize_top1)


class Router(nn.Module):
    """Linear router ``[E, D]`` plus a selection bias buffer for aux-loss-free balancing.

    ``n_experts`` and ``top_k`` are the layer's resolved sizes (``moe_vlm.config.sizes``:
    at granularity m, m*E experts and m*K per token). The router keeps one top-k: ``cfg``
    is stored with ``top_k`` replaced by the resolved one, so ``self.cfg.top_k`` and
    ``self.top_k`` cannot disagree (``routing.top_k`` counts experts at granularity 1).

    ``count_reducer`` (set by ``moe_vlm.parallel`` when distributed) sums assignment
    counts over data-parallel ranks for the global-batch balance loss; the model math
    itself never touches ``torch.distributed``.

    ``routing.recurrent`` (RMoE, ``moe_vlm.routing.recurrent``): the logits come from a
    GRU state instead of x: ``proj`` [R, D] projects x, the decoder's shared GRU cell
    (passed to ``forward``) mixes it with the previous MoE layer's state, and ``weight``
    (and a modality router's ``image_weight``) is [E, R], read from that state.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, cfg: RoutingConfig):
        super().__init__()
        self.n_experts, self.cfg = n_experts, replace(cfg, top_k=top_k)
        self.proj: Optional[nn.Parameter] = None  # routing.recurrent: [R, D], x'_i = x_i W_proj^i
        if cfg.recurrent:
            self.proj = nn.Parameter(torch.empty(cfg.recurrent_dim, d_model))
        d_in = cfg.recurrent_dim if cfg.recurrent else d_model  # what the logits read: h or x
        self.weight = nn.Parameter(torch.empty(n_experts, d_in))  # [E, D] ([E, R] recurrent)
        self.register_buffer("bias", torch.zeros(n_experts))  # [E], selection only
        # routing.modality (Uni-MoE): a second router for image tokens, or the image experts
        self.image_weight: Optional[nn.Parameter] = None
        if cfg.modality == "routers":
            self.image_weight = nn.Parameter(torch.empty(n_experts, d_in))  # [E, D] / [E, R]
        if cfg.modality != "shared":  # filled by init_weights (the model is built on meta)
            self.register_buffer("image_expert", torch.zeros(n_experts, dtype=torch.bool),
                                 persistent=False)  # [E]: may an image token choose it
            # experts each modality may choose (text, image): the balance loss's E_g
            self.register_buffer("group_experts", torch.zeros(2, dtype=torch.long),
                                 persistent=False)  # [2]
        self.count_reducer: Optional[CountReducer] = None
        # False: ``stats`` comes back empty (the training loop turns the logging-only
        # metrics off between logging steps; ``routing.metrics.collect_routing_stats``)
        self.collect_stats = True
        self.select_hook: Optional[SelectHook] = None  # see ``SelectHook``; None = own choice

    @property
    def top_k(self) -> int:
        """Experts per token, resolved for granularity (the only top-k the router has)."""
        return self.cfg.top_k

    @torch.no_grad()
    def init_weights(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        self.weight.normal_(0.0, std, generator=generator)
        if self.proj is not None:
            self.proj.normal_(0.0, std, generator=generator)
        if self.image_weight is not None:
            self.image_weight.normal_(0.0, std, generator=generator)
        self.bias.zero_()
        if self.cfg.modality != "shared":
            groups = self.cfg.modality == "groups"
            mask = image_experts(self.n_experts, self.cfg.image_experts) if groups \
                else [True] * self.n_experts
            self.image_expert.copy_(torch.tensor(mask))
            n_img = sum(mask)
            self.group_experts.copy_(torch.tensor([self.n_experts - n_img if groups else
                                                   self.n_experts, n_img]))

    def forward(self, x: Tensor, n_seqs: int = 1, seq_ids: Optional[Tensor] = None,
                loss_norm: Optional[LossNorm] = None, is_image: Optional[Tensor] = None,
                state: Optional[Tensor] = None, gru: Optional[RouterGRU] = None) -> RouterOutput:
        """Route the rows of ``x`` [T, D]: real tokens only (the MoE layer drops padding
        before calling), sequence-major.

        ``seq_ids`` [T] int64 in ``[0, n_seqs)`` says which sequence each row belongs to
        (sequences may have different numbers of real tokens); None means ``n_seqs``
        equal consecutive runs. ``loss_norm``: the step's totals; the losses returned are
        then this call's share of the step's loss (``moe_vlm.routing.loss_norm``).
        Without it they are this call's own means. ``is_image`` [T] bool: which rows are
        image tokens, for ``routing.modality`` (None: all text). ``routing.recurrent``:
        ``gru`` is the decoder's shared cell and ``state`` [T, R] the previous MoE layer's
        ``RouterOutput.state`` for the same rows (None at the first MoE layer)."""
        cfg, n_exp, k = self.cfg, self.n_experts, self.top_k
        t = x.shape[0]
        dt = torch.promote_types(x.dtype, torch.float32)  # fp32 routing (fp64 stays fp64)
        feats, h = x.to(dt), None  # what the router's linear map reads: x, or h_i (RMoE)
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast would cast F.linear
            if self.proj is not None:
                feats = h = self._recurrent_state(feats, state, gru)  # [T, R]
            logits = F.linear(feats, self.weight.to(dt))  # [T, E] (DeepSeek-V3, Megatron)
        use_bias = self.bias if cfg.bias_update_rate > 0 else None
        dev = x.device
        zero = torch.zeros((), device=dev, dtype=dt)
        img = None
        if cfg.modality != "shared":
            img = is_image if is_image is not None else torch.zeros(t, dtype=torch.bool, device=dev)
            logits, use_bias = self._by_modality(feats, logits, img, use_bias)

        if cfg.gate == "expert_choice":
            cap = expert_choice_capacity(t, n_exp, k, cfg.capacity_factor) if t else 0
            ec = expert_choice(logits, cap)
            tokens, weights = ec.tokens, ec.weights  # [E, C]
            if self.select_hook is not None:  # the tokens given; weights: the scores there
                tokens = self._hooked(tokens)
                weights = ec.scores.t().gather(1, tokens)
            token_idx = tokens.reshape(-1)  # [E*C]
            expert_idx = torch.arange(n_exp, device=dev).repeat_interleave(cap)
            weight = weights.reshape(-1)
            scores, n_req = ec.scores, n_exp * cap
            aux = zero  # balanced by construction
        else:
            norm = normalizes_weights(cfg, k)
            after_drop = norm and cfg.capacity_factor is not None and cfg.renormalize_after_drop

            def gate(experts: Optional[Tensor] = None):
                if cfg.gate == "softmax_topk":
                    return softmax_topk(logits, k, norm and not after_drop, use_bias, experts)
                return sigmoid_topk(logits, k, use_bias, norm and not after_drop, experts)

            tk = gate()
            own = tk.experts  # [T, K] this router's choice
            selected = self._override(own)
            if selected is not None:  # replayed or forced: weights from the scores there
                tk = gate(selected)
            scores, n_req = tk.scores, t * k
            aux = zero
            if cfg.aux_loss_coef > 0:
                # DeepSeek-V3 eq. 18 (and Megatron): the balance loss counts the unbiased
                # top-k, not the bias-shifted selection; and the router's own top-k, not a
                # replayed or forced one (Megatron's replay counts its own top-k too).
                chosen = own if use_bias is None else scores.topk(k, dim=-1).indices
                aux = self._aux_loss(scores, chosen, n_seqs, seq_ids, loss_norm, img)
            token_idx = torch.arange(t, device=dev).repeat_interleave(k)  # [T*K]
            expert_idx = tk.experts.reshape(-1)
            w = tk.weights  # [T, K]
            if cfg.capacity_factor is not None:
                cap = expert_capacity(t, k, n_exp, cfg.capacity_factor)
                keep = capacity_keep_mask(tk.experts, n_exp, cap)  # [T, K]
                if after_drop:  # DeepSpeed / GShard: normalise over the kept experts
                    w = w * keep
                    w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
                keep = keep.reshape(-1)
                token_idx, expert_idx, weight = token_idx[keep], expert_idx[keep], w.reshape(-1)[keep]
            else:
                weight = w.reshape(-1)

        if cfg.routed_scaling != 1.0:
            weight = weight * cfg.routed_scaling
        z = zero
        if cfg.z_loss_coef > 0:
            z_den = loss_norm.n_tokens if loss_norm is not None else t
            z = router_z_loss(logits, reduction="sum") / max(1.0, z_den)
        counts = count_ids(expert_idx, n_exp).float()  # [E], no host sync
        loss = cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        stats: dict[str, Tensor] = {}
        if self.collect_stats:
            stats = routing_stats(counts, n_req, expert_idx.numel(), scores)
            stats["aux_loss"], stats["z_loss"] = aux.detach(), z.detach()
        return RouterOutput(token_idx, expert_idx, weight, counts.detach(), aux, z, loss, stats, h)

    def _recurrent_state(self, x: Tensor, state: Optional[Tensor], gru: Optional[RouterGRU]) -> Tensor:
        """RMoE: h_i = GRU(x_i W_proj^i, h_{i-1}) for x [T, D] in the routing dtype, state
        [T, R] or None (h_0 = 0) -> h_i [T, R]."""
        if gru is None:
            raise ValueError("routing.recurrent: this router needs the decoder's shared GRU cell "
                             "(DecoderLM.router_gru) passed as gru=")
        if state is not None and state.shape != (x.shape[0], self.cfg.recurrent_dim):
            raise ValueError(f"routing.recurrent: the previous layer's state has shape "
                             f"{tuple(state.shape)}, expected {(x.shape[0], self.cfg.recurrent_dim)} "
                             "(one row per routed token)")
        xp = F.linear(x, self.proj.to(x.dtype))  # [T, R]
        return gru(xp, None if state is None else state.to(x.dtype))

    def _override(self, own: Tensor) -> Optional[Tensor]:
        """The selection to use instead of the gate's ``own`` [T, K]: forced round-robin
        balance (``routing.force_balance``), then the hook's; None when neither is on.
        With a hook the gate always runs again at the selection, even an unchanged one, so
        a checkpointed block's forward and recompute save the same tensors."""
        if not self.cfg.force_balance and self.select_hook is None:
            return None
        selected = own
        if self.cfg.force_balance:
            selected = round_robin_experts(own.shape[0], self.top_k, self.n_experts, own.device)
        if self.select_hook is not None:
            selected = self._hooked(selected)
        return selected

    def _hooked(self, selected: Tensor) -> Tensor:
        """``select_hook(selected)``, checked: the same shape, as int64 on this device."""
        given = self.select_hook(selected)
        if given is selected:
            return given
        if given.shape != selected.shape:
            raise ValueError(f"a routing selection of shape {tuple(given.shape)} was given to a "
                             f"router that selects {tuple(selected.shape)} here: the tokens or "
                             "the MoE shape differ from when it was made")
        return given.to(device=selected.device, dtype=torch.long)

    def _by_modality(self, x: Tensor, logits: Tensor, img: Tensor, bias: Optional[Tensor]
                     ) -> tuple[Tensor, Optional[Tensor]]:
        """``routing.modality``: image rows take the image router's logits (``routers``),
        or each row's logits and selection are confined to its group (``groups``: -inf
        outside it, so the gate's probabilities there are 0 and top-k never picks them,
        balancing bias included). x [T, D] (h [T, R] with routing.recurrent), logits [T, E],
        img [T] -> (logits, bias)."""
        if self.image_weight is not None:
            with torch.autocast(x.device.type, enabled=False):
                img_logits = F.linear(x, self.image_weight.to(x.dtype))  # [T, E]
            return torch.where(img[:, None], img_logits, logits), bias
        allowed = img[:, None] == self.image_expert[None, :]  # [T, E]
        neg = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
        base = bias if bias is not None else torch.zeros_like(self.bias)
        return logits.masked_fill(~allowed, float("-inf")), torch.where(allowed, base, neg)

    def _aux_loss(self, scores: Tensor, chosen: Tensor, n_seqs: int, seq_ids: Optional[Tensor],
                  loss_norm: Optional[LossNorm], img: Optional[Tensor] = None) -> Tensor:
        """This call's share of the step's balance loss, by ``routing.aux_loss_scope``;
        with ``routing.modality`` (``img`` [T]) the loss is the mean of the two
        modalities' losses, each over the experts its tokens may choose."""
        scope, n_exp = self.cfg.aux_loss_scope, self.n_experts
        if img is not None:  # micro_batch or global_batch scope (validation)
            aux = switch_aux_loss(scores, chosen, n_exp, n_groups=2, group_ids=img.long(),
                                  group_experts=self.group_experts, count_reducer=self.count_reducer
                                  if scope == "global_batch" else None)
            if loss_norm is None:
                return aux
            return aux / (loss_norm.n_micro * (1 if scope == "global_batch" else loss_norm.n_ranks))
        if scope == "sequence":
            total = switch_aux_loss(scores, chosen, n_exp, n_seqs, group_ids=seq_ids,
                                    reduction="sum" if loss_norm is not None else "mean")
            return total / max(1.0, loss_norm.n_seqs) if loss_norm is not None else total
        if scope == "global_batch":
            aux = switch_aux_loss(scores, chosen, n_exp, count_reducer=self.count_reducer)
            return aux / loss_norm.n_micro if loss_norm is not None else aux
        aux = switch_aux_loss(scores, chosen, n_exp)  # micro_batch: per micro-batch by design
        return aux / (loss_norm.n_micro * loss_norm.n_ranks) if loss_norm is not None else aux
