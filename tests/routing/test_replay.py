"""Router replay (``routing.replay``), the recompute's reuse of the forward's routing
under activation checkpointing, and forced balance (``routing.force_balance``).

References are written here from the definitions: Megatron-Core's replay takes the combine
weights as the gate's scores gathered at the given experts (then the gate's normalisation);
torchtitan's forced balance sends assignment i of the T*K to expert i mod E.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import CheckpointError, checkpoint

from moe_vlm.config import load_config
from moe_vlm.config.schema import RoutingConfig
from moe_vlm.errors import ConfigError
from moe_vlm.model import build_model
from moe_vlm.model.dispatch import LocalDispatcher
from moe_vlm.parallel.parallelize import apply_activation_checkpointing, repeated_blocks
from moe_vlm.routing.gates import round_robin_experts, sigmoid_topk, softmax_topk
from moe_vlm.routing.router import Router
from moe_vlm.train import train
from moe_vlm.train.checkpoint import checkpoint_path
from moe_vlm.train.routing_replay import RoutingReplay, recorded_steps, step_file
from conftest import FAST

STEPS = ["train.max_steps=2", "train.eval_every=2", "train.micro_batch_size=2"]


# ---------------------------------------------------------------- gates and the router

def _ref_weights(logits: torch.Tensor, experts: torch.Tensor, gate: str, normalize: bool):
    """float64 reference: the gate's scores at ``experts``, normalised over them."""
    s = torch.softmax(logits.double(), -1) if gate == "softmax" else torch.sigmoid(logits.double())
    w = s.gather(-1, experts)
    return w / w.sum(-1, keepdim=True) if normalize else w


@pytest.mark.parametrize("gate,normalize", [("softmax", True), ("softmax", False),
                                            ("sigmoid", True), ("sigmoid", False)])
