"""One training run: build, (resume,) train with periodic eval and checkpoints, summarise.

Batches are addressed by (step, micro-batch) and the model holds all other state, so
a run resumed from its last checkpoint replays bit for bit the losses of an uninterrupted
run (on CPU; on CUDA with ``train.deterministic``). Host syncs per optimiser step: the
step's token totals (``train.step.step_loss_norm``), one ``nonzero`` per MoE layer and
micro-batch when the batch is padded, the finiteness check, plus the logging steps.
"""

from __future__ import annotations

import errno
import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf

from moe_vlm.config.environment import check_runnable
from moe_vlm.config.schema import Config, ConfigError
from moe_vlm.data import build_data, build_tokenizer_for
from moe_vlm.errors import CheckpointError, RunDirError
from moe_vlm.model import build_model, count_params, flops_per_token
from moe_vlm.parallel.expert_parallel import (apply_expert_parallel, load_full_state_dict,
                                              set_count_reducers)
from moe_vlm.parallel.runtime import (Layout, check_experts, launched_world, resolve_device,
                                     setup, teardown)
from moe_vlm.train.engine import build_engine
from moe_vlm.train.checkpoint import (checkpoint_path, list_checkpoints, load_latest, load_weights,
                                      quarantined, save_checkpoint)
from moe_vlm.train.evaluate import evaluate
from moe_vlm.train.freeze import apply_trainable
from moe_vlm.train.optim import lr_at
from moe_vlm.train.resume import check_resume_config
from moe_vlm.train.rundir import (MetricsLog, RunDirLock, atomic_write, clean_stale_temporaries,
                                  write_json)
from moe_vlm.train.step import forward_backward_step, layer_metrics


_WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm is NaN/inf under ``train.nan_policy=stop``."""


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast where supported (``auto``: CUDA with bf16), else None (fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def finished_summary(run_dir: Path, max_steps: int) -> Optional[dict[str, Any]]:
    """The run's summary if it completed at least ``max_steps`` steps and its final
    checkpoint is there, else None (not started, running, failed, asked for more steps
    now, or missing its final checkpoint: those run or resume)."""
    try:
        s = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    steps = s.get("steps", -1)
    if s.get("status") == "completed" and steps >= max_steps and \
            checkpoint_path(Path(run_dir) / "checkpoints", steps).is_file():
        return s
    return None


def routed_experts(model: torch.nn.Module) -> int:
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


def train(cfg: Config, run_dir: str | Path, overrides: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run (or resume) the training job described by ``cfg`` in ``run_dir``.

    Under ``torchrun``/``deepspeed`` every process calls this; rank 0 writes the run
    directory, and only once the run is accepted (lock taken, config checked against the
    checkpoint, model and data built): a rejected call leaves the directory as it was.
    ``overrides`` (the CLI's) are recorded in ``.hydra/overrides.yaml``. Returns the final
    summary (also written to ``run_dir/summary.json``)."""
    t_cfg = cfg.train
    check_runnable(cfg, run_dir)  # paths, device, backend, run.dir: before anything is written
    world = launched_world()[0]
    if t_cfg.batch_size % world:
        raise ConfigError(f"train.batch_size={t_cfg.batch_size} is global and must be divisible "
                          f"by the {world} processes")
    restore = deterministic_cuda(t_cfg.deterministic and resolve_device(t_cfg.device).type == "cuda")
    layout = setup(cfg.parallel, t_cfg.device)
    try:
        return _train(cfg, Path(layout.broadcast(str(run_dir))), layout, overrides)
    finally:
        teardown(layout)
        restore()


def deterministic_cuda(enabled: bool) -> Callable[[], None]:
    """``train.deterministic`` on CUDA: bit-identical reruns. Sets the cuBLAS workspace
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, read when cuBLAS starts, so before any CUDA
    work), ``torch.use_deterministic_algorithms(True)`` (deterministic scatter/index
    kernels, an error naming any op without one) and no cuDNN autotuning; our Triton
    kernels then skip autotuning for one fixed config (``triton_kernels.grouped_gemm``).
    CPU runs are deterministic without it. Returns a function restoring the previous
    state (a multirun trains several jobs in one process)."""
    if not enabled:
        return lambda: None
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

    def restore() -> None:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[1], prev[2]

    return restore


