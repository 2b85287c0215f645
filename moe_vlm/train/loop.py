"""One training run: set up (``moe_vlm.train.setup``), then step, evaluate, checkpoint
and summarise. ``train_step`` is one optimizer step; ``_loop`` the run around it.

Batches are addressed by (step, micro-batch) and the model holds all other state, so
a run resumed from its last checkpoint replays bit for bit the losses of an uninterrupted
run (on CPU; on CUDA with ``train.deterministic``). Host syncs per optimiser step: the
step's token totals (``train.step.step_loss_norm``: counted on the host, one all-reduce
when distributed) and the finiteness check (the engine's ``step``); the MoE layers have
none (the real tokens' indices come from the host, expert counts are fixed-size). Routing
metrics are made, and read back, on logging steps only.
"""

from __future__ import annotations

import errno
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from moe_vlm.config.environment import check_runnable
from moe_vlm.config.schema import Config, ConfigError
from moe_vlm.errors import RunDirError
from moe_vlm.model.lsh_dispatch import lsh_compression
from moe_vlm.parallel.engines import StepResult
from moe_vlm.parallel.runtime import Layout, launched_world, resolve_device, setup, teardown
from moe_vlm.routing.metrics import collect_routing_stats
from moe_vlm.train.checkpoint import checkpoint_path, save_checkpoint
from moe_vlm.train.evaluate import evaluate
from moe_vlm.train.optim import lr_at
from moe_vlm.train.prefetch import Prefetcher
from moe_vlm.train.resume import check_resume_config
from moe_vlm.train.routing_replay import routing_step
from moe_vlm.train.rundir import RunDirLock, clean_stale_temporaries, write_json
from moe_vlm.train.setup import Run, resume_state, setup_run
from moe_vlm.train.step import (StepForward, forward_backward_step, layer_metrics,
                                update_balance_biases)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm is NaN/inf under ``train.nan_policy=stop``."""


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
    cuda = resolve_device(t_cfg.device).type == "cuda"
    restore = deterministic_cuda(t_cfg.deterministic and cuda)
    restore_tf32 = tf32_matmuls(t_cfg.tf32 and cuda)
    layout = setup(cfg.parallel, t_cfg.device)
    try:
        return _train(cfg, Path(layout.broadcast(str(run_dir))), layout, overrides)
    finally:
        teardown(layout)
        restore_tf32()
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


def tf32_matmuls(enabled: bool) -> Callable[[], None]:
    """``train.tf32`` on CUDA: fp32 matmuls may use TF32 tensor cores
    (``torch.set_float32_matmul_precision("high")``: cuBLAS, and our Triton kernels, which
    follow the same knob). For fp32 runs (``train.precision=fp32``); bf16 autocast does
    not need it. Returns a function restoring the previous precision."""
    if not enabled:
        return lambda: None
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    return lambda: torch.set_float32_matmul_precision(prev)


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


def _train_locked(cfg: Config, run_dir: Path, layout: Layout,
                  overrides: Optional[Sequence[str]]) -> dict[str, Any]:
    done = finished_summary(run_dir, cfg.train.max_steps)
    if done is not None:  # a re-run sweep skips what already finished (with this config)
        if isinstance(done.get("config"), dict):
            check_resume_config(done["config"], asdict(cfg), list(cfg.train.allow_changes),
                                str(run_dir), int(done["steps"]))
        if layout.is_main:
            print(f"{run_dir}: already completed ({done['steps']} steps); skipping", flush=True)
        return done
    if layout.is_main:
        clean_stale_temporaries(run_dir)
    run = setup_run(cfg, run_dir, layout, resume_state(cfg, run_dir, layout), overrides)
    return _loop(run)


@dataclass
class StepOutcome:
    """One optimizer step: its learning rate, forward/backward and engine step."""

    lr: float
    fb: StepForward
    result: StepResult


def step_batches(run: Run, step: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of optimizer step ``step`` (CPU tensors)."""
    return [run.data.train_batch(step, run.first_micro + m, run.micro_bs, run.cfg.train.batch_size)
            for m in range(run.n_micro)]


