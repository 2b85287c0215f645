"""The recurrent router (``experiment=rmoe``) under expert parallelism and DDP: step 0's
losses, gradients (the shared GRU's, which lives outside the blocks, included) and routing
metrics on 2 gloo processes with ep=2 and whole-block activation checkpointing equal the
single-process step, to float rounding. The router is local: each rank's state rows are
its own real tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from test_expert_parallel import _free_port, spawn_ranks  # noqa: E402
from test_loss_layouts import BASE, SEQ, _same_step, one_step  # noqa: E402

RMOE = [*BASE, *SEQ, "experiment=rmoe", "train.micro_batch_size=2"]


def _worker(rank: int, world: int, ep: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from moe_vlm.config import load_config
    from moe_vlm.parallel.runtime import setup, teardown

    extra = ["parallel.activation_checkpointing=full"] if world > 1 else []
    cfg = load_config([*RMOE, *extra, f"parallel.ep={ep}"])
    layout = setup(cfg.parallel, "cpu")
    res = one_step(cfg, layout)
    if rank == 0:
        torch.save(res, Path(out_dir) / f"w{world}_ep{ep}.pt")
    teardown(layout)


@pytest.mark.timeout(300)
def test_rmoe_step_does_not_depend_on_layout(tmp_path):
    threads = torch.get_num_threads()
    try:
        _worker(0, 1, 1, 0, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    codes = spawn_ranks(_worker, 2, 2, 2, _free_port(), str(tmp_path), timeout=240)
    assert codes == [0, 0], f"exit codes {codes}"
    want = torch.load(tmp_path / "w1_ep1.pt", weights_only=False)
    got = torch.load(tmp_path / "w2_ep2.pt", weights_only=False)
    assert float(want["grads"]["decoder.router_gru.weight_hh"].norm()) > 0
    _same_step(got, want, "rmoe w2 ep2")
