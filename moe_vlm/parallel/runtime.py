"""The process layout of a run: how many processes, which rank this is, and the
``DeviceMesh`` that experts and data are split over.

Ranks form a 2-D mesh ``("edp", "ep")`` of shape ``(world // ep, ep)``:

- every rank is a data-parallel replica (``dp = world``) and reads its own slice of the
  global batch; dense parameters are replicated on all ranks (or sharded over them with
  FSDP, ``dp_mesh``) and their gradients averaged over all;
- the ``ep`` ranks of a mesh row (consecutive ranks, so one node when ``ep`` <= GPUs per
  node) each hold ``E / ep`` experts and exchange tokens by all-to-all;
- the ``world // ep`` ranks of a mesh column hold the same experts (expert data
  parallelism) and average those experts' gradients among themselves.

Launchers (``torchrun``, ``deepspeed``) say the layout through ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; without them the run is one process. The process group uses NCCL
when the run is on CUDA and gloo on CPU; a collective that waits longer than
``MOE_VLM_DIST_TIMEOUT_MIN`` minutes (default 30) fails the run instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moe_vlm.config.schema import ConfigError, ParallelConfig

TIMEOUT = timedelta(minutes=int(os.environ.get("MOE_VLM_DIST_TIMEOUT_MIN", "30")))


def launched_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the launcher's environment; (1, 0, 0) without."""
    env = os.environ
    return int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))


def check_layout(pcfg: ParallelConfig, world: int) -> None:
    """Refuse layouts that do not fit the launched processes, with what to change."""
    launch = "launch with `torchrun --nproc-per-node=N` (or the deepspeed launcher)"
    if pcfg.dp is not None and pcfg.dp != world:
        raise ConfigError(
            f"parallel.dp={pcfg.dp} but {world} process(es) were launched; {launch} so that "
            f"nodes x processes per node = parallel.dp, or leave parallel.dp=null (= all processes)")
    if pcfg.ep > world:
        raise ConfigError(f"parallel.ep={pcfg.ep} needs at least {pcfg.ep} processes but "
                          f"{world} were launched; {launch} with N a multiple of {pcfg.ep}")
    if world % pcfg.ep:
        raise ConfigError(f"parallel.ep={pcfg.ep} must divide the {world} processes "
                          f"(experts are sharded over ep ranks, replicated over world/ep)")


def check_experts(ep: int, n_experts: int, n_vision_experts: int = 0) -> None:
    """``n_experts`` routed experts per decoder layer (after granularity; 0 for a dense
    decoder) and ``n_vision_experts`` per vision MoE layer (0: none) must split evenly
    over ``ep`` ranks: expert parallelism shards both."""
    if ep > 1 and n_experts == 0 and n_vision_experts == 0:
        raise ConfigError("parallel.ep > 1 needs MoE layers; this model is dense (set parallel.ep=1)")
    if ep > 1 and n_experts % ep:
        raise ConfigError(f"parallel.ep={ep} must divide the {n_experts} routed experts "
                          f"(moe.n_experts x moe.granularity); pick an ep that divides it")
    if ep > 1 and n_vision_experts % ep:
        raise ConfigError(f"parallel.ep={ep} must divide the {n_vision_experts} experts of the "
                          "vision MoE layers (vision.moe_experts); pick an ep that divides it")


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use auto or cpu")
    return dev


@dataclass
class Layout:
    """This process's place in the run. ``world == 1`` is a plain single-process run."""

    device: torch.device
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    ep: int = 1
    engine: str = "torch"
    fsdp: bool = False  # dense weights sharded with FSDP2 over dp_mesh
    mesh: Any = None  # DeviceMesh ("edp", "ep") when world > 1
    dp_mesh: Any = None  # 1-D DeviceMesh ("dp",) over all ranks, for FSDP

    @property
    def lockstep(self) -> bool:
        """Whether every forward runs collectives (EP all-to-all, FSDP all-gathers), so all
        ranks must run the same number of forwards."""
        return self.distributed and (self.ep > 1 or self.fsdp)

    @property
    def dp(self) -> int:
        return self.world

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("ep") if self.mesh is not None else None

    @property
    def edp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("edp") if self.mesh is not None else None

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all ranks, in place (identity on one process)."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def describe(self) -> dict[str, Any]:
        out = {"world": self.world, "dp": self.dp, "ep": self.ep, "engine": self.engine}
        if self.fsdp:
            out["fsdp"] = True
        return out


_INITS: list[str] = []


def _attempt_store(world: int, rank: int) -> Optional[dist.Store]:
    """Under torchrun, the rendezvous store with a per-attempt key prefix, else None (plain
    ``env://``). torchrun keeps its store across ``--max-restarts`` restarts, and without a
    prefix the restarted processes can read their peers' addresses from the failed attempt
    and fail to connect (seen with gloo on torch 2.13)."""
    env = os.environ
    attempt = env.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in env:
        return None
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts the store
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=TIMEOUT,
                          **({} if agent else {"multi_tenant": True}))
    _INITS.append(attempt)  # one prefix per process-group init (a multirun inits per job)
    return dist.PrefixStore(f"moe_vlm/attempt_{attempt}/init_{len(_INITS)}/", store)


def setup(pcfg: ParallelConfig, device_name: str) -> Layout:
    """Check the layout, join the process group (if launched with several processes) and
    build the mesh. ``device_name`` is ``train.device``; with several processes on CUDA
    each takes ``cuda:LOCAL_RANK``."""
    world, rank, local_rank = launched_world()
    check_layout(pcfg, world)
    device = resolve_device(device_name)
    if world == 1:
        return Layout(device=device, engine=pcfg.engine)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _attempt_store(world, rank)
        where = {"store": store, "rank": rank, "world_size": world} if store is not None else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **where,
                                **({"device_id": device} if device.type == "cuda" else {}))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // pcfg.ep, pcfg.ep), mesh_dim_names=("edp", "ep"))
    dp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",)) if pcfg.fsdp else None
    return Layout(device=device, world=world, rank=rank, local_rank=local_rank, ep=pcfg.ep,
                  engine=pcfg.engine, fsdp=pcfg.fsdp, mesh=mesh, dp_mesh=dp_mesh)


def teardown(layout: Layout) -> None:
    """Leave the process group (end of a run), so a launcher sees a clean exit."""
    if layout.distributed and dist.is_initialized():
        dist.destroy_process_group()