def train_step(run: Run, step: int, collect: bool = True,
               batches: Optional[list[dict[str, torch.Tensor]]] = None) -> StepOutcome:
    """Optimizer step ``step`` (0-based): read this rank's micro-batches (unless given),
    forward and backward them, let the engine reduce, clip and step (or skip a non-finite
    step), then move the routers' balance biases (``routing.bias_update_rate``) by the
    step's loads. ``collect``: make the logging-only routing metrics (a logging step)."""
    cfg, lay = run.cfg, run.layout
    lr = lr_at(step, cfg.train)
    # All micro-batches first, so the step's token totals are known before any forward:
    # every loss is then a share of the global-batch mean.
    batches = step_batches(run, step) if batches is None else batches
    collect_routing_stats(run.model, collect)
    with routing_step(run.routing_replay, step):  # routing.replay: record or replay this step
        fb = forward_backward_step(run.engine, batches, lay, run.amp, run.image_id, collect)
    result = run.engine.step(lr, fb.lm_loss + fb.routing_loss)
    if not result.skipped and cfg.routing.bias_update_rate > 0:
        update_balance_biases(run.model, fb, lay, cfg.routing.bias_update_rate)
    return StepOutcome(lr, fb, result)


def _loop(run: Run) -> dict[str, Any]:
    """Train ``run`` from its step to ``train.max_steps`` (or ``train.stop_after_steps``
    more), logging, evaluating and checkpointing on the configured cadence; returns the
    summary (also ``summary.json``), with status failed and the error if anything raises."""
    t_cfg, summary, main = run.cfg.train, run.summary, run.layout.is_main
    step = run.step
    if not run.resumed:  # the initial evaluation is part of the run's record
        res = _evaluate(run)
        summary.record_eval(res, initial=True)
        _log(run, {"step": 0, **res})
    summary.steps = step
    _write_summary(run)
    t_start, wall0 = time.time(), summary.wall_time_s
    t_window, tok_window = time.time(), 0
    stop_at = t_cfg.max_steps if t_cfg.stop_after_steps is None else \
        min(t_cfg.max_steps, step + t_cfg.stop_after_steps)
    bar = _progress(t_cfg.max_steps, step, t_cfg.progress and main)
    run.model.train()
    prefetch = Prefetcher(lambda s: step_batches(run, s), t_cfg.prefetch)
    try:
        while step < stop_at:
            log_step = (step + 1) % t_cfg.log_every == 0 or step + 1 == stop_at
            batches = prefetch.take(step)
            # read while the prefetch worker is idle: the counters include this step's samples
            data_stats = run.data.stats((step + 1) * t_cfg.batch_size)
            if step + 1 < stop_at:
                prefetch.ahead(step + 1)
            out = train_step(run, step, log_step, batches)
            if out.result.skipped:
                _non_finite(run, step, out)
            n_tok = int(out.fb.norm.n_tokens)  # real (non-padding) tokens of the global batch
            step += 1
            summary.steps, summary.tokens_seen = step, summary.tokens_seen + n_tok
            tok_window += n_tok
            if bar is not None:
                bar.update(1)
            row: dict[str, Any] = {}
            if log_step or out.result.skipped:
                now = time.time()
                row.update(_train_row(run, out, tok_window / max(1e-9, now - t_window), data_stats))
                t_window, tok_window = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{out.lr:.2e}")
            if step % t_cfg.eval_every == 0 or step == t_cfg.max_steps:
                res = _evaluate(run)
                summary.record_eval(res)
                row.update(res)
            if row:
                _log(run, {"step": step, **row})
            if step % t_cfg.ckpt_every == 0 or step == stop_at:
                summary.wall_time_s = wall0 + time.time() - t_start
                _checkpoint(run, step)
        summary.wall_time_s = wall0 + time.time() - t_start
        summary.status = "completed" if step >= t_cfg.max_steps else "running"
        _write_summary(run)
        return summary.to_json()
    except BaseException as e:
        summary.wall_time_s = wall0 + time.time() - t_start
        summary.status, summary.error = "failed", f"{type(e).__name__}: {e}"
        try:
            _write_summary(run)
        except OSError:  # a full or read-only disk: report the original error
            pass
        raise
    finally:
        prefetch.close()
        collect_routing_stats(run.model, True)  # the model's default, for whoever uses it next
        if run.trackers is not None:
            run.trackers.close()
        if bar is not None:
            bar.close()


