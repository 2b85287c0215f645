"""Per-layer routing metrics: of one router call (``routing_stats``, returned as detached
values), and of a training step (``step_routing_metrics``: the calls of all its
micro-batches and processes aggregated, load split by modality).

Legend: T real tokens routed, E experts.

Besides the per-call means, each call returns the *sums* behind them (``n_tokens``,
``entropy_sum``, ``n_requested``, ``n_kept``), so a training step can aggregate its
micro-batches and processes exactly: the step's entropy is the mean over all its real
tokens, its drop fraction the fraction of all its requested assignments, whatever the
micro-batching.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from moe_vlm.routing.router import RouterOutput

Modality = Optional[tuple[Tensor, Tensor]]  # (is_image, is_text) [T] of one micro-batch


@torch.no_grad()
def routing_stats(counts: Tensor, n_requested: int, n_kept: int, scores: Tensor) -> dict[str, Tensor]:
    """Metrics of one MoE layer for one forward pass over real (unpadded) tokens.

    counts [E]: assignments each expert processed (after dropping; they sum to ``n_kept``,
    which is T*K only when nothing was dropped);
    n_requested / n_kept: assignments asked for by the gate / actually computed;
    scores [T, E]: per-token router distribution (rows sum to 1).

    - ``tokens_per_expert`` [E]
    - ``max_violation``: max load / mean load - 1 (0 = perfectly balanced)
    - ``drop_frac``: fraction of requested assignments that were dropped
    - ``entropy``: mean router entropy in nats (log E = uniform, 0 = one-hot)
    - sums for exact aggregation: ``n_tokens``, ``entropy_sum``, ``n_requested``, ``n_kept``
    """
    counts = counts.float()
    dev = counts.device
    mean = counts.mean().clamp_min(1e-9)
    p = scores.float()
    ent_sum = -(p * torch.log(p.clamp_min(1e-20))).sum()
    n_tok = p.shape[0]
    drop = 1.0 - n_kept / n_requested if n_requested else 0.0
    return {
        "tokens_per_expert": counts.detach(),
        "max_violation": (counts.max() / mean - 1.0).detach() if counts.numel() else
        torch.zeros((), device=dev),
        "drop_frac": _scalar(drop, dev),
        "entropy": (ent_sum / max(1, n_tok)).detach(),
        "entropy_sum": ent_sum.detach(),
        "n_tokens": _scalar(n_tok, dev),
        "n_requested": _scalar(n_requested, dev),
        "n_kept": _scalar(n_kept, dev),
    }


def _scalar(value: float, device: torch.device) -> Tensor:
    """A float32 scalar made on ``device`` by a fill (``torch.tensor(v, device=cuda)``
    copies from the host, which waits)."""
    return torch.full((), float(value), dtype=torch.float32, device=device)


def collect_routing_stats(model: torch.nn.Module, enabled: bool) -> None:
    """Turn the routers' logging-only metrics (``routing_stats``: entropy over the scores,
    loads, drops) on or off for every router of ``model``. Counts and losses are always
    made: balancing needs them every step."""
    for m in model.modules():
        if hasattr(m, "collect_stats"):
            m.collect_stats = enabled


def modality_masks(input_ids: Tensor, token_mask: Optional[Tensor], image_id: int
                   ) -> tuple[Tensor, Tensor]:
    """(is_image, is_text) [T] over the real tokens of a batch ``input_ids`` [B, S], in the
    order the MoE layers route them (row-major ``input_ids[token_mask]``), so
    ``RouterOutput.token_idx`` indexes them."""
    ids = input_ids.flatten() if token_mask is None else input_ids[token_mask]  # [T]
    is_img = ids == image_id
    return is_img, ~is_img


_SUMS = ("entropy_sum", "n_tokens", "n_requested", "n_kept", "aux_loss", "z_loss")


@torch.no_grad()
def step_routing_metrics(layer_ids: Sequence[int], routing: Sequence[Sequence["RouterOutput"]],
                         modality: Sequence[Modality],
                         reduce: Callable[[Tensor], Tensor] = lambda t: t,
                         prefix: str = "layer_") -> dict[str, dict]:
    """One step's per-layer metrics over its real tokens, from the router outputs
    ``routing[micro-batch][j]`` of MoE layer ``layer_ids[j]``: loads summed, entropy the
    mean over all routed tokens, drop fraction over all requested assignments, aux/z losses
    the step's values (the sum of the micro-batches' shares). ``reduce`` sums a tensor over
    the processes (one call per layer). So the metrics do not depend on micro-batching or
    on the layout.

    With ``modality`` masks (image-text data) each layer also reports its load split by
    modality (``tokens_per_expert_image`` / ``_text``); with LSH-MoE (``parallel.lsh``) it
    reports the rows sent, ``lsh_centroids`` / ``lsh_rows`` = ``lsh_compression``. Rows are keyed ``prefix + id``
    (``layer_<i>``; the vision tower's MoE layers use ``vision_layer_<i>``)."""
    has_modality = modality[0] is not None
    out = {}
    for j, layer in enumerate(layer_ids):
        rs = [micro[j] for micro in routing]
        counts = torch.stack([r.counts for r in rs]).sum(0).float()  # [E]
        n_exp = counts.numel()
        stats = torch.stack([torch.stack([r.stats[k].detach().float() for r in rs]).sum()
                             for k in _SUMS]).to(counts.device)  # [6]
        parts = [counts, stats]
        lsh = "lsh_rows" in rs[0].stats  # LSH-MoE (moe_vlm.model.lsh_dispatch): rows sent
        if lsh:
            parts.append(torch.stack([torch.stack([r.stats[k].float() for r in rs]).sum()
                                      for k in ("lsh_centroids", "lsh_rows")]).to(counts.device))
        if has_modality:
            img = torch.zeros(n_exp, device=counts.device)
            txt = torch.zeros(n_exp, device=counts.device)
            for r, (is_img, is_txt) in zip(rs, modality):
                img += torch.bincount(r.expert_idx[is_img[r.token_idx]], minlength=n_exp)
                txt += torch.bincount(r.expert_idx[is_txt[r.token_idx]], minlength=n_exp)
            parts += [img, txt]
        flat = reduce(torch.cat(parts).double())  # one reduction per layer
        counts = flat[:n_exp]
        ent, n_tok, n_req, n_kept, aux, z = flat[n_exp:n_exp + 6].tolist()  # host sync
        mean = counts.mean().clamp_min(1e-9)
        row = {"tokens_per_expert": counts.tolist(),
               "max_violation": (counts.max() / mean - 1).item(),
               "drop_frac": 1.0 - n_kept / n_req if n_req else 0.0,
               "entropy": ent / max(1.0, n_tok), "aux_loss": aux, "z_loss": z}
        at = n_exp + 6
        if lsh:
            row["lsh_centroids"], row["lsh_rows"] = flat[at:at + 2].tolist()
            row["lsh_compression"] = row["lsh_centroids"] / max(1.0, row["lsh_rows"])
            at += 2
        if has_modality:
            row["tokens_per_expert_image"] = flat[at:at + n_exp].tolist()
            row["tokens_per_expert_text"] = flat[at + n_exp:].tolist()
        out[f"{prefix}{layer}"] = row
    return out
