"""``moe_vlm.parallel.parallelize`` and the engine interface on one process: activation
checkpointing changes no loss or gradient and no parameter name, compilation matches eager
with no graph break (dense and MoE blocks) and refuses the backends that do not trace, and DeepSpeed skips a non-finite step as the torch engine does. Expert parallelism,
FSDP and DDP through ``parallelize`` are covered by ``test_launch`` and ``test_loss_layouts``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.errors import ConfigError
from moe_vlm.model import build_model
from moe_vlm.parallel.parallelize import apply_compile, parallelize, repeated_blocks
from moe_vlm.parallel.runtime import Layout
from moe_vlm.train import train
from moe_vlm.train.checkpoint import checkpoint_path
from moe_vlm.train.rundir import read_jsonl
from test_expert_parallel import _free_port  # noqa: E402

TEXT = ["vision=none", "data=synthetic_text", "data.seq_len=32", "moe.backend=torch"]


def _model(*overrides: str):
    cfg = load_config([*TEXT, *overrides])
    return cfg, build_model(cfg.model, cfg.moe, cfg.routing, device=torch.device("cpu"), seed=0)


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, gradients, elements of the tensors autograd kept for the backward) of one
    forward and backward: one pass, so the Triton interpreter's cost is paid once."""
    model.zero_grad(set_to_none=True)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("mode,backend", [("full", "torch"), ("moe", "torch"),
                                          ("moe", "grouped_mm"), ("moe", "triton")])
def test_activation_checkpointing_changes_nothing_but_memory(mode, backend):
    """Same loss and gradients bit for bit (the recompute routes identically), same names
    and state dict, evaluation under no_grad still works; applied twice, once. ``full``
    checkpoints whole blocks, ``moe`` only the routed experts' compute (which then keeps
    fewer tensors for the backward)."""
    routing = ("routing.aux_loss_coef=0.05", "routing.z_loss_coef=0.01", f"moe.backend={backend}")
    cfg, plain = _model(*routing)
    cfg_ac, ckpt = _model(*routing, f"parallel.activation_checkpointing={mode}")
    ids = torch.randint(0, cfg.model.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    keys = list(ckpt.state_dict())
    for _ in range(2):  # applying it twice checkpoints once
        parallelize(ckpt, Layout(device=torch.device("cpu")), cfg_ac)
    assert list(ckpt.state_dict()) == keys
    blocks = [getattr(b, "_moe_vlm_checkpointed", False) for b in repeated_blocks(ckpt)]
    assert all(blocks) if mode == "full" else not any(blocks)
    assert all(m.experts.recompute == (mode == "moe") for m in ckpt.moe_layers())
    want_loss, want, want_saved = _loss_and_grads(plain, ids)
    got_loss, got, got_saved = _loss_and_grads(ckpt, ids)
    assert torch.equal(got_loss, want_loss)
    for name, g in want.items():
        assert torch.equal(got[name], g), name
    with torch.no_grad():
        assert torch.equal(ckpt(input_ids=ids).logits, plain(input_ids=ids).logits)
    if mode == "moe":  # the experts' hidden rows are not among the tensors kept
        assert got_saved < want_saved


@pytest.mark.parametrize("experts,backend", [
    (["moe.backend=grouped_mm", "train.precision=bf16", "parallel.activation_checkpointing=full"],
     "inductor"),
    # custom ops, in Triton's (slow) CPU interpreter: a smaller batch, one step
    (["moe.backend=triton", "train.precision=fp32", "train.batch_size=2", "data.n_eval_samples=2",
      "train.max_steps=1", "train.eval_every=1", "parallel.activation_checkpointing=moe"],
     "aot_eager"),
], ids=["grouped_mm_bf16", "triton_fp32"])
def test_compile_matches_eager_without_a_graph_break(experts, backend, tmp_path, monkeypatch):
    """``parallel.compile`` with activation checkpointing (whole blocks, or the experts)
    through the training loop, on a
    dense block and an MoE block (padded batches): no graph break anywhere, and the loss
    curve of eager to rounding.

    The Triton experts' custom ops run through dynamo and AOTAutograd (their fake
    implementations, autograd and the checkpointed recompute: what ``aot_eager``
    exercises) but not through Inductor's code generation, which the grouped_mm case
    covers: a cold Inductor compile costs ~40 s on 2 cores, mostly C++ builds of
    kernels that only the PyTorch build could get wrong."""
    from torch._dynamo.utils import counters

    if backend != "inductor":
        compile_ = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile",
                            lambda self, *a, **k: compile_(self, *a, backend=backend, **k))

    common = ["vision=none", "data=synthetic_text", "data.seq_len=32", "model.n_dense_layers=1",
              "train.max_steps=2", "train.batch_size=4", "train.progress=false",
              "data.n_eval_samples=8", "train.log_every=1", "train.eval_every=2",
              *experts]
    curves = {}
    for name, extra in (("eager", []), ("compiled", ["parallel.compile=true"])):
        torch._dynamo.reset()
        counters.clear()
        cfg = load_config([*common, *extra, f"run.dir={tmp_path / name}"])
        train(cfg, cfg.run.dir)
        curves[name] = [(r["step"], r.get("loss"), r.get("eval_loss"))
                        for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
    assert counters["stats"]["unique_graphs"] > 0  # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [c[0] for c in curves["compiled"]] == [c[0] for c in curves["eager"]]
    for got, want in zip(curves["compiled"], curves["eager"]):
        for a, b in zip(got[1:], want[1:]):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4))


