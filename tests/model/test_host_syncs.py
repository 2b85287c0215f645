"""No host sync on the MoE path: an MoE layer's forward and backward (and a whole padded
decoder's, given the real tokens' indices) call no operator that makes the host wait for
the device (``nonzero``, ``bincount``, ``.item()``/``int()``/``bool()`` =
``_local_scalar_dense``, ...). Counted with a ``TorchDispatchMode`` on the CPU: the
operators are the same on CUDA, where each of these would stall the launch queue
(``torch.cuda.set_sync_debug_mode`` says so on a GPU; tests/kernels/test_kernel_gpu.py).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from moe_vlm.config.schema import RoutingConfig
from moe_vlm.model.granularity import MoESizes
from moe_vlm.model.moe import MoELayer, real_rows
from moe_vlm.routing.metrics import collect_routing_stats

# Operators whose result the host reads on CUDA (or whose output size is read back).
SYNCING = {"nonzero", "bincount", "_local_scalar_dense", "is_nonzero", "item", "equal",
           "unique", "_unique", "_unique2", "unique_consecutive", "masked_select",
           "nonzero_static", "argwhere", "histogram"}

ROUTINGS = {
    "topk_z": dict(gate="softmax_topk", z_loss_coef=0.01, aux_loss_scope="sequence"),
    "capacity": dict(gate="softmax_topk", capacity_factor=1.0),
    "sigmoid_bias": dict(gate="sigmoid_topk", bias_update_rate=0.01),
    "expert_choice": dict(gate="expert_choice", aux_loss_coef=0.0),
}


class _Ops(TorchDispatchMode):
    """Counts every ATen operator called (by its overload packet's name), inside our
    ``torch.library`` custom ops too (the Triton experts): their Python implementation is
    run under the mode instead of being dispatched as one opaque call."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        opdef = OPDEFS.get(f"{func.namespace}::{func._opname}")
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    def syncs(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k in SYNCING}


def _layer(routing: dict, backend: str, d: int = 16, e: int = 8, k: int = 2) -> MoELayer:
    routing = {"aux_loss_coef": 0.05, **routing}
    layer = MoELayer(d, MoESizes(e, 8, k, 8, 1), RoutingConfig(top_k=k, **routing), backend)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def _padded(b: int = 3, s: int = 8, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, s, d, generator=g, requires_grad=True)  # [B, S, D]
    mask = torch.arange(s)[None, :] < torch.tensor([[8], [5], [2]])  # [B, S] right padding
    return x, mask


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("collect", [True, False], ids=["stats", "no_stats"])
def test_moe_layer_forward_backward_has_no_host_sync(name, backend, collect):
    """Given the real rows (found on the host), routing, dispatch, the experts, combine,
    the losses and the backward sync nothing, with or without the logging metrics."""
    if backend == "triton" and name != "topk_z":
        pytest.skip("one routing is enough in Triton's slow interpreter")
    layer = _layer(ROUTINGS[name], backend)
    collect_routing_stats(layer, collect)
    x, mask = _padded()
    rows = real_rows(mask)  # on the host, before the device sees the batch
    with _Ops() as ops:
        y, r = layer(x, loss_norm=None, rows=rows)
        (y.square().sum() + r.loss).backward()
    assert ops.syncs() == {}, f"host syncs on the MoE path: {ops.syncs()}"
    assert (r.stats != {}) == collect


def test_a_mask_without_rows_costs_one_nonzero_per_forward_not_per_layer():
    """A padded decoder given only its mask finds the real rows once for all MoE layers
    (the training loop passes them, found on the host: then none)."""
    from moe_vlm.config import load_config
    from moe_vlm.model.decoder import build_model

    cfg = load_config(["vision=none", "data=synthetic_text", "model.n_layers=3",
                       "model.n_dense_layers=0", "moe.backend=grouped_mm"])
    model = build_model(cfg.model, cfg.moe, cfg.routing)
    assert len(model.moe_layers()) == 3
    ids = torch.randint(0, cfg.model.vocab_size, (3, 8), generator=torch.Generator().manual_seed(0))
    _, mask = _padded()
    for kwargs, want in (({"token_mask": mask}, 1),
                         ({"token_mask": mask, "token_rows": real_rows(mask)}, 0)):
        with _Ops() as ops:
            model(input_ids=ids, labels=ids, **kwargs).loss.backward()
        assert ops.ops["nonzero"] == want
        assert set(ops.syncs()) <= {"nonzero"}, ops.syncs()


def test_stats_off_changes_no_output():
    """Collecting the logging metrics or not: same assignments, losses and counts."""
    x, mask = _padded()
    rows = real_rows(mask)
    outs = []
    for collect in (True, False):
        layer = _layer(ROUTINGS["topk_z"], "torch")
        collect_routing_stats(layer, collect)
        y, r = layer(x, rows=rows)
        outs.append((y, r))
    (y1, r1), (y2, r2) = outs
    assert torch.equal(y1, y2) and torch.equal(r1.loss, r2.loss) and torch.equal(r1.counts, r2.counts)
    assert r1.stats and not r2.stats
