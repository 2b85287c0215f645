"""LSH-MoE dispatch (``moe_vlm.model.lsh_dispatch``): one bucket per token equals plain
dispatch bit for bit (forward and every gradient), on one process and under expert
parallelism (2 gloo processes); a hand-computed case of buckets, centroids and the residual
compensation in float64 against the paper's formula; the compression ratio by hand; the
cross-polytope hash's determinism; the config keys, the preset and the metric.

Legend: T tokens, D model width, E experts, K experts per token, N = T*K assignments,
B buckets.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.errors import ConfigError
from moe_vlm.model.dispatch import LocalDispatcher
from moe_vlm.model.experts import GroupedExperts
from moe_vlm.model.lsh_dispatch import (CrossPolytopeHash, LSHDispatcher, apply_lsh,
                                        lsh_buckets, lsh_compression)
from test_expert_parallel import _free_port, spawn_ranks  # noqa: E402


def _experts(e: int, d: int, f: int, dtype: torch.dtype, backend: str = "torch",
             seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    ex = GroupedExperts(e, d, f, backend).to(dtype)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return ex


def _routing(t: int, e: int, k: int, dtype: torch.dtype, seed: int = 1, experts_used: int = 0):
    """Top-k-like assignments [N]: k distinct experts per token (among the first
    ``experts_used``, so the rest get no token), random weights (requiring grad)."""
    g = torch.Generator().manual_seed(seed)
    pool = experts_used or e
    exp = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)]).flatten()
    tok = torch.arange(t).repeat_interleave(k)
    w = torch.rand(t * k, generator=g, dtype=dtype).requires_grad_()
    return tok, exp, w


def _unique_codes(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0])  # every token its own bucket


def _run(disp, x, tok, exp, w, ex):
    """(y, gradients of x, w and the expert weights) of a loss that weights every output."""
    y = disp(x, tok, exp, w, ex)
    loss = (y.sin() * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum()
    return y, torch.autograd.grad(loss, [x, w, *ex.parameters()])


def _expert_of(ex: GroupedExperts, e: int, row: torch.Tensor) -> torch.Tensor:
    """E_e(row) for one row [D] -> [D], through the experts' own compute."""
    offsets = torch.tensor([0] * e + [1] * (ex.n_experts - e), dtype=torch.int32)
    return ex(row[None], offsets)[0]


# ----------------------------------------------------------------------------- one process

@pytest.mark.parametrize("dtype,backend,experts_used", [
    (torch.float64, "torch", 0), (torch.float32, "torch", 5), (torch.float32, "grouped_mm", 0)])
