"""Branch-Train-MiX merge (``moe_vlm.upcycling.btx``, ``moe-vlm btx``): identical branches
give back the dense model; different branches give expert e = branch e's FFN and the mean
of every other tensor; fresh routers from the seed; mismatches refused; the merged
directory trains.

Legend: B batch, S sequence, D model width, F FFN width, N branches, V vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moe_vlm.commands.btx import btx_main
from moe_vlm.config import load_config
from moe_vlm.config.loader import config_from_file
from moe_vlm.config.schema import Config, ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.model.decoder import build_model
from moe_vlm.model.vlm import build_vlm
from moe_vlm.train.checkpoint import save_checkpoint
from moe_vlm.train.loop import train
from moe_vlm.upcycling.btx import btx_merge_into

V, D, FF = 50, 32, 64
BASE = ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=FF,
                   moe_every=0, max_seq_len=16, init_std=0.1)
IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, S]


def dense(cfg: ModelConfig = BASE, seed: int = 0):
    return build_model(cfg, MoEConfig(), RoutingConfig(), "cpu", seed=seed).eval()


def branch(sd: dict, seed: int, scale: float = 0.05) -> dict:
    """A 'trained' branch: the seed's weights moved by seeded noise (every tensor)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g).to(v) for k, v in sd.items()}


def target(n: int, routing: RoutingConfig = RoutingConfig(top_k=2), **model_kw):
    moe = MoEConfig(n_experts=n, d_expert=FF, n_shared=0, granularity=1)
    return build_model(replace(BASE, **{"moe_every": 1, **model_kw}), moe, routing, "cpu",
                       seed=7).eval()


@pytest.mark.parametrize("n,routing", [
    (2, RoutingConfig(gate="softmax_topk", top_k=2)),
    (3, RoutingConfig(gate="softmax_topk", top_k=2)),
    (4, RoutingConfig(gate="sigmoid_topk", top_k=2)),
])
def test_identical_branches_merge_into_the_dense_model(n, routing):
    """Every expert the same FFN, kept weights summing to 1: the dense logits (float64)."""
    seed_model = dense().double()
    sd = seed_model.state_dict()
    moe = target(n, routing).double()
    rep = btx_merge_into(moe, [sd] * n, router_std=1.0)  # a router far from uniform
    assert rep.identical_branches and rep.function_preserving and not rep.differing
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, seed_model(IDS).logits, atol=1e-10, rtol=1e-10)


def test_identical_branches_without_renormalised_weights_are_not_preserved():
    sd = dense().double().state_dict()
    moe = target(3, RoutingConfig(gate="softmax_topk", top_k=2, renormalize=False)).double()
    rep = btx_merge_into(moe, [sd] * 3, router_std=1.0)
    assert not rep.function_preserving and "not even for identical branches" in rep.reason
    with torch.no_grad():
        assert (moe(IDS).logits - dense().double()(IDS).logits).abs().max() > 1e-3


def test_experts_are_the_branch_ffns_and_every_other_tensor_the_mean():
    seed_sd = dense().state_dict()
    bs = [branch(seed_sd, s) for s in (1, 2, 3)]
    moe = target(3, n_dense_layers=1)  # layer 0 stays dense: its FFN is averaged
    rep = btx_merge_into(moe, bs, router_std=0.3, seed=5)
    got = moe.state_dict()
    assert rep.moe_layers == [1, 2] and not rep.identical_branches and not rep.function_preserving
    for i in rep.moe_layers:
        for e, b in enumerate(bs):
            assert torch.equal(got[f"layers.{i}.ffn.experts.w_in"][e], b[f"layers.{i}.ffn.w_in.weight"].t())
            assert torch.equal(got[f"layers.{i}.ffn.experts.w_out"][e], b[f"layers.{i}.ffn.w_out.weight"].t())
    expected_avg = [k for k in got if ".router." not in k and ".experts." not in k]
    assert sorted(rep.averaged) == sorted(expected_avg) == sorted(rep.differing)
    assert "layers.0.ffn.w_in.weight" in rep.averaged
    for k in expected_avg:
        ref = (bs[0][k].double() + bs[1][k].double() + bs[2][k].double()) / 3
        torch.testing.assert_close(got[k], ref.float(), atol=0, rtol=2e-7)

    # The merged layer is the paper's mix: sum_k w_k FFN_{e_k}(x), here top-2 of 3
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(9))  # [B, S, D]
    with torch.no_grad():
        y, _ = moe.layers[1].ffn(x)
        logits = x @ got["layers.1.ffn.router.weight"].t()  # [B, S, N]
        top, idx = logits.softmax(-1).topk(2, dim=-1)
        w = top / top.sum(-1, keepdim=True)  # [B, S, 2]

        def ffn(e: int) -> torch.Tensor:
            gate, up = (x @ bs[e]["layers.1.ffn.w_in.weight"].t()).chunk(2, -1)  # [B, S, F]
            return (F.silu(gate) * up) @ bs[e]["layers.1.ffn.w_out.weight"].t()  # [B, S, D]

        outs = torch.stack([ffn(e) for e in range(3)], -2)  # [B, S, N, D]
        ref = (w.unsqueeze(-1) * outs.gather(-2, idx.unsqueeze(-1).expand(-1, -1, -1, D))).sum(-2)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_router_is_fresh_and_deterministic_from_the_seed():
    seed_sd = dense().state_dict()
    a, b = [branch(seed_sd, 1), branch(seed_sd, 2)], [branch(seed_sd, 3), branch(seed_sd, 4)]
    routers = []
    for bs, seed in ((a, 3), (b, 3), (a, 4)):
        moe = target(2)
        rep = btx_merge_into(moe, bs, router_std=0.02, seed=seed)
        sd = moe.state_dict()
        routers.append(torch.stack([sd[f"layers.{i}.ffn.router.weight"] for i in rep.moe_layers]))
        assert all(torch.count_nonzero(sd[f"layers.{i}.ffn.router.bias"]) == 0 for i in rep.moe_layers)
        assert rep.fresh == [f"layers.{i}.ffn.router.{p}" for i in rep.moe_layers
                             for p in ("weight", "bias")]
    assert torch.equal(routers[0], routers[1])  # the seed alone decides, not the branches
    assert not torch.equal(routers[0], routers[2])
    # drawn layer by layer: N(0, 0.02^2) from a generator seeded with the seed
    want = torch.randn(2, D, generator=torch.Generator().manual_seed(3)) * 0.02  # [N, D]
    torch.testing.assert_close(routers[0][0], want)


