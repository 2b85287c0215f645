"""Padding never reaches the router, the losses or the metrics, and micro-batching does not
change the step loss or its gradients (``LossNorm``).

Legend: B batch, S sequence, T real tokens, D model width, E experts, K top-k.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.data.sample import IGNORE_INDEX, collate
from moe_vlm.model.decoder import build_model
from moe_vlm.model.experts import grouped_mm_supported
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.moe import MoELayer
from moe_vlm.parallel.runtime import Layout
from moe_vlm.routing import LossNorm
from moe_vlm.train.step import step_loss_norm

ROUTINGS = {  # every gate, every balance scope, bias, capacity dropping, z-loss
    "softmax_seq_z": dict(gate="softmax_topk", aux_loss_scope="sequence", z_loss_coef=0.01),
    "softmax_micro_cap": dict(gate="softmax_topk", capacity_factor=1.0, aux_loss_coef=0.1),
    "sigmoid_bias_seq": dict(gate="sigmoid_topk", bias_update_rate=0.01, aux_loss_scope="sequence"),
    "global_after_drop": dict(gate="softmax_topk", aux_loss_scope="global_batch",
                              capacity_factor=1.25, renormalize_after_drop=True),
    "expert_choice": dict(gate="expert_choice", aux_loss_coef=0.0),
}
STATS = ("tokens_per_expert", "max_violation", "drop_frac", "entropy", "entropy_sum",
         "n_tokens", "n_requested", "n_kept", "aux_loss", "z_loss")


def _layer(routing: dict, backend: str = "torch", e: int = 8, k: int = 2, d: int = 16,
           shared: int = 8, seed: int = 0) -> MoELayer:
    routing = {"aux_loss_coef": 0.05, **routing}
    layer = MoELayer(d, MoESizes(e, 8, k, shared, 1), RoutingConfig(top_k=k, **routing), backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        layer.router.bias.copy_(torch.randn(e, generator=g) * 0.05)
    return layer


def _backends() -> list[str]:
    out = ["torch"]
    if grouped_mm_supported(torch.device("cpu"), torch.float32, 16, 8) is None:
        out.append("grouped_mm")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_padding_is_not_routed_and_changes_nothing(name, backend):
    """The same real tokens with and without 5 garbage pad positions per row: no assignment
    for a pad, identical routing, outputs, losses, stats and gradients."""
    b, s, pad, d = 3, 7, 5, 16
    layer = _layer(ROUTINGS[name], backend)
    ref_layer = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, s, d, generator=g, requires_grad=True)  # [B, S, D] no padding
    junk = torch.randn(b, pad, d, generator=g) * 30  # would grab experts if routed
    xp = torch.cat([x, junk], 1)  # [B, S + pad, D]
    mask = torch.zeros(b, s + pad, dtype=torch.bool)
    mask[:, :s] = True

    y, r = layer(xp, mask)
    y_ref, r_ref = ref_layer(x)
    assert r.token_idx.max() < b * s and r.counts.sum() == r_ref.counts.sum()
    for f in ("token_idx", "expert_idx"):
        assert torch.equal(getattr(r, f), getattr(r_ref, f)), f
    torch.testing.assert_close(r.weight, r_ref.weight)
    torch.testing.assert_close(y[:, :s], y_ref)
    assert torch.equal(y[:, s:], torch.zeros_like(y[:, s:]))  # pads get nothing, not even shared
    for key in STATS:
        torch.testing.assert_close(r.stats[key], r_ref.stats[key], msg=key)
    torch.testing.assert_close(r.loss, r_ref.loss)
    coef = torch.randn(b, s, d, generator=g)
    ((y[:, :s] * coef).sum() + r.loss).backward()
    ((y_ref * coef).sum() + r_ref.loss).backward()
    for (n, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=n)


def test_pad_heavy_batch_reports_real_balance():
    """75% padding of identical junk: routed, it would pile onto a few experts; masked,
    max_violation is that of the real tokens."""
    layer = _layer(dict(gate="softmax_topk", aux_loss_coef=0.01))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 32, 16, generator=g)
    x[:, 8:] = 3.0  # one repeated pad embedding
    mask = torch.zeros(4, 32, dtype=torch.bool)
    mask[:, :8] = True
    _, masked = layer(x, mask)
    _, real = layer(x[:, :8])
    _, unmasked = layer(x)
    assert masked.token_idx.numel() == 4 * 8 * 2
    torch.testing.assert_close(masked.stats["max_violation"], real.stats["max_violation"])
    assert unmasked.stats["max_violation"] > 2 * real.stats["max_violation"]


def test_sequences_of_different_lengths():
    """Rows of 5, 9 and 2 real tokens: each token's output is what the sample gives alone
    (dropless routing is per token), the sequence-wise balance loss is the mean of the
    samples' own losses, and the z-loss the token-weighted mean."""
    lengths, s, d = [5, 9, 2], 9, 16
    layer = _layer(dict(gate="softmax_topk", aux_loss_scope="sequence", z_loss_coef=0.01))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(lengths), s, d, generator=g)
    mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # [B, S]
    y, r = layer(x, mask)
    alone = [layer(x[i:i + 1, :n]) for i, n in enumerate(lengths)]
    for i, (n, (y_i, _)) in enumerate(zip(lengths, alone)):
        torch.testing.assert_close(y[i, :n], y_i[0])
    torch.testing.assert_close(r.aux_loss, torch.stack([a.aux_loss for _, a in alone]).mean())
    z_ref = sum(n * a.z_loss for n, (_, a) in zip(lengths, alone)) / sum(lengths)
    torch.testing.assert_close(r.z_loss, z_ref)


