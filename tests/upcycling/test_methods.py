"""Upcycling one dense FFN: layout of copy/split experts, virtual-group routers, drop and
noise statistics, shared-expert slices, errors, and the function-preservation table.

Legend: D model width, F dense width, Fe expert width, E experts, m shards per copy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_vlm.upcycling.methods import DenseFFN, UpcycleSpec, preserves_function, upcycle_ffn

D, FD = 12, 24


def dense(seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(torch.randn(FD, D, generator=g), torch.randn(FD, D, generator=g),
                    torch.randn(D, FD, generator=g))


def ffn_out(f: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ f.gate.t()) * (x @ f.up.t())) @ f.down.t()


def expert_out(w_in: torch.Tensor, w_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w_in).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_out


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_copy_every_expert_is_the_dense_ffn():
    f = dense()
    up = upcycle_ffn(f, UpcycleSpec(n_experts=4, d_expert=FD, top_k=2, d_shared=0), gen())
    assert up.base == "copy" and up.shards == 1 and up.router.shape == (4, D)
    x = torch.randn(5, D)
    for e in range(4):
        torch.testing.assert_close(expert_out(up.w_in[e], up.w_out[e], x), ffn_out(f, x))
    assert not torch.equal(up.router[0], up.router[1])  # fresh router rows


@pytest.mark.parametrize("permute", [False, True])
def test_split_shards_sum_to_the_dense_ffn_and_share_router_rows(permute):
    f, m = dense(), 4
    up = upcycle_ffn(f, UpcycleSpec(n_experts=8, d_expert=FD // m, top_k=4, d_shared=0,
                                    method="split", permute=permute), gen())
    assert up.base == "split" and up.shards == m
    x = torch.randn(5, D)
    for replica in range(2):
        total = sum(expert_out(up.w_in[replica * m + j], up.w_out[replica * m + j], x) for j in range(m))
        torch.testing.assert_close(total / m, ffn_out(f, x), atol=1e-4, rtol=1e-4)  # w_out scaled by m
        rows = up.router[replica * m:(replica + 1) * m]
        assert torch.equal(rows, rows[:1].expand_as(rows))  # a virtual group shares one row
    assert not torch.equal(up.router[0], up.router[m])


def test_split_without_permute_keeps_unit_order():
    f = dense()
    up = upcycle_ffn(f, UpcycleSpec(n_experts=2, d_expert=FD // 2, top_k=2, d_shared=0,
                                    method="split"), gen())
    torch.testing.assert_close(up.w_in[1][:, :FD // 2], f.gate[FD // 2:].t())
    torch.testing.assert_close(up.w_out[0], f.down[:, :FD // 2].t() * 2)


def test_shared_slice_takes_the_first_units_and_routed_the_rest():
    f = dense()
    up = upcycle_ffn(f, UpcycleSpec(n_experts=2, d_expert=8, top_k=2, d_shared=8,
                                    method="split"), gen())
    torch.testing.assert_close(up.shared_in, torch.cat([f.gate[:8], f.up[:8]]))
    torch.testing.assert_close(up.shared_out, f.down[:, :8])
    x = torch.randn(3, D)
    shared = (F.silu(x @ up.shared_in[:8].t()) * (x @ up.shared_in[8:].t())) @ up.shared_out.t()
    routed = sum(expert_out(up.w_in[e], up.w_out[e], x) for e in range(2)) / 2
    torch.testing.assert_close(shared + routed, ffn_out(f, x), atol=1e-4, rtol=1e-4)


def test_shared_whole_copies_the_dense_ffn():
    f = dense()
    up = upcycle_ffn(f, UpcycleSpec(n_experts=2, d_expert=FD, top_k=1, d_shared=FD,
                                    shared="whole"), gen())
    torch.testing.assert_close(up.shared_out, f.down)


def test_drop_redraws_the_requested_fraction_per_expert():
    f = dense()
    base = upcycle_ffn(f, UpcycleSpec(n_experts=6, d_expert=FD, top_k=2, d_shared=0), gen())
    up = upcycle_ffn(f, UpcycleSpec(n_experts=6, d_expert=FD, top_k=2, d_shared=0,
                                    method="drop", drop_ratio=0.25), gen())
    changed = []
    for e in range(6):
        cols = (up.w_in[e][:, :FD] != base.w_in[e][:, :FD]).any(0)  # gate units changed
        ups = (up.w_in[e][:, FD:] != base.w_in[e][:, FD:]).any(0)
        downs = (up.w_out[e] != base.w_out[e]).any(1)
        assert torch.equal(cols, ups) and torch.equal(cols, downs)  # a unit is redrawn whole
        assert int(cols.sum()) == round(0.25 * FD)
        changed.append(cols)
    assert len({tuple(c.tolist()) for c in changed}) > 1  # each expert drops its own units
    redrawn = up.w_in[..., :FD][up.w_in[..., :FD] != base.w_in[..., :FD]]
    assert abs(float(redrawn.std()) - float(f.gate.std())) < 0.2  # drawn from the original stats


def test_drop_ratio_zero_is_copy_and_one_redraws_everything():
    f = dense()
    spec = dict(n_experts=2, d_expert=FD, top_k=1, d_shared=0)
    base = upcycle_ffn(f, UpcycleSpec(**spec), gen())
    torch.testing.assert_close(upcycle_ffn(f, UpcycleSpec(**spec, method="drop", drop_ratio=0.0), gen()).w_in,
                               base.w_in)
    full = upcycle_ffn(f, UpcycleSpec(**spec, method="drop", drop_ratio=1.0), gen())
    assert (full.w_in != base.w_in).all()


def test_noise_is_small_and_relative():
    f = dense()
    spec = dict(n_experts=3, d_expert=FD, top_k=1, d_shared=0)
    base = upcycle_ffn(f, UpcycleSpec(**spec), gen())
    noisy = upcycle_ffn(f, UpcycleSpec(**spec, method="noise", noise_std=0.05), gen())
    rel = float((noisy.w_in - base.w_in).std() / base.w_in.std())
    assert 0.03 < rel < 0.07


def test_deterministic_per_seed():
    f = dense()
    spec = UpcycleSpec(n_experts=4, d_expert=6, top_k=4, d_shared=0, method="drop", permute=True)
    a, b, c = (upcycle_ffn(f, spec, gen(s)) for s in (0, 0, 1))
    assert torch.equal(a.w_in, b.w_in) and torch.equal(a.router, b.router)
    assert not torch.equal(a.router, c.router)


@pytest.mark.parametrize("spec,match", [
    (UpcycleSpec(n_experts=4, d_expert=12, top_k=2, d_shared=0, method="copy"),
     r"copy needs routed experts as wide as the dense FFN pool \(24"),
    (UpcycleSpec(n_experts=4, d_expert=7, top_k=2, d_shared=0, method="split"), r"7 does not divide 24"),
    (UpcycleSpec(n_experts=6, d_expert=6, top_k=4, d_shared=0, method="split"),
     r"m=4 shards needs the routed expert count \(6\) to be a multiple"),
    (UpcycleSpec(n_experts=2, d_expert=24, top_k=1, d_shared=24, shared="slice"), r"leaves no units"),
    (UpcycleSpec(n_experts=2, d_expert=24, top_k=1, d_shared=8, shared="whole"), r"must equal model.d_ff=24"),
    (UpcycleSpec(n_experts=2, d_expert=24, top_k=1, d_shared=0, method="magic"), r"upcycle.method='magic'"),
])
def test_impossible_sizes_raise_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        upcycle_ffn(dense(), spec, gen())


@pytest.mark.parametrize("method,gate,renorm,scale,cap,shared,d_shared,top_k,expected", [
    ("copy", "softmax_topk", True, 1.0, None, "slice", 0, 2, True),
    ("split", "sigmoid_topk", True, 1.0, None, "slice", 0, 4, True),  # sigmoid normalises
    ("copy", "sigmoid_topk", False, 1.0, None, "slice", 0, 1, False),  # normalize_top1=false
    ("split", "softmax_topk", True, 1.0, None, "slice", 8, 2, True),
    ("copy", "softmax_topk", False, 1.0, None, "slice", 0, 2, False),
    ("split", "softmax_topk", True, 1.0, None, "slice", 0, 2, False),  # top-k not a multiple of m=4
    ("copy", "expert_choice", True, 1.0, None, "slice", 0, 2, False),
    ("copy", "softmax_topk", True, 2.5, None, "slice", 0, 2, False),
    ("copy", "softmax_topk", True, 1.0, 1.25, "slice", 0, 2, False),
    ("copy", "softmax_topk", True, 1.0, None, "random", 8, 2, False),
    ("drop", "softmax_topk", True, 1.0, None, "slice", 0, 2, False),
    ("noise", "softmax_topk", True, 1.0, None, "slice", 0, 2, False),
])
def test_function_preservation_table(method, gate, renorm, scale, cap, shared, d_shared, top_k, expected):
    d_exp = 6 if method == "split" and not d_shared else (8 if method == "split" else FD)
    spec = UpcycleSpec(n_experts=8, d_expert=d_exp, top_k=top_k, d_shared=d_shared,
                       method=method, shared=shared)
    ok, why = preserves_function(spec, gate, renorm, scale, cap, FD)
    assert ok is expected, why