def test_one_bucket_per_token_equals_plain_dispatch(dtype, backend, experts_used):
    t, d, e, k = 23, 8, 6, 2  # odd sizes; experts_used=5: expert 5 gets no token
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this build")
    ex = _experts(e, d, 16, dtype, backend)
    x = torch.randn(t, d, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_()
    tok, exp, w = _routing(t, e, k, dtype, experts_used=experts_used)
    y0, g0 = _run(LocalDispatcher(), x, tok, exp, w, ex)
    lsh = LSHDispatcher(LocalDispatcher(), d, codes_fn=_unique_codes, n_codes=t)
    y1, g1 = _run(lsh, x, tok, exp, w, ex)
    assert lsh.last_stats.centroids == lsh.last_stats.rows == t * k
    assert torch.equal(y0, y1)
    for name, a, b in zip(["x", "w", *dict(ex.named_parameters())], g0, g1):
        assert torch.equal(a, b), name


def test_fine_cross_polytope_hash_separates_random_tokens_and_equals_plain():
    # 4 hashes of 8 dims: 16^4 codes per expert, so 30 random tokens all land apart
    t, d, e, k = 30, 16, 4, 2
    ex = _experts(e, d, 8, torch.float64)
    x = torch.randn(t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    tok, exp, w = _routing(t, e, k, torch.float64)
    lsh = LSHDispatcher(LocalDispatcher(), d, n_hashes=4, dim=8, seed=5)
    assert lsh.hash(x).unique().numel() == t
    y0, g0 = _run(LocalDispatcher(), x, tok, exp, w, ex)
    y1, g1 = _run(lsh, x, tok, exp, w, ex)
    assert lsh.last_stats.centroids == t * k
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


# x0..x3 in 2-d; codes chosen by hand: x0, x1, x3 share code 0, x2 has code 1.
X = [[1.0, 2.0], [3.0, -2.0], [0.5, 0.5], [-1.0, 4.0]]
CODES = torch.tensor([0, 0, 1, 0])
# assignments (token, expert, weight): t0 -> e0 (.5) and e1 (.25); t1 -> e0; t2 -> e0; t3 -> e1
TOK, EXP = torch.tensor([0, 0, 1, 2, 3]), torch.tensor([0, 1, 0, 0, 1])
W = [0.5, 0.25, 1.0, 1.0, 2.0]


def _hand_case():
    x = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    return x, w, _experts(2, 2, 3, torch.float64, seed=4)


def test_hand_computed_buckets():
    bk = lsh_buckets(CODES, TOK, EXP, torch.tensor(W), n_codes=2)
    # sorted by expert (stable): e0: (t0 .5), (t1 1), (t2 1); e1: (t0 .25), (t3 2)
    assert bk.token.tolist() == [0, 1, 2, 0, 3]
    assert bk.weight.tolist() == [0.5, 1.0, 1.0, 0.25, 2.0]
    # buckets: e0 code 0 {t0, t1}, e0 code 1 {t2}, e1 code 0 {t0, t3}
    assert bk.bucket.tolist() == [0, 0, 1, 2, 2]
    assert bk.expert.tolist() == [0, 0, 1] and bk.size.tolist() == [2, 1, 2]


@pytest.mark.parametrize("compensate", [True, False])
def test_hand_computed_centroids_and_compensation_float64(compensate):
    x, w, ex = _hand_case()
    lsh = LSHDispatcher(LocalDispatcher(), 2, codes_fn=lambda _: CODES, n_codes=2,
                        compensate=compensate)
    y, grads = _run(lsh, x, TOK, EXP, w, ex)
    assert (lsh.last_stats.centroids, lsh.last_stats.rows) == (3, 5)  # ratio 3/5
    # the paper's formula, written out: c_b = mean of the bucket's tokens,
    # y_t = sum_k w_k (E_k(c_b) + x_t - c_b) (without compensation: sum_k w_k E_k(c_b))
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    c0 = (x_ref[0] + x_ref[1]) / 2  # e0, code 0: [2, 0]
    c1 = x_ref[2]  # e0, code 1: alone
    c2 = (x_ref[0] + x_ref[3]) / 2  # e1, code 0: [0, 3]
    assert c0.tolist() == [2.0, 0.0] and c2.tolist() == [0.0, 3.0]
    r = (lambda t, c: x_ref[t] - c) if compensate else (lambda t, c: 0)
    e0c0, e0c1, e1c2 = _expert_of(ex, 0, c0), _expert_of(ex, 0, c1), _expert_of(ex, 1, c2)
    want = torch.stack([
        w_ref[0] * (e0c0 + r(0, c0)) + w_ref[1] * (e1c2 + r(0, c2)),
        w_ref[2] * (e0c0 + r(1, c0)),
        w_ref[3] * (e0c1 + r(2, c1)),
        w_ref[4] * (e1c2 + r(3, c2)),
    ])
    torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-13)
    loss = (want.sin() * torch.linspace(-1, 2, want.numel(), dtype=want.dtype).view_as(want)).sum()
    want_grads = torch.autograd.grad(loss, [x_ref, w_ref, *ex.parameters()])
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_centroids_and_compensation():
    t, d, e, k = 9, 4, 3, 2
    ex = _experts(e, d, 5, torch.float64)
    codes = torch.tensor([0, 1, 0, 0, 1, 2, 0, 1, 0])  # buckets of 1 to 4 rows
    tok, exp, w = _routing(t, e, k, torch.float64)
    x = torch.randn(t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(6),
                    requires_grad=True)
    lsh = LSHDispatcher(LocalDispatcher(), d, codes_fn=lambda _: codes, n_codes=3)
    assert torch.autograd.gradcheck(lambda xx, ww: lsh(xx, tok, exp, ww, ex), (x, w))
    assert lsh.last_stats.centroids < t * k


def test_compression_ratio_by_hand():
    t, d, e, k = 6, 4, 4, 2
    ex = _experts(e, d, 5, torch.float32)
    x = torch.randn(t, d)
    # every token the same code: one bucket per expert used -> ratio = experts used / N
    tok = torch.arange(t).repeat_interleave(k)
    exp = torch.tensor([0, 1, 0, 1, 0, 2, 1, 2, 0, 1, 0, 2])  # experts 0, 1, 2 used; 3 not
    lsh = LSHDispatcher(LocalDispatcher(), d, codes_fn=lambda v: torch.zeros(len(v), dtype=torch.long),
                        n_codes=1)
    y = lsh(x, tok, exp, torch.ones(t * k), ex)
    assert (lsh.last_stats.centroids, lsh.last_stats.rows) == (3, 12)
    stats = lsh.routing_stats(torch.device("cpu"))
    assert stats["lsh_centroids"].item() == 3 and stats["lsh_rows"].item() == 12
    assert y.shape == (t, d)
    # a step's ratio over layers: rows summed, not ratios averaged
    rows = {"layer_0": {"lsh_centroids": 3.0, "lsh_rows": 12.0},
            "layer_1": {"lsh_centroids": 9.0, "lsh_rows": 12.0}}
    assert lsh_compression(rows) == pytest.approx(0.5)
    assert lsh_compression({"layer_0": {"tokens_per_expert": [1.0]}}) is None


@pytest.mark.parametrize("in_eval", [False, True])
def test_eval_mode_runs_the_exact_layer_unless_asked(in_eval):
    t, d, e, k = 12, 8, 4, 2
    ex = _experts(e, d, 8, torch.float64)
    x = torch.randn(t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    tok, exp, w = _routing(t, e, k, torch.float64)
    lsh = LSHDispatcher(LocalDispatcher(), d, n_hashes=1, dim=1, in_eval=in_eval)  # 2 codes
    y_train = lsh(x, tok, exp, w, ex)
    assert lsh.last_stats.centroids < t * k
    lsh.eval()
    y_eval = lsh(x, tok, exp, w, ex)
    plain = LocalDispatcher()(x, tok, exp, w, ex)
    if in_eval:
        assert torch.equal(y_eval, y_train) and lsh.routing_stats(x.device)
    else:
        assert torch.equal(y_eval, plain) and lsh.last_stats is None
        assert lsh.routing_stats(x.device) == {}
    assert not torch.allclose(y_train, plain)


def test_one_token_and_no_assignment():
    d = 4
    ex = _experts(3, d, 5, torch.float64)
    x = torch.randn(1, d, dtype=torch.float64)
    lsh = LSHDispatcher(LocalDispatcher(), d, n_hashes=2, dim=2)
    one = torch.tensor([0])
    w = torch.tensor([0.7], dtype=torch.float64)
    y = lsh(x, one, torch.tensor([2]), w, ex)
    torch.testing.assert_close(y, LocalDispatcher()(x, one, torch.tensor([2]), w, ex), rtol=0, atol=0)
    none = torch.zeros(0, dtype=torch.long)  # every assignment dropped (capacity)
    y = lsh(x, none, none, torch.zeros(0, dtype=torch.float64), ex)
    assert torch.equal(y, torch.zeros(1, d, dtype=torch.float64))
    assert (lsh.last_stats.centroids, lsh.last_stats.rows) == (0, 0)


def test_cross_polytope_hash_is_seeded_angular_and_in_range():
    d, n_hashes, dim = 12, 3, 4
    a, b = CrossPolytopeHash(d, n_hashes, dim, seed=7), CrossPolytopeHash(d, n_hashes, dim, seed=7)
    other = CrossPolytopeHash(d, n_hashes, dim, seed=8)
    assert torch.equal(a.rotation, b.rotation) and not torch.equal(a.rotation, other.rotation)
    eye = torch.eye(dim).expand(n_hashes, dim, dim)
    torch.testing.assert_close(a.rotation.transpose(1, 2) @ a.rotation, eye, atol=1e-6, rtol=0)
    x = torch.randn(50, d, generator=torch.Generator().manual_seed(0))
    codes = a(x)
    assert torch.equal(codes, b(x)) and torch.equal(codes, a(3.5 * x))  # angular
    assert codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < a.n_codes == 8 ** 3
    # the code spells each hash's nearest vertex of the cross-polytope +-e_i, by hand
    z = x[0] @ a.rotation[1]  # [dim] hash 1
    i = int(z.abs().argmax())
    vertex = i if z[i] > 0 else i + dim
    assert (int(codes[0]) // (2 * dim)) % (2 * dim) == vertex
    assert "rotation" not in a.state_dict()  # rebuilt from the seed, not checkpointed


def test_bf16_autocast_hashes_in_fp32_and_runs():
    h = CrossPolytopeHash(2, 1, 2, seed=1)
    h.rotation.copy_(torch.eye(2)[None])  # z = x: 1.0 vs 1.001 ties only when rounded to bf16
    x = torch.tensor([[1.0, 1.001]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert h(x).tolist() == [1]  # the second coordinate's +e vertex, as in fp32
    t, d, e, k = 16, 8, 4, 2
    ex = _experts(e, d, 8, torch.float32)
    tok, exp, w = _routing(t, e, k, torch.float32)
    lsh = LSHDispatcher(LocalDispatcher(), d, n_hashes=2, dim=4, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lsh(torch.randn(t, d), tok, exp, w, ex)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="parallel.lsh_dim=9 exceeds the width 8"):
        CrossPolytopeHash(8, 2, 9, seed=0)
    with pytest.raises(ValueError, match="lsh_hashes=0"):
        CrossPolytopeHash(8, 0, 2, seed=0)
    with pytest.raises(ValueError, match="n_codes"):
        LSHDispatcher(LocalDispatcher(), 8, codes_fn=_unique_codes)


# ----------------------------------------------------------------------------- config

def test_config_keys_and_preset():
    cfg = load_config(["experiment=lsh_moe"])
    p = cfg.parallel
    assert (p.lsh, p.lsh_hashes, p.lsh_dim, p.lsh_seed, p.lsh_compensate, p.lsh_eval) == \
        (True, 2, 4, 0, True, False)
    assert load_config([]).parallel.lsh is False
    with pytest.raises(ConfigError, match="parallel.lsh_dim"):
        load_config(["parallel.lsh=true", "parallel.lsh_dim=65"])  # model.d_model=64
    with pytest.raises(ConfigError, match="parallel.lsh_hashes"):
        load_config(["parallel.lsh=true", "parallel.lsh_hashes=0"])
    with pytest.raises(ConfigError, match="parallel.lsh_hashes.*bits"):
        load_config(["parallel.lsh=true", "parallel.lsh_hashes=20", "parallel.lsh_dim=8"])
    with pytest.raises(ConfigError, match="parallel.compile"):
        load_config(["parallel.lsh=true", "parallel.compile=true"])
    load_config(["parallel.lsh_dim=65"])  # only checked with parallel.lsh on


def test_apply_lsh_wraps_every_moe_layer_with_its_own_seed():
    from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
    from moe_vlm.model.decoder import build_model

    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      moe_every=1, max_seq_len=8)
    model = build_model(cfg, MoEConfig(n_experts=4, d_expert=8), RoutingConfig(top_k=2), "cpu", seed=0)
    keys = set(model.state_dict())
    apply_lsh(model, n_hashes=2, dim=3, seed=10)
    disps = [m.dispatcher for m in model.moe_layers()]
    assert all(isinstance(d, LSHDispatcher) and isinstance(d.inner, LocalDispatcher) for d in disps)
    assert not torch.equal(disps[0].hash.rotation, disps[1].hash.rotation)
    assert torch.equal(disps[1].hash.rotation, CrossPolytopeHash(16, 2, 3, seed=11).rotation)
    assert set(model.state_dict()) == keys  # checkpoints unchanged
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.lm_loss)
    stats = out.routing[0].stats
    assert 0 < stats["lsh_centroids"].item() <= stats["lsh_rows"].item() == 2 * 8 * 2


def test_training_logs_the_compression(tiny_config, tmp_path):
    from moe_vlm.train import train
    from moe_vlm.train.rundir import read_jsonl

    cfg = tiny_config("experiment=lsh_moe", "train.max_steps=2", "train.log_every=1",
                      "train.eval_every=2", "train.micro_batch_size=2")
    train(cfg, cfg.run.dir)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "routing" in r]
    assert len(rows) == 2
    for r in rows:
        layers = r["routing"].values()
        assert all(0 < lay["lsh_compression"] <= 1 for lay in layers)
        want = sum(lay["lsh_centroids"] for lay in layers) / sum(lay["lsh_rows"] for lay in layers)
        assert r["lsh_compression"] == pytest.approx(want)
        assert r["lsh_compression"] < 1  # 64 buckets per expert < the rows of a micro-batch


# ----------------------------------------------------------------------------- EP, 2 gloo ranks

def _ep_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank r routes its own 11 tokens over 4 experts (2 per rank); compares EP without
    LSH to EP with one bucket per token (bit for bit), and EP with a real hash to
    one process running the same LSH on this rank's tokens (all experts local)."""
    import torch.distributed as dist

    from moe_vlm.parallel.expert_parallel import AllToAllDispatcher, shard_experts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    t, d, e, k = 11, 8, 4, 2
    full = _experts(e, d, 6, torch.float64)
    x = torch.randn(t, d, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
    tok, exp, w = _routing(t, e, k, torch.float64, seed=20 + rank)

    def sharded() -> tuple[GroupedExperts, AllToAllDispatcher]:
        ex, a2a = _experts(e, d, 6, torch.float64), AllToAllDispatcher(e)
        shard_experts(ex, a2a)
        return ex, a2a

    ex0, a2a0 = sharded()
    y0, g0 = _run(a2a0, x, tok, exp, w, ex0)
    ex1, a2a1 = sharded()
    y1, g1 = _run(LSHDispatcher(a2a1, d, codes_fn=_unique_codes, n_codes=t), x, tok, exp, w, ex1)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    ex2, a2a2 = sharded()
    lsh_ep = LSHDispatcher(a2a2, d, n_hashes=1, dim=2, seed=3)
    y2, g2 = _run(lsh_ep, x, tok, exp, w, ex2)
    lsh_one = LSHDispatcher(LocalDispatcher(), d, n_hashes=1, dim=2, seed=3)
    y3, g3 = _run(lsh_one, x, tok, exp, w, full)
    assert lsh_ep.last_stats == lsh_one.last_stats and lsh_ep.last_stats.centroids < t * k
    torch.testing.assert_close(y2, y3, rtol=1e-12, atol=1e-12)
    for a, b in zip(g2[:2], g3[:2]):  # x and w
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # expert gradients: this rank's shard sums both ranks' contributions
    sl = slice(2 * rank, 2 * rank + 2)
    for name, a, b in zip(dict(full.named_parameters()), g2[2:], g3[2:]):
        b = b.clone()
        dist.all_reduce(b)
        torch.testing.assert_close(a, b[sl], rtol=1e-12, atol=1e-12, msg=name)
    # wrapped around EP in a model: the expert shards are still found (gradient reduction,
    # checkpoints gather them), and the checkpoint keys do not change
    from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
    from moe_vlm.model.decoder import build_model
    from moe_vlm.parallel.expert_parallel import (apply_expert_parallel, expert_parameters,
                                                  full_state_dict)

    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      moe_every=1, max_seq_len=8)
    model = build_model(cfg, MoEConfig(n_experts=4, d_expert=8), RoutingConfig(top_k=2), "cpu", seed=0)
    want = {k: v.shape for k, v in model.state_dict().items()}
    apply_lsh(apply_expert_parallel(model), n_hashes=1, dim=2, seed=0)
    assert len(expert_parameters(model)) == 2 * 2  # w_in, w_out of both layers
    assert {k: v.shape for k, v in full_state_dict(model).items()} == want
    open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_lsh_under_expert_parallelism_two_gloo_ranks(tmp_path):
    codes = spawn_ranks(_ep_worker, 2, _free_port(), str(tmp_path), timeout=90)
    assert codes == [0, 0], codes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok0", "ok1"]
