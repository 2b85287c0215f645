"""Expert parallelism on CPU with gloo in 2 and 4 local processes: outputs, losses and
gradients (gathered per expert shard) match a single-process run of the same model and
batch, and three optimizer steps stay in agreement. The single-process reference runs the
same per-rank slices as micro-batches, so capacity dropping (per micro-batch) compares too.

Legend: B batch, S sequence, E experts, El experts per rank.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch

S, V = 8, 40


@dataclass(frozen=True)
class Case:
    world: int
    n_shared: int = 1
    capacity: float | None = None
    skew: bool = False  # every token routed to rank 0's experts: other ranks receive nothing
    backend: str = "torch"
    ternary: bool = False  # MoTE's ternary experts: per-expert scales, so no exchange of them


CASES = {
    "ep2_shared": Case(2),
    "ep2_skewed_no_shared": Case(2, n_shared=0, skew=True),
    "ep4_capacity": Case(4, capacity=1.0),
    "ep4_skewed_grouped_mm": Case(4, skew=True, backend="grouped_mm"),
    "ep2_triton": Case(2, backend="triton"),  # Triton's CPU interpreter without a GPU
    "ep2_ternary": Case(2, ternary=True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_and_exit(target, *args) -> None:
    """Run ``target`` and leave with ``os._exit``: gloo's background threads outlive
    ``destroy_process_group`` and their static destructors race at interpreter exit,
    aborting about one worker in ten ("terminate called without an active exception",
    seen with torch 2.13 before and after our changes) after its work is done."""
    import sys
    import traceback

    code = 0
    try:
        target(*args)
    except BaseException:  # noqa: BLE001 - reported, then a non-zero exit code
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn_ranks(target, world: int, *args, timeout: float = 180) -> list[int]:
    """Run ``target(rank, *args)`` in ``world`` spawned processes; kill stragglers after
    ``timeout`` s (a hung collective must not hang the suite); return the exit codes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run_and_exit, args=(target, r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def _models(case: Case):
    from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
    from moe_vlm.model.decoder import build_model

    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      moe_every=1, max_seq_len=S, init_std=0.2)
    moe = MoEConfig(n_experts=8, n_shared=case.n_shared, d_expert=8, backend=case.backend,
                    ternary=case.ternary)
    routing = RoutingConfig(gate="softmax_topk", top_k=2, capacity_factor=case.capacity,
                            bias_update_rate=1e-3 if case.skew else 0.0)
    models = [build_model(cfg, moe, routing, "cpu", seed=3) for _ in range(2)]
    if case.skew:
        for m in models:
            for layer in m.moe_layers():
                layer.router.bias.copy_(torch.tensor([100.0, 100.0] + [0.0] * 6))  # rank 0's experts
    return models


@torch.no_grad()
def sync_gradients(model: torch.nn.Module) -> None:
    """Average gradients over all ranks as one global batch, without DDP: dense parameters
    summed over all ranks, expert shards (each held by one rank here) as the engine does
    (``reduce_expert_grads``), both divided by the world size."""
    import torch.distributed as dist

    from moe_vlm.parallel.expert_parallel import expert_parameters, reduce_expert_grads

    world = dist.get_world_size()
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    for p in model.parameters():
        if p.grad is not None and id(p) not in expert_ids:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
    reduce_expert_grads([p for p in experts if p.requires_grad], None, world)


def _worker(rank: int, case: Case, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from moe_vlm.parallel.expert_parallel import apply_expert_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=case.world, timeout=timedelta(seconds=60))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (2 * case.world, S), generator=g)
    labels = torch.randint(0, V, (2 * case.world, S), generator=g)
    slices = [slice(2 * r, 2 * r + 2) for r in range(case.world)]
    mine = slices[rank]
    ref, ep = _models(case)
    apply_expert_parallel(ep)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_ep = torch.optim.SGD(ep.parameters(), lr=0.5)
    errs: dict[str, float] = {}

    def err(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        errs[name] = max(errs.get(name, 0.0), float((a - b).abs().max()) if a.numel() else 0.0)

    for step in range(3):
        opt_ref.zero_grad()
        opt_ep.zero_grad()
        ref_loss = sum(ref(ids[sl], labels=labels[sl]).loss for sl in slices) / case.world
        ref_loss.backward()
        out = ep(ids[mine], labels=labels[mine])
        out.loss.backward()
        sync_gradients(ep)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        err(f"loss_step{step}", loss / case.world, ref_loss.detach())
        if step == 0:
            with torch.no_grad():
                err("logits", out.logits, ref(ids[mine]).logits)
        ref_params = dict(ref.named_parameters())
        for name, p in ep.named_parameters():
            want = ref_params[name]
            if ".experts." in name:  # this rank's shard of the global expert tensor
                el = p.shape[0]
                want_grad, want_val = (t[rank * el:(rank + 1) * el] for t in (want.grad, want.data))
            else:
                want_grad, want_val = want.grad, want.data
            err("grad " + name.split(".", 2)[-1], p.grad, want_grad)
            err("param", p.data, want_val)
        received = sum(int(layer.router.count_reducer is not None) for layer in ep.moe_layers())
        errs["layers_with_reducer"] = float(received)
        opt_ref.step()
        opt_ep.step()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(errs, f)
    dist.destroy_process_group()


def run_world(case: Case, tmp_path) -> list[dict[str, float]]:
    codes = spawn_ranks(_worker, case.world, case, _free_port(), str(tmp_path))
    assert codes == [0] * case.world, f"ranks exited with {codes}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(case.world)]


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_matches_single_process(name, tmp_path):
    results = run_world(CASES[name], tmp_path)
    for rank, errs in enumerate(results):
        assert errs.pop("layers_with_reducer") == 2.0
        bad = {k: v for k, v in errs.items() if v > 2e-5}
        assert not bad, f"rank {rank}: {bad}"


def test_expert_count_must_divide(tmp_path):
    """ep=3 over 8 experts is refused with a message naming parallel.ep."""
    spawn_ranks(_refuse_worker, 3, _free_port(), str(tmp_path), timeout=120)
    msgs = [(tmp_path / f"msg{r}.txt").read_text() for r in range(3)]
    assert all("choose parallel.ep dividing the expert count" in m for m in msgs)


def _refuse_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from moe_vlm.parallel.expert_parallel import apply_expert_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=timedelta(seconds=60))
    _, model = _models(Case(3))
    try:
        apply_expert_parallel(model)
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    with open(os.path.join(out_dir, f"msg{rank}.txt"), "w") as f:
        f.write(msg)
    dist.destroy_process_group()
