"""Expert backends and the MoE layer are bitwise reproducible on CPU with several threads.

The gather of expert-sorted rows repeats every token K times; its backward used to be
``index_put_`` with accumulate, which adds duplicates with atomics once the work exceeds
PyTorch's grain size, so gradients differed in their last bits from run to run (and a
1000-step job by 6e-3 in loss). ``index_select``'s backward adds serially. Sizes here are
above that grain (T*K*D > 32768).
"""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config.schema import RoutingConfig
from functools import partial

from moe_vlm.model.dispatch import routed_experts
from moe_vlm.model.experts import grouped_mm_supported
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.moe import MoELayer

T, D, E, F, K = 1536, 64, 16, 32, 4


def _threads(n: int):
    class _Ctx:
        def __enter__(self):
            self.prev = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.prev)
    return _Ctx()


def _backends() -> list[str]:
    out = ["torch"]
    if grouped_mm_supported(torch.device("cpu"), torch.float32, D, F) is None:
        out.append("grouped_mm")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_expert_backend_backward_bitwise_reproducible(backend):
    fn = partial(routed_experts, backend=backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    tok = torch.arange(T).repeat_interleave(K)  # [T*K] each token K times
    eidx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).flatten()
    w = torch.rand(T * K, generator=g)
    wi, wo = torch.randn(E, D, 2 * F, generator=g) * 0.1, torch.randn(E, F, D, generator=g) * 0.1
    go = torch.randn(T, D, generator=g)

    def run() -> list[torch.Tensor]:
        leaves = [a.clone().requires_grad_() for a in (x, w, wi, wo)]
        y = fn(leaves[0], tok, eidx, *leaves[1:])
        y.backward(go)
        return [y.detach()] + [a.grad for a in leaves]

    with _threads(2):
        ref = run()
        for _ in range(4):
            got = run()
            for i, (a, b) in enumerate(zip(got, ref)):
                assert torch.equal(a, b), f"output/grad {i} differs between runs"


def test_moe_layer_with_padding_bitwise_reproducible():
    layer = MoELayer(D, MoESizes(E, F, K, F, 1), RoutingConfig(top_k=K, aux_loss_coef=0.01,
                                                               z_loss_coef=0.001), "auto")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(12, 160, D, generator=g)
    mask = torch.arange(160)[None, :] < torch.randint(40, 161, (12, 1), generator=g)

    def run() -> list[torch.Tensor]:
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y, r = layer(xx, mask)
        ((y * y).sum() + r.loss).backward()
        return [y.detach(), xx.grad] + [p.grad for p in layer.parameters()]

    with _threads(2):
        ref = run()
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(run(), ref))
