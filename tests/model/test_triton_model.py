"""The decoder with ``moe.backend=triton`` matches ``moe.backend=torch`` end to end:
logits, loss and every parameter gradient (Triton's CPU interpreter here)."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.model.decoder import build_model


@pytest.mark.parametrize("routing", [
    RoutingConfig(gate="softmax_topk", top_k=2),
    RoutingConfig(gate="sigmoid_topk", top_k=3, capacity_factor=1.0),  # drops assignments
    RoutingConfig(gate="expert_choice", top_k=2),
])
def test_triton_model_matches_torch_model(routing):
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      n_dense_layers=0, moe_every=1, max_seq_len=16, init_std=0.2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (2, 12), generator=g)
    labels = torch.randint(0, 40, (2, 12), generator=g)
    results = {}
    for backend in ("torch", "triton"):
        moe = MoEConfig(n_experts=6, n_shared=1, d_expert=8, backend=backend)
        model = build_model(cfg, moe, routing, "cpu", seed=3)
        out = model(ids, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), out.loss.detach(), grads)
    (lt, st, gt), (lr, sr, gr) = results["triton"], results["torch"]
    torch.testing.assert_close(lt, lr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st, sr, atol=1e-6, rtol=1e-5)
    assert gt.keys() == gr.keys() and any("experts" in n for n in gt)
    for name in gr:
        torch.testing.assert_close(gt[name], gr[name], atol=2e-5, rtol=1e-3,
                                   msg=lambda m: f"{name}: {m}")
