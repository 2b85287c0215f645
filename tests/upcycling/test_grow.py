"""Growing dense checkpoints (``moe_vlm.upcycling.grow``, ``moe-vlm grow``): the grown
model computes the source's logits where the method promises it (bert2BERT FPI with a
whole-multiple d_model, any d_ff / heads, identity layers), says it does not otherwise
(G_stack, a fractional d_model) with the measured gap, and its directory trains and
upcycles.

Legend: B batch, S sequence, D model width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moe_vlm.commands.checkpoints import _build, upcycle_main
from moe_vlm.commands.grow import grow_main
from moe_vlm.config.loader import config_from_file
from moe_vlm.config.schema import Config, ModelConfig
from moe_vlm.train.loop import train
from moe_vlm.upcycling.grow import (
    grow_state,
    grown_config,
    head_maps,
    layer_plan,
    max_logit_gap,
    read,
    unit_map,
    write,
)

V = 50
BASE = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                   moe_every=0, max_seq_len=32, init_std=0.2)  # large init: logits far from 0


def grow(model_kw: dict, depth: str = "identity", base: Config = Config(model=BASE), seed: int = 0):
    """(source model, grown model, grown config, report) for the model overrides."""
    src = _build(base).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm rule shows
        for n, p in src.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    tgt_cfg = replace(base, model=grown_config(base.model, replace(base.model, **model_kw)))
    state, report = grow_state(src.state_dict(), base, tgt_cfg, "fpi", depth, seed)
    tgt = _build(tgt_cfg).eval()
    tgt.load_state_dict(state)
    return src, tgt, tgt_cfg, report


PRESERVING = {
    "d_model_x2_tied": dict(d_model=64),
    "d_model_x3_untied": dict(d_model=96),  # with tie_embeddings=False in the base
    "d_ff_not_a_multiple": dict(d_ff=70),
    "query_heads_only": dict(n_heads=8),
    "heads_and_kv_groups": dict(n_heads=6, n_kv_heads=3),
    "kv_groups_to_mha": dict(n_kv_heads=4),
    "depth_identity_5": dict(n_layers=5),
    "everything": dict(d_model=64, d_ff=100, n_heads=8, n_kv_heads=4, n_layers=4),
}


@pytest.mark.parametrize("case", list(PRESERVING))
def test_promised_growth_keeps_the_logits(case):
    base = BASE
    if case == "d_model_x3_untied":
        base = replace(BASE, tie_embeddings=False)
    if case == "everything":
        base = replace(BASE, qk_norm=True, qkv_bias=True)
    src, tgt, cfg, rep = grow(PRESERVING[case], base=Config(model=base))
    assert rep.function_preserving, rep.reason
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))  # [B, S]
    with torch.no_grad():
        want, got = src(ids).logits, tgt(ids).logits
    assert want.abs().max() > 1.0  # a real check: the logits are not all near zero
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert max_logit_gap(src, tgt, cfg) < 2e-5


@pytest.mark.parametrize("kw,why", [(dict(n_layers=4), "stack repeats"),
                                    (dict(d_model=48), "not a whole multiple")])
def test_unpromised_growth_says_so_and_differs(kw, why):
    depth = "stack" if "n_layers" in kw else "identity"
    src, tgt, cfg, rep = grow(kw, depth)
    assert not rep.function_preserving and why in rep.reason
    assert max_logit_gap(src, tgt, cfg) > 1e-2


def test_stack_repeats_the_layer_stack():
    src, tgt, _, rep = grow(dict(n_layers=5), "stack")
    assert rep.layer_sources == [0, 1, 0, 1, 0] and rep.new_layers == [2, 3, 4]
    for j, i in enumerate(rep.layer_sources):
        torch.testing.assert_close(tgt.layers[j].ffn.w_out.weight, src.layers[i].ffn.w_out.weight)


def test_identity_layers_follow_their_source_with_zero_outputs():
    assert layer_plan(2, 5, "identity") == ([0, 0, 0, 1, 1], [1, 2, 4])
    src, tgt, _, rep = grow(dict(n_layers=5))
    for j in rep.new_layers:
        assert not tgt.layers[j].attn.wo.weight.any() and not tgt.layers[j].ffn.w_out.weight.any()
        torch.testing.assert_close(tgt.layers[j].attn.wq.weight,
                                   src.layers[rep.layer_sources[j]].attn.wq.weight)


def test_identity_layers_learn_from_the_first_step():
    """Zeroed outputs still get gradients (their inputs are not zero), so the inserted layers
    start to contribute after one step; their q/k/v/w_in get none until then."""
    _, tgt, _, rep = grow(dict(n_layers=3))
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))  # [B, S]
    tgt.train()(ids, labels=ids).loss.backward()
    blk = tgt.layers[rep.new_layers[0]]
    assert blk.attn.wo.weight.grad.abs().max() > 0 and blk.ffn.w_out.weight.grad.abs().max() > 0
    assert not blk.attn.wq.weight.grad.any() and not blk.ffn.w_in.weight.grad.any()


def test_unit_map_copies_whole_then_a_random_rest():
    g = torch.Generator().manual_seed(0)
    m = unit_map(4, 8, g)
    assert m.g.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and m.uniform
    m = unit_map(4, 10, g)
    assert m.g[:8].tolist() == [0, 1, 2, 3] * 2 and len(set(m.g[8:].tolist())) == 2
    assert not m.uniform and m.count.sum() == 10
    with pytest.raises(ValueError, match="shrink"):
        unit_map(4, 3, g)


def test_fpi_rules_against_a_plain_swiglu_and_rmsnorm():
    """The equations written out, float64: a pre-norm SwiGLU residual step
    ``y = x + W2 (silu(Wg n) * (Wu n))``, ``n = rmsnorm(x) * w``, grown with
    x' = x[g] (D x2, uniform) and F -> F' (not a multiple) gives y' = y[g]."""
    gen = torch.Generator().manual_seed(0)
    d, f = unit_map(6, 12, gen), unit_map(5, 8, gen)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen)  # [T, D]
    w = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
    wg, wu = (torch.randn(5, 6, dtype=torch.float64, generator=gen) for _ in range(2))  # [F, D]
    w2 = torch.randn(6, 5, dtype=torch.float64, generator=gen)  # [D, F]

    def step(x, w, wg, wu, w2):
        n = x / x.pow(2).mean(-1, keepdim=True).sqrt() * w
        return x + (F.silu(n @ wg.T) * (n @ wu.T)) @ w2.T

    y = step(x, w, wg, wu, w2)
    grown = step(x[:, d.g], write(w, d), write(read(wg, d), f), write(read(wu, d), f),
                 write(read(w2, f), d))
    torch.testing.assert_close(grown, y[:, d.g], atol=1e-12, rtol=1e-12)
    # the head through a tied, copied embedding counts each old unit k times: the final
    # norm's weight divided by k undoes it
    e = torch.randn(7, 6, dtype=torch.float64, generator=gen)  # [V, D]
    torch.testing.assert_close((x[:, d.g] / 2) @ write(e, d, dim=1).T, x @ e.T)


