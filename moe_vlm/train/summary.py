"""``summary.json``: the run's one-line record, typed.

``RunSummary`` mirrors the file (the run-directory contract in the README): one field per
key, in the file's order. Optional keys (marked ``omit_if_none``) are absent from the
file until they have a value, as readers of older runs expect; ``expert_backend`` is null
for a dense model. Checkpoints carry the same dict, so a resumed run continues its
counters (``RESUMED``) from the checkpoint, not from the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

_OMIT = {"omit_if_none": True}

# Carried over from the checkpoint's summary when a run resumes.
RESUMED = ("initial_eval_loss", "initial_eval_accuracy", "tokens_seen", "wall_time_s",
           "skipped_steps", "final_train_loss", "final_eval_loss", "eval_accuracy",
           "caption_loss", "upcycle", "changed_on_resume", "eval_accuracy_breakdown",
           "vision_pretrain")


@dataclass
class RunSummary:
    """What ``summary.json`` holds (see the README's run-directory section)."""

    status: str  # running | completed | failed
    params_total: int
    params_active: int  # per token: shared + top-k routed experts, not all of them
    params_embedding: int
    params_trainable: int
    flops_per_token: float  # training FLOPs per token at data.seq_len
    device: str
    precision: str  # float32 | bfloat16 (autocast)
    expert_backend: Optional[str]  # torch | grouped_mm | triton; null for a dense model
    parallel: dict[str, Any]  # the layout: world, dp, ep, engine (, fsdp, applied)
    config: dict[str, Any]  # the resolved config
    chance_accuracy: Optional[float] = field(default=None, metadata=_OMIT)
    init_from: Optional[str] = field(default=None, metadata=_OMIT)
    upcycle: Optional[dict[str, Any]] = field(default=None, metadata=_OMIT)  # its report
    # data.vision_pretrain_steps: the stage's report (moe_vlm.train.vision_pretrain)
    vision_pretrain: Optional[dict[str, Any]] = field(default=None, metadata=_OMIT)
    steps: int = 0
    tokens_seen: int = 0  # real (non-padding) tokens trained on
    wall_time_s: float = 0.0  # summed over every call that trained this run
    skipped_steps: int = 0  # non-finite steps skipped (train.nan_policy=skip)
    initial_eval_loss: Optional[float] = field(default=None, metadata=_OMIT)
    initial_eval_accuracy: Optional[float] = field(default=None, metadata=_OMIT)
    changed_on_resume: Optional[list[dict[str, Any]]] = field(default=None, metadata=_OMIT)
    resumed_from: Optional[int] = field(default=None, metadata=_OMIT)  # the step of the last resume
    resumed_from_layout: Optional[dict[str, Any]] = field(default=None, metadata=_OMIT)
    final_train_loss: Optional[float] = field(default=None, metadata=_OMIT)
    data_stats: Optional[dict[str, Any]] = field(default=None, metadata=_OMIT)  # a mixture's, per source
    final_eval_loss: Optional[float] = field(default=None, metadata=_OMIT)
    eval_accuracy: Optional[float] = field(default=None, metadata=_OMIT)
    # the last evaluation's eval_accuracy_<x>: by question type (and by source for a mixture)
    eval_accuracy_breakdown: Optional[dict[str, float]] = field(default=None, metadata=_OMIT)
    caption_loss: Optional[float] = field(default=None, metadata=_OMIT)
    error: Optional[str] = field(default=None, metadata=_OMIT)  # status failed: why
    # an MoE model's decoder expert weights in bytes as stored (ternary or bf16, shared bf16)
    # and per layer in each format (moe_vlm.model.expert_memory)
    expert_bytes: Optional[int] = field(default=None, metadata=_OMIT)
    expert_memory: Optional[dict[str, Any]] = field(default=None, metadata=_OMIT)
    # routing.force_balance: true (benchmark runs; the routing is round-robin, not learned)
    routing_forced_balance: Optional[bool] = field(default=None, metadata=_OMIT)

    def to_json(self) -> dict[str, Any]:
        """The ``summary.json`` dict (optional keys only once they have a value)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = value
        return out

    def resume(self, prior: dict[str, Any], step: int, changed: list[dict[str, Any]]) -> None:
        """Continue the counters and results of the checkpoint's summary ``prior`` at
        ``step``; ``changed``: this resume's config changes (added to earlier ones)."""
        for key in RESUMED:
            if key in prior:
                setattr(self, key, prior[key])
        self.changed_on_resume = (self.changed_on_resume or []) + changed or None
        self.resumed_from = step
        if "parallel" in prior and prior["parallel"] != self.parallel:
            self.resumed_from_layout = prior["parallel"]

    def record_eval(self, res: dict[str, float], initial: bool = False) -> None:
        """Keep an evaluation's results (``initial``: the one before training)."""
        if initial:
            self.initial_eval_loss = res["eval_loss"]
            self.initial_eval_accuracy = res.get("eval_accuracy")
        self.final_eval_loss = res["eval_loss"]
        self.eval_accuracy = res.get("eval_accuracy", self.eval_accuracy)
        parts = {k[len("eval_accuracy_"):]: v for k, v in res.items() if k.startswith("eval_accuracy_")}
        self.eval_accuracy_breakdown = parts or self.eval_accuracy_breakdown
        self.caption_loss = res.get("caption_loss", self.caption_loss)