def test_mismatches_are_refused_with_clear_errors():
    sd = dense().state_dict()
    moe = target(2)
    with pytest.raises(ValueError, match="at least 2 branches"):
        btx_merge_into(moe, [sd])
    wide = dense(replace(BASE, d_model=48)).state_dict()
    with pytest.raises(ValueError, match=r"'embed.weight' is \(50, 32\) torch.float32 in b0 but \(50, 48\)"):
        btx_merge_into(moe, [sd, wide], ["b0", "b1"])
    deeper = dense(replace(BASE, n_layers=4)).state_dict()
    with pytest.raises(ValueError, match="have different tensors"):
        btx_merge_into(moe, [sd, deeper])
    with pytest.raises(ValueError, match="already an MoE model"):
        btx_merge_into(moe, [sd, target(2).state_dict()])
    with pytest.raises(ValueError, match="set moe.n_experts=3"):
        btx_merge_into(moe, [sd, sd, sd])
    shapes = {  # target MoE shape -> the key the error names
        "set moe.granularity=1": MoEConfig(n_experts=2, d_expert=FF, granularity=2),
        "set moe.n_shared=0": MoEConfig(n_experts=2, d_expert=FF, n_shared=1),
        f"set moe.d_expert={FF}": MoEConfig(n_experts=2, d_expert=32),
    }
    for msg, m in shapes.items():
        t = build_model(replace(BASE, moe_every=1), m, RoutingConfig(top_k=2), "cpu", seed=0)
        with pytest.raises(ValueError, match=msg):
            btx_merge_into(t, [sd, sd])
    narrow = target(2, d_model=16)
    with pytest.raises(ValueError, match=r"expected|in the target"):
        btx_merge_into(narrow, [sd, sd])


