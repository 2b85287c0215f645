"""A checkpoint saved from an ep=2 run (expert shards gathered) loads at ep=1 (a plain
single process) and at ep=4 with identical eval loss."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch

from test_expert_parallel import Case, _free_port, _models, spawn_ranks, sync_gradients  # noqa: E402

V, S = 40, 8


def _batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, V, (8, S), generator=g)
    return ids, torch.randint(0, V, (8, S), generator=g)


def _eval_loss(model, slices) -> torch.Tensor:
    ids, labels = _batch()
    with torch.no_grad():
        return sum(model(ids[sl], labels=labels[sl]).loss for sl in slices)


def _worker(rank: int, world: int, port: int, mode: str, path: str) -> None:
    import torch.distributed as dist

    from moe_vlm.parallel.expert_parallel import (apply_expert_parallel, full_state_dict,
                                                  load_full_state_dict)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    _, model = _models(Case(world))
    apply_expert_parallel(model)
    per = 4 // world
    mine = [slice(2 * i, 2 * i + 2) for i in range(rank * per, (rank + 1) * per)]
    if mode == "save":  # one SGD step so the weights differ from any fresh init, then save
        ids, labels = _batch()
        loss = sum(model(ids[sl], labels=labels[sl]).loss for sl in mine)
        loss.backward()
        sync_gradients(model)  # dense replicas stay identical across ranks
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
        state = full_state_dict(model)
        if rank == 0:
            torch.save({"model": state}, os.path.join(path, "ckpt.pt"))
    else:
        for p in model.parameters():  # make sure the values come from the checkpoint
            p.data.normal_()
        load_full_state_dict(model, torch.load(os.path.join(path, "ckpt.pt"))["model"])
    total = _eval_loss(model, mine)
    dist.all_reduce(total)
    if rank == 0:
        with open(os.path.join(path, f"{mode}{world}.json"), "w") as f:
            json.dump({"eval_loss": float(total) / 4}, f)
    dist.destroy_process_group()


def _run(world: int, mode: str, path) -> None:
    assert spawn_ranks(_worker, world, world, _free_port(), mode, str(path)) == [0] * world


def test_checkpoint_moves_between_layouts(tmp_path):
    _run(2, "save", tmp_path)
    saved = json.loads((tmp_path / "save2.json").read_text())["eval_loss"]
    _, single = _models(Case(1))
    single.load_state_dict(torch.load(tmp_path / "ckpt.pt")["model"])  # ep=1: plain load
    at1 = float(_eval_loss(single, [slice(2 * i, 2 * i + 2) for i in range(4)])) / 4
    _run(4, "load", tmp_path)
    at4 = json.loads((tmp_path / "load4.json").read_text())["eval_loss"]
    assert abs(at1 - saved) < 1e-5 and abs(at4 - saved) < 1e-5, (saved, at1, at4)
