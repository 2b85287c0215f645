"""Everything a training run builds before its first step, in one place: the resume
state, tokenizer, model and data, weights (checkpoint, ``train.init_from``, upcycling),
parallelism (``moe_vlm.parallel.parallelize``), the engine, and the run's summary and
metrics log. The loop (``moe_vlm.train.loop``) then only steps, evaluates and saves.

Order matters for exact resumption: the seed is set before anything random is built, and
checkpoint weights are loaded into the single-process model before it is parallelized
(expert parallelism slices the loaded experts), so any layout resumes any checkpoint.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from moe_vlm.config.schema import Config, ConfigError
from moe_vlm.data import build_data, build_tokenizer_for
from moe_vlm.errors import CheckpointError, RunDirError
from moe_vlm.model import build_model, count_params, flops_per_token
from moe_vlm.model.expert_memory import expert_memory
from moe_vlm.model.vision_moe import vision_moe_layers
from moe_vlm.parallel.engines import Engine
from moe_vlm.parallel.parallelize import parallelize
from moe_vlm.parallel.runtime import Layout, check_experts
from moe_vlm.train.checkpoint import list_checkpoints, load_latest, load_weights, quarantined
from moe_vlm.train.engine import build_engine
from moe_vlm.train.freeze import apply_trainable
from moe_vlm.train.inputs import autocast_dtype
from moe_vlm.train.resume import check_resume_config
from moe_vlm.train.routing_replay import RoutingReplay, open_routing_replay
from moe_vlm.train.rundir import MetricsLog, atomic_write
from moe_vlm.train.trackers import Trackers, open_trackers
from moe_vlm.train.summary import RunSummary


@dataclass
class Run:
    """A set-up run: what every step, evaluation and checkpoint needs."""

    cfg: Config
    run_dir: Path
    layout: Layout
    model: nn.Module  # the single-process module (parameters and state dict)
    data: Any  # moe_vlm.data.DataBundle
    engine: Engine
    amp: Optional[torch.dtype]  # autocast dtype, None = fp32
    image_id: Optional[int]  # the image placeholder token (VLM), for the modality split
    micro_bs: int  # samples per micro-batch on this rank
    n_micro: int  # micro-batches per step on this rank
    first_micro: int  # index of this rank's first micro-batch in the global batch
    summary: RunSummary
    log: Optional[MetricsLog]  # rank 0 only
    step: int  # optimizer steps done (the checkpoint's when resumed)
    resumed: bool  # from a checkpoint (its tensors are not kept: they are in the model now)
    trackers: Optional[Trackers] = None  # rank 0: TensorBoard / W&B mirrors of ``log`` (log.*)
    routing_replay: Optional[RoutingReplay] = None  # routing.replay=record|replay

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def routed_experts(model: nn.Module) -> int:
    """Routed experts per MoE layer (after granularity); 0 for a dense model."""
    moes = model.moe_layers()
    return moes[0].sizes.n_experts if moes else 0


def local_batches(t_cfg: Any, layout: Layout) -> tuple[int, int, int]:
    """(micro-batch size, micro-batches per step, index of this rank's first micro-batch)
    for this rank. Batch sizes are global: rank r reads global samples
    ``[r*B/dp, (r+1)*B/dp)`` of every step, in micro-batches of at most
    ``train.micro_batch_size``, so the union over ranks is the single-process batch."""
    per_rank = t_cfg.batch_size // layout.world
    micro_bs = min(t_cfg.micro_batch_size or t_cfg.batch_size, per_rank)
    if per_rank % micro_bs:
        raise ConfigError(f"train.micro_batch_size={micro_bs} must divide the per-process batch "
                          f"train.batch_size/dp = {per_rank}")
    n_micro = per_rank // micro_bs
    return micro_bs, n_micro, layout.rank * n_micro


def resume_state(cfg: Config, run_dir: Path, layout: Layout) -> Optional[dict[str, Any]]:
    """The newest good checkpoint's state (damaged ones moved aside with a warning), or
    None for a fresh run; refuses a directory whose checkpoints all failed (starting over
    would overwrite the run's records) and a config that changed since the checkpoint."""
    ckpt_dir = run_dir / "checkpoints"
    found = load_latest(ckpt_dir, map_location="cpu", trust=cfg.train.trust_checkpoint,
                        quarantine=layout.is_main)
    layout.barrier()  # rank 0's quarantine renames are done before anyone lists again
    if found is None:
        left = [p.name for _, p in list_checkpoints(ckpt_dir)] + [p.name for p in quarantined(ckpt_dir)]
        if left:
            raise RunDirError(
                f"run.dir {run_dir} has checkpoints but none usable ({', '.join(left[:4])}; see "
                "the warnings above). Starting over would overwrite this run's records: use "
                "another run.dir, or move checkpoints/ and metrics.jsonl away to restart here")
        return None
    path, state = found
    saved = state.get("summary", {}).get("config")
    if saved is None and (run_dir / "config.yaml").is_file():
        from moe_vlm.config.loader import config_from_file
        saved = asdict(config_from_file(run_dir / "config.yaml"))
    if saved is not None:
        state["changed_on_resume"] = check_resume_config(
            saved, asdict(cfg), list(cfg.train.allow_changes), str(run_dir), int(state["step"]))
    return state


def _tokenizer(cfg: Config, run_dir: Path, layout: Layout) -> Any:
    """Rank 0 trains/saves the tokenizer first (a BPE is trained on the corpus); the
    others then read it."""
    if not layout.is_main:
        layout.barrier()
    tokenizer = build_tokenizer_for(cfg.data, run_dir)
    if layout.is_main:
        layout.barrier()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} ids; raise it")
    return tokenizer


def _model_and_data(cfg: Config, tokenizer: Any, device: torch.device) -> tuple[nn.Module, Any]:
    if cfg.vision.name == "none":
        return (build_model(cfg.model, cfg.moe, cfg.routing, device=device, seed=cfg.seed),
                build_data(cfg.data, tokenizer))
    from moe_vlm.model.vlm import build_vlm
    model = build_vlm(cfg, tokenizer.image_id, device=device, seed=cfg.seed)
    return model, build_data(cfg.data, tokenizer, model.vision.cfg, model.n_image_tokens)


def _pretrain_vision(cfg: Config, model: nn.Module, layout: Layout) -> Optional[dict[str, Any]]:
    """``data.vision_pretrain_steps`` on a fresh run (not a resume, ``train.init_from`` or an
    upcycle, whose weights come from elsewhere): the tower and projector pre-trained on the
    synthetic scenes' attributes (``moe_vlm.train.vision_pretrain``); its report, or None
    when off, for data without the scenes, or when nothing it would train is trainable
    (an encoder-free model, or ``train.trainable`` without the vision groups). Every rank
    computes the same stage; rank 0's result is broadcast so the ranks start identical."""
    from moe_vlm.train.vision_pretrain import image_path_params, pretrain_steps, pretrain_vision
    steps = pretrain_steps(cfg)
    if not steps or getattr(model, "projector", None) is None or not image_path_params(model):
        return None
    report = pretrain_vision(model, steps, cfg.train.batch_size, cfg.train.lr, cfg.seed,
                             cfg.data.seed)
    if layout.is_main:
        change = ", ".join(f"{a} {report.accuracy_before[a]:.2f} -> {report.accuracy_after[a]:.2f}"
                           for a in report.accuracy_after)
        print(f"vision pre-training (data.vision_pretrain_steps={steps}): held-out quadrant "
              f"accuracy {change}", flush=True)
    if layout.distributed:
        params = {n: p for n, p in model.named_parameters()
                  if n.startswith(("vision.", "projector."))}
        ref = layout.broadcast({n: p.detach().cpu() for n, p in params.items()})
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ref[n])
    return report.as_dict()