def _train_row(run: Run, out: StepOutcome, tokens_per_s: float,
               data_stats: dict[str, int]) -> dict[str, Any]:
    """A logging step's metrics row: losses, lr, gradient norm, throughput, per-layer
    routing metrics (when the step collected them: a skipped step off the logging cadence
    has none), and a mixture's data statistics."""
    summary, fb = run.summary, out.fb
    summary.final_train_loss = loss = fb.lm_loss.item()
    row = dict(loss=loss, routing_loss=fb.routing_loss.item(), lr=out.lr,
               grad_norm=float(out.result.grad_norm), tokens_per_s=tokens_per_s,
               tokens_seen=summary.tokens_seen, skipped=out.result.skipped)
    if fb.collected:
        row["routing"] = layer_metrics(run.model, fb, run.layout)
        ratio = lsh_compression(row["routing"])
        if ratio is not None:  # parallel.lsh: centroid rows sent / rows without LSH
            row["lsh_compression"] = ratio
    if run.cfg.routing.force_balance:  # benchmark rows: not a routing result
        row["routing_forced_balance"] = True
    if data_stats:  # per source, to this step
        row["data"] = summary.data_stats = data_stats
    return row


def _non_finite(run: Run, step: int, out: StepOutcome) -> None:
    """A skipped (non-finite) step under ``train.nan_policy``: ``stop`` saves the state
    before the step and raises; ``skip`` counts it and raises past
    ``train.max_skipped_steps``."""
    t_cfg, summary = run.cfg.train, run.summary
    bad = f"loss={(out.fb.lm_loss + out.fb.routing_loss).item():.4g}, " \
        f"grad_norm={float(out.result.grad_norm):.4g}"
    if t_cfg.nan_policy == "stop":
        path = _checkpoint(run, step, rotate=False)
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({bad}). The state before this step is saved at "
            f"{path}. Lower train.lr, raise train.warmup_steps, check the data, or set "
            "train.nan_policy=skip to skip such steps.")
    summary.skipped_steps += 1
    if run.layout.is_main:
        warnings.warn(f"skipped step {step} with non-finite {bad}")
    if summary.skipped_steps > t_cfg.max_skipped_steps:
        path = _checkpoint(run, step, rotate=False)
        raise NonFiniteLossError(
            f"{summary.skipped_steps} non-finite steps (limit "
            f"train.max_skipped_steps={t_cfg.max_skipped_steps}); state saved at {path}")


def _evaluate(run: Run) -> dict[str, float]:
    t_cfg = run.cfg.train
    return evaluate(run.model, run.data, t_cfg.micro_batch_size or t_cfg.batch_size,
                    run.layout.device, run.amp, run.layout)


def _log(run: Run, row: dict[str, Any]) -> None:
    """A row to ``metrics.jsonl`` (the record) and the trackers that mirror it."""
    if run.log is not None:
        run.log.log(row)
    if run.trackers is not None:
        run.trackers.log(row)


def _write_summary(run: Run) -> None:
    if run.layout.is_main:
        write_json(run.run_dir / "summary.json", run.summary.to_json())


def _checkpoint(run: Run, step: int, rotate: bool = True) -> Path:
    """Save (collective) the state after ``step`` steps. Saves made on the way out of a
    failure do not rotate: they must never delete an earlier, good checkpoint."""
    payload = {"step": step, "model": run.engine.model_state(),  # collectives: every rank
               "optimizer": run.engine.optimizer_state(), "rng": torch.get_rng_state(),
               "summary": run.summary.to_json(), "layout": run.layout.describe()}
    path = checkpoint_path(run.ckpt_dir, step)
    if run.layout.is_main:
        save_checkpoint(run.ckpt_dir, step, payload,
                        keep=run.cfg.train.keep_checkpoints if rotate else None)
    run.layout.barrier()  # a checkpoint counts once it is on disk
    return path