def test_head_maps_keep_query_heads_in_their_group():
    q, kv = head_maps(4, 2, 6, 3)
    assert kv.g.tolist() == [0, 1, 0] and q.g.tolist() == [0, 1, 2, 3, 0, 1]
    for j in range(6):  # query head j sits in new group j // 2, which copies old group kv.g
        assert q.g[j] // 2 == kv.g[j // 2]
    assert (q.count >= 1).all()
    with pytest.raises(ValueError, match="grow model.n_heads at least as much"):
        head_maps(8, 2, 9, 3)


@pytest.mark.parametrize("vision", ["vit_tiny", "patch"])
def test_vlm_growth_keeps_the_logits_with_images(tiny_config, vision):
    cfg = tiny_config(f"vision={vision}", "data=synthetic_vlm", "model.moe_every=0",
                      "model.init_std=0.2")
    src, tgt, tcfg, rep = grow(dict(d_model=2 * cfg.model.d_model, d_ff=300), base=cfg)
    assert rep.function_preserving
    assert max_logit_gap(src, tgt, tcfg) < 2e-5
    if vision == "vit_tiny":  # the tower is copied as is
        torch.testing.assert_close(tgt.vision.state_dict(), src.vision.state_dict())


def test_target_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.d_model=16 is smaller"):
        grown_config(BASE, replace(BASE, d_model=16))
    with pytest.raises(ValueError, match="model.head_dim=16 differs"):
        grown_config(BASE, replace(BASE, d_model=64, head_dim=16))
    with pytest.raises(ValueError, match="model.vocab_size=60 differs"):
        grown_config(BASE, replace(BASE, vocab_size=60, d_model=64))
    with pytest.raises(ValueError, match="target has MoE layers"):
        grown_config(BASE, replace(BASE, d_model=64, moe_every=1))
    with pytest.raises(ValueError, match="nothing grows"):
        grown_config(BASE, BASE)
    # head_dim is written out: a wider d_model keeps the source's head width
    assert grown_config(BASE, replace(BASE, d_model=64)).head_dim == 8


# ---- the command, end to end: a trained dense run -> grow -> train / upcycle ----