def _load_checkpoint_weights(model: nn.Module, state: dict[str, Any], ckpt_dir: Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as e:  # an allowed shape change
        why = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise CheckpointError(f"{ckpt_dir}: the checkpoint does not fit the model this "
                              f"config builds ({why}); use a new run.dir with "
                              "train.init_from for a different model") from None


def setup_run(cfg: Config, run_dir: Path, layout: Layout, state: Optional[dict[str, Any]],
              overrides: Optional[Sequence[str]]) -> Run:
    """Build the run (model, data, engine, summary, log) for a fresh start (``state``
    None) or a resume from checkpoint ``state``. Writes nothing to the run directory until
    everything is built and fits (``config.yaml`` and the Hydra record last)."""
    t_cfg, device = cfg.train, layout.device
    amp = autocast_dtype(t_cfg.precision, device)
    torch.manual_seed(cfg.seed)
    tokenizer = _tokenizer(cfg, run_dir, layout)
    model, data = _model_and_data(cfg, tokenizer, device)
    vision_moes = vision_moe_layers(model)
    check_experts(cfg.parallel.ep, routed_experts(model),
                  vision_moes[0].sizes.n_experts if vision_moes else 0)
    upcycled = None
    if state is None and t_cfg.init_from:
        load_weights(model, t_cfg.init_from, map_location=device, trust=t_cfg.trust_checkpoint)
    if state is None and cfg.upcycle.method != "none":
        from moe_vlm.upcycling.upcycle import upcycle_from_config
        upcycled = upcycle_from_config(model, cfg)
    n_params = apply_trainable(model, list(t_cfg.trainable))
    vision_pretrain = None
    if state is None and not t_cfg.init_from and cfg.upcycle.method == "none":
        vision_pretrain = _pretrain_vision(cfg, model, layout)
    counts = count_params(model)
    moes = model.moe_layers()
    summary = RunSummary(
        status="running", params_total=counts.total, params_active=counts.active,
        params_embedding=counts.embedding, params_trainable=n_params["trainable"],
        flops_per_token=flops_per_token(model, cfg.data.seq_len, training=True),
        device=str(device), precision=str(amp or torch.float32).replace("torch.", ""),
        expert_backend=moes[0].experts.backend_name(
            torch.empty(0, cfg.model.d_model, device=device)) if moes else None,
        parallel=layout.describe(), config=asdict(cfg),
        chance_accuracy=data.chance_accuracy, init_from=t_cfg.init_from or None, upcycle=upcycled,
        vision_pretrain=vision_pretrain)
    if moes:
        summary.expert_memory = expert_memory(model, cfg.moe.ternary)
        summary.expert_bytes = summary.expert_memory["expert_bytes"]
    if state is not None:
        _load_checkpoint_weights(model, state, run_dir / "checkpoints")
    par = parallelize(model, layout, cfg, amp)
    micro_bs, n_micro, first_micro = local_batches(t_cfg, layout)
    engine = build_engine(cfg, par, layout, micro_bs, n_micro)
    replay = open_routing_replay(cfg, model, layout, micro_bs, n_micro, run_dir,
                                 0 if state is None else state["step"])
    if cfg.routing.force_balance:
        summary.routing_forced_balance = True
        if layout.is_main:
            warnings.warn("routing.force_balance=true: every MoE layer routes round-robin, "
                          "whatever its scores (a benchmark setting: losses and routing metrics "
                          "of this run mean nothing about routing)", stacklevel=2)
    if state is not None:  # everything is built and fits: only now touch the run's records
        engine.load_optimizer_state(state["optimizer"])
        torch.set_rng_state(state["rng"])
        summary.resume(state["summary"], state["step"], state["changed_on_resume"])
    if layout.is_main:
        atomic_write(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))))
        if overrides is not None:  # what Hydra would record in .hydra/, once the run is accepted
            atomic_write(run_dir / ".hydra" / "overrides.yaml",
                         lambda f: f.write(OmegaConf.to_yaml(OmegaConf.create(list(overrides)))))
    step = 0 if state is None else state["step"]
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=None if state is None else step) \
        if layout.is_main else None
    image_id = getattr(tokenizer, "image_id", None) if cfg.vision.name != "none" else None
    trackers = open_trackers(cfg, run_dir, asdict(cfg), None if state is None else step) \
        if layout.is_main else None
    return Run(cfg=cfg, run_dir=run_dir, layout=layout, model=model, data=data, engine=engine,
               amp=amp, image_id=image_id, micro_bs=micro_bs, n_micro=n_micro,
               first_micro=first_micro, summary=summary, log=log, step=step,
               resumed=state is not None, trackers=trackers,
               routing_replay=replay)