def test_compile_refuses_what_does_not_trace():
    _, model = _model("moe.backend=grouped_mm")
    with pytest.raises(ConfigError, match="parallel.compile: .*outside bf16"):
        apply_compile(model, None)
    apply_compile(model.to(torch.bfloat16), None)  # bf16 weights: grouped_mm traces
    _, model = _model("moe.backend=triton")
    for moe in model.moe_layers():  # as under expert parallelism: not the local dispatcher
        moe.dispatcher = torch.nn.Module()
    with pytest.raises(ConfigError, match="parallel.compile: the triton backend .*expert parallelism"):
        apply_compile(model, None)


def _nan_at(monkeypatch, call: int) -> dict[str, int]:
    """Make the ``call``-th training forward's loss NaN; returns the call counter (reset
    it to count again)."""
    from moe_vlm.model.decoder import DecoderLM

    orig, calls = DecoderLM.forward, {"n": 0}

    def forward(self, *a, **kw):
        out = orig(self, *a, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                out.lm_loss = out.lm_loss * float("nan")
                out.loss = out.lm_loss + out.routing_loss
        return out

    monkeypatch.setattr(DecoderLM, "forward", forward)
    return calls


@pytest.mark.timeout(300)
def test_deepspeed_skips_a_non_finite_step_like_the_torch_engine(tmp_path, monkeypatch):
    """``train.nan_policy=skip`` under both engines: step 2 is skipped (weights and
    optimizer untouched), and the runs go on with the same losses. On the default VLM,
    whose tower and projector learn at ``train.vision_lr_scale`` (0.1): DeepSpeed keeps the
    scaled groups (the same losses, and the checkpoint's param groups are the torch
    engine's, learning rates and ``lr_scale`` included)."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    common = ["train.max_steps=4", "train.batch_size=4", "train.progress=false",
              "data.n_eval_samples=8", "train.log_every=1", "train.eval_every=4",
              "train.nan_policy=skip", "train.ckpt_every=4", "train.vision_lr_scale=0.1"]
    rows, calls = {}, _nan_at(monkeypatch, 2)
    for engine in ("torch", "deepspeed"):
        calls["n"] = 0
        if engine == "deepspeed":  # one process, initialised by DeepSpeed
            monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
            monkeypatch.setitem(os.environ, "MASTER_PORT", str(_free_port()))
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                monkeypatch.setitem(os.environ, key, value)
        cfg = load_config([*common, f"parallel.engine={engine}", f"run.dir={tmp_path / engine}"])
        try:
            s = train(cfg, cfg.run.dir)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        assert s["skipped_steps"] == 1 and s["status"] == "completed"
        rows[engine] = [r for r in read_jsonl(Path(cfg.run.dir) / "metrics.jsonl") if "loss" in r]
    for engine, got in rows.items():
        assert [r["skipped"] for r in got] == [False, True, False, False], engine
        assert not math.isfinite(float(got[1]["grad_norm"]))  # "nan"/"inf" in the JSON
    for ds, pt in zip(rows["deepspeed"], rows["torch"]):
        if not ds["skipped"]:
            assert ds["loss"] == pytest.approx(pt["loss"], rel=2e-4)
    summary = json.loads((tmp_path / "deepspeed" / "summary.json").read_text())
    assert summary["parallel"]["engine"] == "deepspeed"
    groups = {engine: torch.load(checkpoint_path(tmp_path / engine / "checkpoints", 4),
                                 weights_only=False)["optimizer"]["param_groups"]
              for engine in rows}
    assert groups["deepspeed"] == groups["torch"]
    assert sorted({g.get("lr_scale", 1.0) for g in groups["torch"]}) == [0.1, 1.0]
