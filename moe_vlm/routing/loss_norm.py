"""Denominators of one optimiser step, so every loss is a mean over the *global* batch.

A step runs ``n_micro`` micro-batches on each of ``n_ranks`` processes. If each
micro-batch took its own per-token mean and the step averaged those, the result would
depend on how the batch was cut whenever micro-batches hold different numbers of target
tokens (padding, answer-only labels): the gradient-accumulation bug Hugging Face fixed in
2024. Instead the training loop counts the step's tokens *before* the step (over all
micro-batches and processes) and every forward divides its sums by these totals. Each
forward then returns its *contribution* to the step loss; the step loss is the sum of the
contributions, and the engines sum gradients over micro-batches and processes.

How each loss scales (``moe_vlm.routing.router``):

- LM loss: sum of token cross-entropies / ``n_targets``.
- z-loss: sum over real tokens of ``logsumexp^2`` / ``n_tokens``.
- aux loss, ``micro_batch`` scope: per micro-batch by design, averaged over the step's
  ``n_micro * n_ranks`` micro-batches (so it depends on the micro-batch size).
- aux loss, ``sequence`` scope: per sequence, averaged over the step's ``n_seqs`` sequences.
- aux loss, ``global_batch`` scope: expert counts summed over the processes of each
  micro-batch index, averaged over the ``n_micro`` indices (the whole batch when there is
  one micro-batch per process).

Only the first three of the five depend on nothing but the global batch; the micro-batch
and global-batch balance losses depend on ``train.micro_batch_size`` by design.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossNorm:
    """Totals over one whole optimiser step (every micro-batch of every process)."""

    n_targets: float  # LM target tokens (labels != -100)
    n_tokens: float  # real (non-padding) tokens, the tokens every MoE layer routes
    n_seqs: float  # sequences holding at least one real token
    n_micro: int = 1  # micro-batches per process
    n_ranks: int = 1  # data-parallel processes
    # images, the sequences the vision tower's MoE layers route (its tokens: images x tokens
    # per image; ``moe_vlm.model.vision_moe.vision_loss_norm``)
    n_images: float = 0.0

    def __post_init__(self) -> None:
        if self.n_micro < 1 or self.n_ranks < 1:
            raise ValueError(f"LossNorm needs n_micro >= 1 and n_ranks >= 1, got {self}")
