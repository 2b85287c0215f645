"""Fixed-size counting (``routing.counts.count_ids``): the router's counts, the
dispatcher's offsets, capacity and the balance loss need no host sync (checked on CUDA
with the sync debug mode); a dropless token-choice router traces into one graph; and
routing stays fp32 under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.model.dispatch import sort_by_expert
from moe_vlm.routing import Router
from moe_vlm.routing.counts import count_ids


@pytest.mark.parametrize("shape,n", [((0,), 4), ((17,), 4), ((5, 3), 8), ((64, 2), 64)])
def test_count_ids_equals_bincount(shape, n):
    ids = torch.randint(0, n, shape, generator=torch.Generator().manual_seed(sum(shape) + n))
    got = count_ids(ids, n)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert torch.equal(got, torch.bincount(ids.flatten(), minlength=n))
    order, offsets = sort_by_expert(ids.flatten(), n)
    assert torch.equal(offsets, torch.cumsum(got, 0).to(torch.int32))


def test_count_ids_refuses_an_id_out_of_range():
    with pytest.raises((IndexError, RuntimeError)):
        count_ids(torch.tensor([0, 4]), 4)


def _router(*overrides: str) -> Router:
    cfg = load_config(["vision=none", "data=synthetic_text", *overrides]).routing
    r = Router(16, 8, 2, cfg)
    r.init_weights(0.5, torch.Generator().manual_seed(0))
    return r


@pytest.mark.parametrize("overrides", [
    ("routing=mixtral_top2", "routing.z_loss_coef=0.01"),
    ("routing=deepseek_v3",),  # sigmoid gate with the balance bias
    ("routing=mixtral_top2", "routing.aux_loss_scope=sequence"),
])
def test_dropless_router_traces_without_a_graph_break(overrides):
    """``fullgraph=True`` fails on any graph break (what ``train.compile`` wants of a layer)."""
    torch._dynamo.reset()
    router = _router(*overrides)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    want = router(x, n_seqs=3)
    got = torch.compile(router, fullgraph=True, backend="eager")(x, n_seqs=3)
    assert torch.equal(got.expert_idx, want.expert_idx) and torch.equal(got.counts, want.counts)
    torch.testing.assert_close(got.weight, want.weight)
    torch.testing.assert_close(got.loss, want.loss)


def test_routing_is_fp32_under_bf16_autocast():
    """The router's logits skip autocast (DeepSeek-V3 and Megatron route in fp32): the
    same choices and weights, bit for bit, as without autocast."""
    router = _router("routing=mixtral_top2")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.weight.dtype == torch.float32
    assert torch.equal(got.expert_idx, want.expert_idx) and torch.equal(got.weight, want.weight)


@pytest.mark.gpu
def test_router_and_dispatch_offsets_do_not_sync_with_the_host():
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any device-to-host sync."""
    router = _router("routing=mixtral_top2", "routing.aux_loss_scope=sequence").cuda()
    x = torch.randn(64, 16, device="cuda")
    router(x, n_seqs=4)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = router(x, n_seqs=4)
        sort_by_expert(out.expert_idx, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