def _train(cfg: Config, run_dir: Path, layout: Layout,
           overrides: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Lock the run directory (rank 0; every rank learns the outcome), then train."""
    lock, err = RunDirLock(run_dir), None
    # Ours to remove again if the run is refused: absent or empty (Hydra makes its job dir).
    created = layout.is_main and (not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())))
    if layout.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except RunDirError as e:
            err = str(e)
        except OSError as e:
            err = f"cannot use run.dir {run_dir}: {e.strerror or e}"
    err = layout.broadcast(err)
    if err is not None:
        if created:
            _remove_unaccepted(run_dir)
        raise RunDirError(err)
    try:
        return _train_locked(cfg, run_dir, layout, overrides)
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:  # a full or read-only disk: nothing is lost, say so
            raise RunDirError(
                f"could not write {e.filename or run_dir}: {e.strerror}. Files already on disk "
                "are intact (writes are atomic); fix that and re-run the same command to "
                "resume") from e
        raise
    except BaseException:
        if created:  # refused before it was accepted (data, weights, shapes): leave no trace
            _remove_unaccepted(run_dir)
        raise
    finally:
        lock.release()


def _remove_unaccepted(run_dir: Path) -> None:
    """Remove a run directory this call created, if the run never got past set-up: only
    the lock and a trained tokenizer are in it (otherwise nothing is touched)."""
    ours = {".lock", "tokenizer.json"}
    try:
        if {p.name for p in run_dir.iterdir()} <= ours:
            for name in ours:
                (run_dir / name).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:
        pass


def _resume_state(cfg: Config, run_dir: Path, layout: Layout) -> Optional[dict[str, Any]]:
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


def _train_locked(cfg: Config, run_dir: Path, layout: Layout,
                  overrides: Optional[Sequence[str]]) -> dict[str, Any]:
    t_cfg = cfg.train
    main = layout.is_main
    ckpt_dir = run_dir / "checkpoints"
    done = finished_summary(run_dir, t_cfg.max_steps)
    if done is not None:  # a re-run sweep skips what already finished (with this config)
        if isinstance(done.get("config"), dict):
            check_resume_config(done["config"], asdict(cfg), list(t_cfg.allow_changes),
                                str(run_dir), int(done["steps"]))
        if main:
            print(f"{run_dir}: already completed ({done['steps']} steps); skipping", flush=True)
        return done
    if main:
        clean_stale_temporaries(run_dir)
    state = _resume_state(cfg, run_dir, layout)

    device = layout.device
    amp = autocast_dtype(t_cfg.precision, device)
    torch.manual_seed(cfg.seed)
    if not main:  # rank 0 trains/saves the tokenizer first; the others read it
        layout.barrier()
    tokenizer = build_tokenizer_for(cfg.data, run_dir)
    if main:
        layout.barrier()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} ids; raise it")
    if cfg.vision.name == "none":
        model = build_model(cfg.model, cfg.moe, cfg.routing, device=device, seed=cfg.seed)
        data = build_data(cfg.data, tokenizer)
    else:
        from moe_vlm.model.vlm import build_vlm
        model = build_vlm(cfg, tokenizer.image_id, device=device, seed=cfg.seed)
        data = build_data(cfg.data, tokenizer, model.vision.cfg, model.n_image_tokens)
    check_experts(cfg.parallel.ep, routed_experts(model))
    if state is None and t_cfg.init_from:
        load_weights(model, t_cfg.init_from, map_location=device, trust=t_cfg.trust_checkpoint)
    upcycled = None
    if state is None and cfg.upcycle.method != "none":
        from moe_vlm.upcycling.upcycle import upcycle_from_config
        upcycled = upcycle_from_config(model, cfg)
    n_params = apply_trainable(model, list(t_cfg.trainable))
    counts = count_params(model)
    moes = model.moe_layers()
    summary: dict[str, Any] = {
        "status": "running", "params_total": counts.total, "params_active": counts.active,
        "params_embedding": counts.embedding, "params_trainable": n_params["trainable"],
        "flops_per_token": flops_per_token(model, cfg.data.seq_len, training=True),
        "device": str(device), "precision": str(amp or torch.float32).replace("torch.", ""),
        "expert_backend": moes[0].experts.backend_name(
            torch.empty(0, cfg.model.d_model, device=device)) if moes else None,
        "parallel": layout.describe(),
        "config": asdict(cfg),
    }
    if layout.ep > 1:
        apply_expert_parallel(model, layout.ep_group)
    elif layout.distributed and moes:
        set_count_reducers(model)
    if state is not None:
        try:  # this rank's slice at any layout
            load_full_state_dict(model, state["model"])
        except (RuntimeError, ValueError, KeyError) as e:  # an allowed shape change
            raise CheckpointError(f"{ckpt_dir}: the checkpoint does not fit the model this "
                                  f"config builds ({str(e).splitlines()[0]}); use a new run.dir "
                                  "with train.init_from for a different model") from None
    micro_bs, n_micro, first_micro = local_batches(t_cfg, layout)
    engine = build_engine(cfg, model, layout, micro_bs, n_micro)
    if state is not None:  # everything is built and fits: only now touch the run's records
        engine.load_optimizer_state(state["optimizer"])
    if main:
        atomic_write(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))))
        if overrides is not None:  # what Hydra would record in .hydra/, once the run is accepted
            atomic_write(run_dir / ".hydra" / "overrides.yaml",
                         lambda f: f.write(OmegaConf.to_yaml(OmegaConf.create(list(overrides)))))
    image_id = getattr(tokenizer, "image_id", None) if cfg.vision.name != "none" else None
    if data.chance_accuracy is not None:
        summary["chance_accuracy"] = data.chance_accuracy
    if t_cfg.init_from:
        summary["init_from"] = t_cfg.init_from
    if upcycled is not None:
        summary["upcycle"] = upcycled

    def run_eval() -> dict[str, float]:
        res = evaluate(model, data, t_cfg.micro_batch_size or t_cfg.batch_size, device, amp, layout)
        summary["final_eval_loss"] = res["eval_loss"]
        for k in ("eval_accuracy", "caption_loss"):
            if k in res:
                summary[k] = res[k]
        return res

    def write_summary() -> None:
        if main:
            write_json(run_dir / "summary.json", summary)

    if state is not None:
        torch.set_rng_state(state["rng"])
        step, prior = state["step"], state["summary"]
        summary.update({k: prior[k] for k in (
            "initial_eval_loss", "initial_eval_accuracy", "tokens_seen", "wall_time_s",
            "skipped_steps", "final_train_loss", "final_eval_loss", "eval_accuracy",
            "caption_loss", "upcycle", "changed_on_resume") if k in prior})
        changed = summary.get("changed_on_resume", []) + state["changed_on_resume"]
        if changed:
            summary["changed_on_resume"] = changed
        summary["resumed_from"] = step
        if "parallel" in prior and prior["parallel"] != summary["parallel"]:
            summary["resumed_from_layout"] = prior["parallel"]
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step) if main else None
    else:
        step = 0
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=None) if main else None
        summary.update(tokens_seen=0, wall_time_s=0.0, skipped_steps=0)
        res = run_eval()
        summary["initial_eval_loss"] = res["eval_loss"]
        if "eval_accuracy" in res:
            summary["initial_eval_accuracy"] = res["eval_accuracy"]
        if log is not None:
            log.log({"step": 0, **res})
    summary["steps"] = step
    write_summary()

    def checkpoint(rotate: bool = True) -> Path:
        """Save (collective). Saves made on the way out of a failure do not rotate: they
        must never delete an earlier, good checkpoint."""
        payload = {"step": step, "model": engine.model_state(),  # collectives: every rank
                   "optimizer": engine.optimizer_state(), "rng": torch.get_rng_state(),
                   "summary": summary, "layout": layout.describe()}
        path = checkpoint_path(ckpt_dir, step)
        if main:
            save_checkpoint(ckpt_dir, step, payload, keep=t_cfg.keep_checkpoints if rotate else None)
        layout.barrier()  # a checkpoint counts once it is on disk
        return path

    t_start, wall0 = time.time(), summary["wall_time_s"]
    t_window, tok_window = time.time(), 0
    stop_at = t_cfg.max_steps if t_cfg.stop_after_steps is None else \
        min(t_cfg.max_steps, step + t_cfg.stop_after_steps)
    bar = _progress(t_cfg.max_steps, step, t_cfg.progress and main)
    model.train()
    try:
        while step < stop_at:
            lr = lr_at(step, t_cfg)
            # The step's micro-batches first, so its token totals are known before any
            # forward: every loss is then a share of the global-batch mean.
            batches = [data.train_batch(step, first_micro + m, micro_bs, t_cfg.batch_size)
                       for m in range(n_micro)]
            fb = forward_backward_step(engine, batches, layout, amp, image_id)
            lm_sum, rt_sum, routing_steps = fb.lm_loss, fb.routing_loss, fb.routing
            n_tok = int(fb.norm.n_tokens)  # real (non-padding) tokens of the global batch
            clip = t_cfg.grad_clip if t_cfg.grad_clip > 0 else float("inf")
            grad_norm = engine.reduce_and_clip(clip)
            ok = torch.isfinite(lm_sum + rt_sum)
            if grad_norm is not None:
                ok = ok & torch.isfinite(grad_norm)
            finite = bool(ok)  # host sync; the same on every rank (reduced loss and norm)
            if not finite:
                engine.zero_grad()
                bad = f"loss={(lm_sum + rt_sum).item():.4g}" + \
                    (f", grad_norm={grad_norm.item():.4g}" if grad_norm is not None else "")
                if t_cfg.nan_policy == "stop":
                    path = checkpoint(rotate=False)
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} ({bad}). The state before this step "
                        f"is saved at {path}. Lower train.lr, raise train.warmup_steps, check "
                        f"the data, or set train.nan_policy=skip to skip such steps.")
                summary["skipped_steps"] += 1
                if main:
                    warnings.warn(f"skipped step {step} with non-finite {bad}")
                if summary["skipped_steps"] > t_cfg.max_skipped_steps:
                    path = checkpoint(rotate=False)
                    raise NonFiniteLossError(
                        f"{summary['skipped_steps']} non-finite steps (limit "
                        f"train.max_skipped_steps={t_cfg.max_skipped_steps}); state saved at {path}")
            else:
                norm_in_step = engine.step(lr)
                grad_norm = grad_norm if norm_in_step is None else norm_in_step
                if cfg.routing.bias_update_rate > 0:
                    for j, moe in enumerate(moes):
                        step_counts = torch.stack([r[j].counts for r in routing_steps]).sum(0)
                        moe.update_bias(layout.all_sum(step_counts), cfg.routing.bias_update_rate)
            step += 1
            summary["tokens_seen"] += n_tok
            tok_window += n_tok
            summary["steps"] = step
            if bar is not None:
                bar.update(1)

            row: dict[str, Any] = {}
            if step % t_cfg.log_every == 0 or step == stop_at or not finite:
                now = time.time()
                summary["final_train_loss"] = lm_sum.item()
                row.update(loss=lm_sum.item(), routing_loss=rt_sum.item(), lr=lr,
                           grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                           tokens_per_s=tok_window / max(1e-9, now - t_window),
                           tokens_seen=summary["tokens_seen"], skipped=not finite,
                           routing=layer_metrics(model, fb, layout))
                stats = data.stats(step * t_cfg.batch_size)  # a mixture: per source, to this step
                if stats:
                    row["data"] = summary["data_stats"] = stats
                t_window, tok_window = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
            if step % t_cfg.eval_every == 0 or step == t_cfg.max_steps:
                row.update(run_eval())
            if row and log is not None:
                log.log({"step": step, **row})
            if step % t_cfg.ckpt_every == 0 or step == stop_at:
                summary["wall_time_s"] = wall0 + time.time() - t_start
                checkpoint()
        summary["wall_time_s"] = wall0 + time.time() - t_start
        summary["status"] = "completed" if step >= t_cfg.max_steps else "running"
        write_summary()
        return summary
    except BaseException as e:
        summary["wall_time_s"] = wall0 + time.time() - t_start
        summary["status"] = "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        try:
            write_summary()
        except OSError:  # a full or read-only disk: report the original error
            pass
        raise
    finally:
        if bar is not None:
            bar.close()