def test_vlm_branches_average_the_vision_tower_and_projector():
    cfg = load_config(["model.moe_every=0", "model.n_layers=1"])
    seed_sd = build_vlm(cfg, image_token_id=259, seed=0).state_dict()
    bs = [branch(seed_sd, 1, 0.01), branch(seed_sd, 2, 0.01)]
    tcfg = load_config(["model.n_layers=1", "moe.n_experts=2", "moe.d_expert=256",
                        "moe.granularity=1", "moe.n_shared=0", "routing.top_k=2"])
    moe = build_vlm(tcfg, image_token_id=259, seed=5)
    rep = btx_merge_into(moe, bs)
    assert rep.merged_vision
    got = moe.state_dict()
    vis = [k for k in got if k.startswith(("vision.", "projector."))]
    assert vis and set(vis) <= set(rep.averaged)
    for k in vis:
        torch.testing.assert_close(got[k], (bs[0][k] + bs[1][k]) / 2, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(got["decoder.layers.0.ffn.experts.w_in"][1],
                               bs[1]["decoder.layers.0.ffn.w_in.weight"].t(), atol=0, rtol=0)


# ---- the command, on tiny run directories written with the checkpoint writer --------

MODEL = ["model.d_model=32", "model.n_layers=2", "model.d_ff=64", "model.max_seq_len=32",
         "data.seq_len=16"]
TINY = ["vision=none", "model.moe_every=0", "data=synthetic_text", *MODEL]
TRAIN = ["train.max_steps=2", "train.eval_every=2", "train.batch_size=4", "train.warmup_steps=1",
         "train.progress=false", "data.seq_len=16", "data.n_eval_samples=4"]


def write_run(d: Path, cfg: Config, sd: dict, step: int) -> Path:
    """A finished run directory as ``moe-vlm train`` leaves one (config + checkpoint)."""
    d.mkdir(parents=True)
    save_checkpoint(d / "checkpoints", step, {"model": sd, "step": step}, keep=1)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("btx")
    cfg = load_config(TINY)
    seed_sd = build_model(cfg.model, cfg.moe, cfg.routing, "cpu", seed=0).state_dict()
    seed_dir = write_run(root / "seed", cfg, seed_sd, 10)
    text = replace(cfg, train=replace(cfg.train, init_from=str(seed_dir)))
    code = replace(text, data=replace(text.data, name="stdlib"))
    a = write_run(root / "branch_text", text, branch(seed_sd, 1, 0.02), 7)
    b = write_run(root / "branch_code", code, branch(seed_sd, 2, 0.02), 9)
    return root, seed_dir, a, b


def test_btx_command_merges_branch_runs_and_the_result_trains(runs, tmp_path, capsys):
    root, seed_dir, a, b = runs
    out = tmp_path / "merged"
    btx_main(["--from", str(a), str(b), "upcycle.seed=3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "expert 0:" in printed and "function preserving: False" in printed
    assert "data.name=mixture ++data.mixture.stdlib=0.5 ++data.mixture.synthetic_text=0.5" in printed
    rec = json.loads((out / "btx.json").read_text())
    assert [r["step"] for r in rec["branches"]] == [7, 9]
    assert [r["data"]["name"] for r in rec["branches"]] == ["synthetic_text", "stdlib"]
    assert {r["init_from"] for r in rec["branches"]} == {str(seed_dir)} and not rec["warnings"]
    assert rec["router_seed"] == 3 and rec["n_branches"] == 2 and not rec["function_preserving"]
    assert rec["max_abs_logit_diff_vs_branch_mean"] > 0
    assert len(rec["max_abs_logit_diff_vs_branches"]) == 2
    cfg = config_from_file(out / "config.yaml")
    assert (cfg.moe.n_experts, cfg.moe.d_expert, cfg.moe.granularity, cfg.moe.n_shared,
            cfg.routing.top_k, cfg.model.moe_every) == (2, 64, 1, 0, 2, 1)
    assert cfg.train.init_from == str(out.resolve())

    # the MiX stage: the preset with train.init_from, on the branches' two sources
    # (stdlib weight 0 here only to keep the test from building its token cache)
    mix = load_config(["experiment=btx", *MODEL, *TRAIN,
                       "data.mixture.stdlib=0", "data.mixture.synthetic_text=1",
                       f"train.init_from={out}", f"run.dir={tmp_path / 'mix'}"])
    s = train(mix, tmp_path / "mix")
    assert s["status"] == "completed" and s["init_from"] == str(out)
    assert s["final_train_loss"] == s["final_train_loss"]  # finite, not NaN


def test_btx_command_identical_branches_reproduce_the_seed(runs, tmp_path, capsys):
    _, seed_dir, _, _ = runs
    btx_main(["--from", str(seed_dir), str(seed_dir), "--out", str(tmp_path / "m")])
    assert "function preserving: True" in capsys.readouterr().out
    rec = json.loads((tmp_path / "m" / "btx.json").read_text())
    assert rec["identical_branches"] and rec["max_abs_logit_diff_vs_branch_mean"] < 1e-5
    assert rec["warnings"]  # the seed run names no seed of its own


def test_btx_command_refuses_with_one_line_errors(runs, tmp_path, capsys):
    root, seed_dir, a, _ = runs
    cfg = load_config(TINY)
    other = write_run(root / "rope", replace(cfg, model=replace(cfg.model, rope_theta=500.0)),
                      build_model(cfg.model, cfg.moe, cfg.routing, "cpu", seed=0).state_dict(), 1)
    cases = {
        "model.rope_theta is 10000.0": ["--from", str(a), str(other)],
        "at least 2 branch runs": ["--from", str(a)],
        "set moe.n_experts=2": ["--from", str(a), str(seed_dir), "moe.n_experts=3"],
    }
    for i, (msg, args) in enumerate(cases.items()):
        with pytest.raises(SystemExit) as e:
            btx_main([*args, "--out", str(tmp_path / f"o{i}")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.startswith("moe-vlm btx: "), err