TRAIN = ["train.max_steps=2", "train.eval_every=2", "train.batch_size=4", "train.warmup_steps=1",
         "train.progress=false", "data.seq_len=16", "data.n_eval_samples=4"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    from moe_vlm.config import load_config

    d = tmp_path_factory.mktemp("grow")
    cfg = load_config(["vision=none", "data=synthetic_text", "experiment=dense_baseline",
                       "model.n_layers=1", *TRAIN, f"run.dir={d / 'dense'}"])
    return d / "dense", train(cfg, d / "dense")


def test_grow_command_writes_a_dir_that_trains_and_upcycles(dense_run, tmp_path, capsys):
    src, summary = dense_run
    out = tmp_path / "big"
    grow_main(["--from", str(src), "--out", str(out), "model.d_model=128", "model.d_ff=384",
               "model.n_layers=2", "model.n_heads=8"])
    printed = capsys.readouterr().out
    assert "function preserving: True" in printed and "d_model 64->128" in printed
    rec = json.loads((out / "grow.json").read_text())
    assert rec["function_preserving"] and rec["max_abs_logit_diff_vs_source"] < 1e-4
    assert rec["sizes"]["d_model"] == [64, 128] and rec["new_layers"] == [1]
    assert rec["params"][1] > rec["params"][0] and rec["source_kind"] == "run"
    cfg = config_from_file(out / "config.yaml")
    assert cfg.train.init_from == str(out.resolve()) and cfg.model.head_dim == 16

    run = tmp_path / "run"  # train.init_from: starts where the source ended
    s = train(config_from_file(out / "config.yaml", [*TRAIN, f"run.dir={run}"]), run)
    assert s["status"] == "completed" and s["init_from"] == str(out.resolve())
    assert s["initial_eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-4)

    moe = tmp_path / "moe"  # then scale out: upcycle the grown checkpoint
    upcycle_main(["--from", str(out), "--method", "copy", "--out", str(moe), "moe.n_experts=4",
                  "moe.granularity=1", "moe.n_shared=0", "routing.top_k=2",
                  "routing.renormalize=true"])
    assert "function preserving: True" in capsys.readouterr().out
    up = json.loads((moe / "upcycle.json").read_text())
    assert up["function_preserving"] and up["max_abs_logit_diff_vs_dense"] < 1e-4


def test_grow_command_stack_reports_the_gap(dense_run, tmp_path, capsys):
    src, _ = dense_run
    grow_main(["--from", str(src), "--out", str(tmp_path / "s"), "--depth", "stack",
               "model.n_layers=3"])
    assert "function preserving: False (stack repeats" in capsys.readouterr().out
    rec = json.loads((tmp_path / "s" / "grow.json").read_text())
    assert rec["depth"] == "stack" and rec["max_abs_logit_diff_vs_source"] > 1e-3


def test_grow_command_refuses_bad_input(dense_run, tmp_path, capsys):
    src, _ = dense_run
    cases = [
        (["model.d_model=32"], "smaller than the source's 64"),
        (["train.lr=1"], "model.* overrides only"),
        ([], "give the target sizes"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),  # does not divide n_heads: validate()
        (["model.head_dim=32"], "model.head_dim=32 differs from the source's 16"),
    ]
    for overrides, msg in cases:
        with pytest.raises(SystemExit):
            grow_main(["--from", str(src), "--out", str(tmp_path / "x"), *overrides])
        assert msg in capsys.readouterr().err, overrides
    moe = tmp_path / "moe"
    upcycle_main(["--from", str(src), "--method", "copy", "--out", str(moe),
                  "moe.n_experts=2", "moe.granularity=1", "moe.n_shared=0", "routing.top_k=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        grow_main(["--from", str(moe), "--out", str(tmp_path / "y"), "model.d_model=128"])
    assert "is an MoE model" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SystemExit):
        grow_main(["--from", str(src), "--out", str(tmp_path / "full"), "model.d_model=128"])
    assert "not empty" in capsys.readouterr().err


def test_grow_command_reads_a_hugging_face_dir(tmp_path, capsys):
    """A local HF Qwen3 (qk_norm, head_dim 8 set apart from d_model) grown wider and deeper
    with the same logits as transformers computes."""
    import transformers as hf

    from test_hf import make_hf  # tiny random transformers models (this folder)

    model = make_hf("qwen3", head_dim=8, intermediate_size=40, num_hidden_layers=2,
                    tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "big"
    hf.logging.set_verbosity_error()
    grow_main(["--from", str(tmp_path / "hf"), "--out", str(out), "model.d_model=64",
               "model.d_ff=64", "model.n_heads=8", "model.n_kv_heads=4", "model.n_layers=3"])
    assert "function preserving: True" in capsys.readouterr().out
    from moe_vlm.upcycling.source import load_checkpoint
    c = load_checkpoint(out)
    net = _build(c.config).eval()
    net.load_state_dict(c.state_dict)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits, model.eval()(input_ids=ids).logits,
                                   atol=2e-5, rtol=1e-4)
    assert json.loads((out / "grow.json").read_text())["source_kind"] == "hf"
