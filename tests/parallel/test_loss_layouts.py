"""One training step's losses, gradients and routing metrics do not depend on the process
layout or on ``train.micro_batch_size`` (to float rounding): 1, 2 and 4 gloo processes,
ep 1 and 2, micro-batches of 1, 2 and all samples, through the training code itself
(``parallelize`` + ``build_engine`` + ``forward_backward_step`` + ``clip_gradients``), on the image-text
job's data (samples of different lengths, so every micro-batch and rank pads differently
and holds a different number of target tokens).

Routing losses whose scope is the micro-batch are per micro-batch by design, so the cases
are the sequence-wise balance loss with the z-loss (any layout, any micro-batch size) and
the global-batch balance loss (any layout, one micro-batch per process).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from test_expert_parallel import _free_port, spawn_ranks  # noqa: E402

BASE = ["moe.backend=torch", "train.batch_size=4", "train.progress=false",
        "routing.aux_loss_coef=0.05"]
SEQ = ["routing.aux_loss_scope=sequence", "routing.z_loss_coef=0.01"]
GLOBAL = ["routing.aux_loss_scope=global_batch"]
# (processes, ep) -> [(case name, overrides)]; "seq_mb<n>" cases use micro-batches of n
LAYOUTS = {
    (1, 1): [("seq_mb4", [*SEQ, "train.micro_batch_size=4"]), ("seq_mb1", [*SEQ, "train.micro_batch_size=1"]),
             ("seq_mb2", [*SEQ, "train.micro_batch_size=2"]), ("global", GLOBAL)],
    (2, 1): [("seq_mb1", [*SEQ, "train.micro_batch_size=1"]), ("global", GLOBAL)],
    (2, 2): [("seq_mb2", [*SEQ, "train.micro_batch_size=2"]), ("global", GLOBAL)],
    (4, 2): [("seq_mb1", [*SEQ, "train.micro_batch_size=1"]), ("global", GLOBAL)],
}
REL = 1e-6


def one_step(cfg, layout) -> dict:
    """Build the run's model, data and engine as ``moe_vlm.train.loop`` does, run step 0's
    forward/backward and gradient reduction; -> losses, metrics and full gradients."""
    from moe_vlm.data import build_data, build_tokenizer_for
    from moe_vlm.model.vlm import build_vlm
    from moe_vlm.parallel.expert_parallel import gather_shards, sharded_experts
    from moe_vlm.parallel.parallelize import parallelize
    from moe_vlm.train.engine import build_engine
    from moe_vlm.train.setup import local_batches
    from moe_vlm.train.step import forward_backward_step, layer_metrics

    tok = build_tokenizer_for(cfg.data)
    model = build_vlm(cfg, tok.image_id, device=layout.device, seed=cfg.seed)
    data = build_data(cfg.data, tok, model.vision.cfg, model.n_image_tokens)
    micro_bs, n_micro, first = local_batches(cfg.train, layout)
    engine = build_engine(cfg, parallelize(model, layout, cfg), layout, micro_bs, n_micro)
    batches = [data.train_batch(0, first + m, micro_bs, cfg.train.batch_size) for m in range(n_micro)]
    fb = forward_backward_step(engine, batches, layout, None, tok.image_id)
    engine.max_norm = float("inf")  # the full gradients, unclipped
    engine.clip_gradients()
    shards = {f"{n}.{p}": disp for n, (_, disp) in sharded_experts(model).items()
              for p in ("w_in", "w_out")}
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[name] = gather_shards(g, shards[name], None) if name in shards else g.detach().clone()
    return {"lm": float(fb.lm_loss), "routing": float(fb.routing_loss),
            "metrics": layer_metrics(model, fb, layout), "grads": grads,
            "n_targets": fb.norm.n_targets, "micro_batches": n_micro}


def _worker(rank: int, world: int, ep: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from moe_vlm.config import load_config
    from moe_vlm.parallel.runtime import setup, teardown

    layout = None
    for name, overrides in LAYOUTS[(world, ep)]:
        cfg = load_config([*BASE, *overrides, f"parallel.ep={ep}"])
        layout = layout or setup(cfg.parallel, "cpu")
        res = one_step(cfg, layout)
        if rank == 0:
            torch.save(res, Path(out_dir) / f"w{world}_ep{ep}_{name}.pt")
    teardown(layout)


def assert_rel(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Norm-wise relative error. Gradients that are zero in exact arithmetic (a key bias
    under softmax) hold rounding noise of ~1e-13: both must be that small."""
    if float(want.norm()) < 1e-9:
        assert float(got.norm()) < 1e-9, what
        return
    err = float((got - want).norm() / want.norm())
    assert err <= REL, f"{what}: relative error {err:.3g} > {REL}"


def _same_step(got: dict, want: dict, what: str) -> None:
    assert got["n_targets"] == want["n_targets"]
    for key in ("lm", "routing"):
        assert got[key] == pytest.approx(want[key], rel=REL), (what, key)
    for name, g in want["grads"].items():
        assert_rel(got["grads"][name], g, f"{what} grad {name}")
    for layer, row in want["metrics"].items():
        mine = got["metrics"][layer]
        for key in ("tokens_per_expert", "tokens_per_expert_image", "tokens_per_expert_text"):
            assert mine[key] == row[key], (what, layer, key)  # counts are exact
        for key in ("max_violation", "drop_frac", "entropy", "aux_loss", "z_loss"):
            assert mine[key] == pytest.approx(row[key], rel=REL, abs=1e-9), (what, layer, key)


@pytest.mark.timeout(600)
def test_losses_grads_and_metrics_do_not_depend_on_layout(tmp_path):
    for world, ep in LAYOUTS:
        if world == 1:  # in this process: keep its thread count for the tests after this one
            threads = torch.get_num_threads()
            try:
                _worker(0, 1, 1, 0, str(tmp_path))
            finally:
                torch.set_num_threads(threads)
            continue
        codes = spawn_ranks(_worker, world, world, ep, _free_port(), str(tmp_path), timeout=300)
        assert codes == [0] * world, f"world={world} ep={ep}: exit codes {codes}"
    res = {p.stem: torch.load(p, weights_only=False) for p in tmp_path.glob("*.pt")}
    seq_ref, glob_ref = res.pop("w1_ep1_seq_mb4"), res.pop("w1_ep1_global")
    assert seq_ref["micro_batches"] == 1
    assert res["w1_ep1_seq_mb1"]["micro_batches"] == 4  # the cases really differ in layout
    for name, got in res.items():
        _same_step(got, glob_ref if name.endswith("global") else seq_ref, name)
    assert len(res) == sum(len(v) for v in LAYOUTS.values()) - 2
    # The sequence scope and the global scope are different losses (the test compares
    # something): the gradients differ between them.
    diff = seq_ref["grads"]["decoder.layers.0.ffn.router.weight"] - \
        glob_ref["grads"]["decoder.layers.0.ffn.router.weight"]
    assert float(diff.norm()) > 1e-6