# ------------------------------------------------------------------ whole model, micro-batches
def _decoder(**routing) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=32)
    rcfg = RoutingConfig(top_k=2, **{"aux_loss_coef": 0.05, "z_loss_coef": 0.01, **routing})
    return build_model(cfg, MoEConfig(n_experts=8, n_shared=1, d_expert=16, backend="torch"),
                       rcfg, seed=0).double()


def _samples(lengths: list[int], seed: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 60, (n,), generator=g)
        labels = torch.randint(0, 60, (n,), generator=g)
        labels[: n // 2] = IGNORE_INDEX  # answer-only labels: targets differ per sample
        out.append({"input_ids": ids, "labels": labels})
    return out


def _norm(batches: list[dict[str, torch.Tensor]]) -> LossNorm:
    """The step's totals as the training loop counts them (one process)."""
    return step_loss_norm(batches, Layout(torch.device("cpu")))


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6, msg: str = "") -> None:
    """Norm-wise relative error (the model keeps fp32 islands, RMSNorm and the LM loss,
    even in fp64, so elementwise 1e-12 is out of reach)."""
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err <= rel, f"{msg}: relative error {err:.3g} > {rel}"


def _step(model, batches: list[dict[str, torch.Tensor]]):
    """Sum of the micro-batches' shares and of their gradients (as the engines do)."""
    norm = _norm(batches)
    model.zero_grad()
    lm = rt = 0.0
    for b in batches:
        out = model(b["input_ids"], b["labels"], token_mask=b["token_mask"], loss_norm=norm)
        out.loss.backward()
        lm, rt = lm + out.lm_loss.detach(), rt + out.routing_loss.detach()
    return lm, rt, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("routing", [dict(aux_loss_scope="sequence"),
                                     dict(aux_loss_scope="sequence", gate="sigmoid_topk")])
@pytest.mark.parametrize("micro", [1, 2])
def test_step_loss_and_grads_do_not_depend_on_micro_batching(routing, micro):
    model = _decoder(**routing)
    samples = _samples([5, 12, 3, 8])
    whole = _step(model, [collate(samples)])
    split = _step(model, [collate(samples[i:i + micro]) for i in range(0, 4, micro)])
    assert_rel(split[0], whole[0], msg="lm loss")
    assert_rel(split[1], whole[1], msg="routing loss")
    for n, gr in whole[2].items():
        assert_rel(split[2][n], gr, msg=n)
    # The LM loss is the global mean over target tokens, not a mean of micro-batch means.
    labels = torch.cat([s["labels"] for s in samples])
    assert whole[0] > 0 and (labels != IGNORE_INDEX).sum() == _norm([collate(samples)]).n_targets


def test_micro_batch_mean_of_means_would_differ():
    """The old normalisation (mean of per-micro-batch means) differs on this batch, so the
    test above can fail."""
    model = _decoder(aux_loss_scope="sequence")
    samples = _samples([5, 12, 3, 8])
    whole = _step(model, [collate(samples)])[0]
    means = [model(b["input_ids"], b["labels"]).lm_loss.detach()
             for b in map(collate, ([s] for s in samples))]
    assert abs(float(torch.stack(means).mean()) - float(whole)) > 1e-3


def test_padded_model_batch_equals_unpadded():
    """Garbage pad tokens after the real ones (right padding, causal): same logits at real
    positions, same losses, same gradients."""
    model = _decoder(aux_loss_scope="micro_batch")
    samples = _samples([9, 9, 9])
    batch = collate(samples)
    padded = collate([{**s, "input_ids": torch.cat([s["input_ids"], torch.full((6,), 7)]),
                       "labels": torch.cat([s["labels"], torch.full((6,), IGNORE_INDEX)]),
                       "token_mask": torch.arange(15) < 9} for s in samples])
    assert padded["token_mask"].sum() == 27 and padded["input_ids"].shape == (3, 15)
    a, b = _step(model, [batch]), _step(model, [padded])
    assert_rel(b[0], a[0], msg="lm loss")
    assert_rel(b[1], a[1], msg="routing loss")
    for n, gr in a[2].items():
        assert_rel(b[2][n], gr, msg=n)