def test_given_experts_take_the_scores_there(gate, normalize):
    """A given selection replaces the top k; the weights (and their gradients) are the
    scores at those experts, as in the reference; the top-k path is unchanged."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    experts = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(7)])  # [T, K]
    fn = (lambda lg, e: softmax_topk(lg, 3, normalize, experts=e)) if gate == "softmax" else \
        (lambda lg, e: sigmoid_topk(lg, 3, normalize=normalize, experts=e))
    tk = fn(logits, experts)
    assert torch.equal(tk.experts, experts)
    want = _ref_weights(logits, experts, gate, normalize)
    torch.testing.assert_close(tk.weights, want)
    up = torch.randn(7, 3, generator=g, dtype=torch.float64)
    got_g, = torch.autograd.grad((tk.weights * up).sum(), logits)
    want_g, = torch.autograd.grad((want * up).sum(), logits)
    torch.testing.assert_close(got_g, want_g)
    assert got_g.abs().sum() > 0  # the router still learns
    own = fn(logits, None)  # no selection given: the plain top k
    assert torch.equal(own.experts, logits.topk(3, -1).indices)


@pytest.mark.parametrize("t,k,e", [(8, 2, 4), (5, 3, 5), (1, 1, 1), (7, 2, 4), (3, 4, 4), (0, 2, 4)])
def test_round_robin_experts(t, k, e):
    """Assignment i goes to expert i mod E; distinct per token; loads equal when E | T*K,
    within one otherwise."""
    got = round_robin_experts(t, k, e, torch.device("cpu"))
    assert got.shape == (t, k)
    assert torch.equal(got.reshape(-1), torch.tensor([i % e for i in range(t * k)], dtype=torch.long))
    assert all(len(set(row.tolist())) == k for row in got)
    counts = torch.bincount(got.reshape(-1), minlength=e)
    if (t * k) % e == 0:
        assert (counts == t * k // e).all()
    else:
        assert int(counts.max() - counts.min()) <= 1


def _router(gate: str = "softmax_topk", **kw) -> Router:
    r = Router(8, 4, 2, replace(RoutingConfig(), gate=gate, **kw))
    r.init_weights(0.5, torch.Generator().manual_seed(0))
    return r


@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("cf", [None, 1.0])
def test_forced_balance_gives_equal_counts(gate, cf):
    """``routing.force_balance``: every expert gets T*K/E assignments whatever the scores
    (all tokens preferring one expert), weights are the normalised scores there, and the
    balance loss still sees the router's own (unbalanced) top k."""
    free = _router(gate, capacity_factor=cf)
    forced = _router(gate, capacity_factor=cf, force_balance=True)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1)) + 3 * free.weight[0]
    out, own = forced(x), free(x)
    assert torch.equal(out.counts, torch.full((4,), 6.0))
    own_top = (x @ free.weight.t()).topk(2, -1).indices.reshape(-1)
    assert torch.bincount(own_top, minlength=4).max() > 6  # the scores alone are unbalanced
    want_e = round_robin_experts(12, 2, 4, x.device)
    assert torch.equal(out.expert_idx, want_e.reshape(-1))
    torch.testing.assert_close(out.weight.double(), _ref_weights(
        x.double() @ free.weight.double().t(), want_e, gate.split("_")[0], True).reshape(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.aux_loss, own.aux_loss)


def test_select_hook_of_the_wrong_shape_is_refused():
    r = _router()
    r.select_hook = lambda sel: sel[:-1]
    with pytest.raises(ValueError, match="shape"):
        r(torch.randn(5, 8))


@pytest.mark.parametrize("overrides,key", [
    (["routing=expert_choice", "routing.force_balance=true"], "routing.gate"),
    (["routing=expert_choice", "routing.replay=record", "routing.replay_path=/tmp/x"], "routing.gate"),
    (["routing.replay=record"], "routing.replay_path"),
    (["routing.replay=replay", "routing.replay_path=/tmp/x", "routing.force_balance=true"],
     "routing.force_balance"),
])
def test_config_refuses_what_cannot_be_replayed_or_forced(tiny_config, overrides, key):
    """Expert choice has no per-token selection: replay and forced balance are refused
    (not silently ignored), naming the key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(*overrides)


# ---------------------------------------------------------------- record and replay runs

def _capture_dispatch(monkeypatch) -> list[torch.Tensor]:
    """Every expert_idx the (local) dispatchers are handed with gradients on (training and
    recompute, not evaluation), in call order."""
    seen: list[torch.Tensor] = []
    orig = LocalDispatcher.forward

    def forward(self, x, token_idx, expert_idx, weight, experts):
        if torch.is_grad_enabled():
            seen.append(expert_idx.detach().clone())
        return orig(self, x, token_idx, expert_idx, weight, experts)

    monkeypatch.setattr(LocalDispatcher, "forward", forward)
    return seen


def _read(path, step):
    return torch.load(step_file(path, step, 0), weights_only=True)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """A record of 2 steps x 2 micro-batches (seed 0) and what its run dispatched."""
    tmp = tmp_path_factory.mktemp("record")
    mp = pytest.MonkeyPatch()
    seen = _capture_dispatch(mp)
    try:
        cfg = load_config([*FAST, *STEPS, "routing.replay=record", f"routing.replay_path={tmp / 'rec'}",
                           f"run.dir={tmp / 'a'}"])
        train(cfg, cfg.run.dir)
    finally:
        mp.undo()
    return tmp / "rec", list(seen)


def test_replay_reproduces_the_recorded_assignments(record, tiny_config, tmp_path, monkeypatch):
    """The record holds what its run dispatched (every layer of every micro-batch of every
    step); a replay with another seed (other router and expert init), under activation
    checkpointing, dispatches exactly that in the forward and the recompute, although its
    own routers would choose otherwise."""
    rec, dispatched = record
    head = json.loads((rec / "header.json").read_text())
    assert set(head["layers"]) == {"layer_0", "layer_1"}
    assert head["layout"]["micro_batches_per_rank"] == 2 and recorded_steps(rec, 0) == [0, 1]
    want = []  # call order: step, micro-batch, layer
    for step in range(2):
        per = [torch.split(layer["ids"].long(), layer["rows"].tolist())
               for layer in _read(rec, step)["layers"]]
        want += [per[j][m].reshape(-1) for m in range(2) for j in range(2)]
    assert len(dispatched) == len(want) == 2 * 2 * 2
    assert all(torch.equal(a, b) for a, b in zip(dispatched, want))

    own: list[torch.Tensor] = []  # what the replaying routers would have chosen
    replayer = RoutingReplay._replayer

    def spy(self, i):
        hook = replayer(self, i)
        return lambda selected: (own.append(selected.reshape(-1).clone()), hook(selected))[1]

    monkeypatch.setattr(RoutingReplay, "_replayer", spy)
    seen = _capture_dispatch(monkeypatch)
    # with activation checkpointing: each block's recompute (layer 1, then 0) reuses the replay
    cfg = tiny_config(*STEPS, "routing.replay=replay", f"routing.replay_path={rec}", "seed=1",
                      "parallel.activation_checkpointing=full")
    train(cfg, cfg.run.dir)
    want_ac = [w for i in range(0, 8, 2) for w in (want[i], want[i + 1], want[i + 1], want[i])]
    assert len(seen) == 16 and all(torch.equal(a, b) for a, b in zip(seen, want_ac))
    assert len(own) == 8 and not all(torch.equal(a, b) for a, b in zip(own, want))


def test_killed_and_resumed_record_equals_an_uninterrupted_one(tiny_config, tmp_path):
    """A run killed after recording step 2 but before checkpointing it (its checkpoint
    removed, the step's file torn) records step 2 again on resume: the same files as the
    uninterrupted record, none missing or extra."""
    rec = tmp_path / "rec"
    cfg = tiny_config("train.max_steps=3", "train.eval_every=3", "train.ckpt_every=1",
                      "routing.replay=record", f"routing.replay_path={rec}")
    train(cfg, cfg.run.dir)
    full = {s: _read(rec, s)["layers"] for s in range(3)}
    checkpoint_path(Path(cfg.run.dir) / "checkpoints", 3).unlink()
    step_file(rec, 2, 0).write_bytes(b"torn")
    train(cfg, cfg.run.dir)
    assert recorded_steps(rec, 0) == [0, 1, 2]
    for step in range(3):
        got = _read(rec, step)["layers"]
        assert all(torch.equal(x["ids"], y["ids"]) and torch.equal(x["rows"], y["rows"])
                   for x, y in zip(got, full[step]))


def test_incompatible_or_too_short_replay_is_refused(record, tiny_config, tmp_path):
    """Another MoE shape, micro-batching or data, or more steps than recorded: refused
    before training, naming what differs; recording into another run's record too."""
    rec, _ = record
    replay = ["routing.replay=replay", f"routing.replay_path={rec}"]
    cases = [(["moe.n_experts=4"], r"layers\.layer_0: recorded \{'n_experts': 32"),
             (["train.micro_batch_size=4"], r"layout\.micro_batches_per_rank: recorded 2, this run 1"),
             (["data.seed=7"], r"data\.seed: recorded 1234, this run 7"),
             (["train.max_steps=3"], r"train\.max_steps=3 .*first missing: 2")]
    for i, (extra, msg) in enumerate(cases):
        cfg = tiny_config(*STEPS, *replay, *extra, f"run.dir={tmp_path / f'r{i}'}")
        with pytest.raises(ConfigError, match=msg):
            train(cfg, cfg.run.dir)
        assert not (tmp_path / f"r{i}" / "metrics.jsonl").exists()
    cfg = tiny_config(*STEPS, "routing.replay=record", f"routing.replay_path={rec}")
    with pytest.raises(ConfigError, match="already holds the record of run"):
        train(cfg, cfg.run.dir)


def test_forced_balance_is_marked_in_summary_and_rows(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=2", "train.eval_every=2", "routing.force_balance=true")
    with pytest.warns(UserWarning, match="round-robin"):
        summary = train(cfg, cfg.run.dir)
    assert summary["routing_forced_balance"] is True
    rows = [json.loads(line) for line in open(f"{cfg.run.dir}/metrics.jsonl")]
    trained = [r for r in rows if "loss" in r]
    assert trained and all(r["routing_forced_balance"] for r in trained)
    for r in trained:  # every layer's load exactly equal (T*K divisible by E here: 128*4/32)
        for layer in r["routing"].values():
            assert layer["max_violation"] == 0.0


# ---------------------------------------------------------------- activation checkpointing

def _perturbed_backward(monkeypatch, wrap) -> list[torch.Tensor]:
    """A forward of a checkpointed MoE model, then every router's weight negated (its top
    k becomes its bottom k) before the backward, whose recompute re-runs the routers.
    Returns the expert_idx of every dispatch (forward, then recompute)."""
    cfg = load_config(["vision=none", "data=synthetic_text", "data.seq_len=16", "moe.backend=torch",
                       "model.n_dense_layers=0", "model.n_layers=1"])
    model = build_model(cfg.model, cfg.moe, cfg.routing, device=torch.device("cpu"), seed=0)
    wrap(model)
    seen = _capture_dispatch(monkeypatch)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids.roll(-1, 1)).loss
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.weight.neg_()
    try:
        loss.backward()
    except CheckpointError:  # the control: recomputed expert groups of other sizes
        pass
    return list(seen)


def test_recompute_reuses_the_forward_selection(monkeypatch):
    """With ``activation_checkpointing=full`` the recompute in the backward dispatches the
    forward's experts although the router now prefers others; a plain checkpoint (the
    control) re-routes (torch notices here only because the expert groups change size),
    so the test can tell."""
    seen = _perturbed_backward(monkeypatch, lambda m: apply_activation_checkpointing(m, "full"))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])

    def plain(model):
        for block in repeated_blocks(model):
            inner = block.forward
            block.forward = lambda *a, _f=inner, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)

    seen = _perturbed_backward(monkeypatch, plain)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])


# ---------------------------------------------------------------- torchrun: a file per rank

def _torchrun(overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "moe_vlm.train", *FAST, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_record_and_replay_their_own_slices(tmp_path, tiny_config):
    """Under torchrun (2 gloo processes, experts split over them) each rank records its
    own micro-batches to its own file; a replay at the same layout and seed reproduces the
    recording run's losses exactly (a rank reading another's slice would not); one process
    is refused a 2-process record."""
    rec = tmp_path / "rec"
    common = ["train.max_steps=2", "train.eval_every=2", "train.log_every=1", "parallel.ep=2",
              f"routing.replay_path={rec}"]
    runs = {}
    for name, mode in (("record", "record"), ("replay", "replay")):
        p = _torchrun([*common, f"routing.replay={mode}", f"run.dir={tmp_path / name}"])
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = [(r["step"], r.get("loss"), r.get("eval_loss"))
                      for r in map(json.loads, open(tmp_path / name / "metrics.jsonl"))]
    assert recorded_steps(rec, 0) == recorded_steps(rec, 1) == [0, 1]
    rows = [_read_rank(rec, 1, r)["layers"][0]["rows"].tolist() for r in (0, 1)]
    assert rows[0] == rows[1] == [2 * 32]  # each rank: its 2 of the 4 sequences
    assert runs["replay"] == runs["record"]
    cfg = tiny_config(*common, "parallel.ep=1", "routing.replay=replay")
    with pytest.raises(ConfigError, match="layout.world: recorded 2, this run 1"):
        train(cfg, cfg.run.dir)


def _read_rank(path, step, rank):
    return torch.load(step_file(path, step, rank), weights_only=True)
