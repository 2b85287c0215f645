"""Datasets behind one small interface so the default job can swap text for image-text.

A ``DataBundle`` gives deterministic training batches addressed by (step, micro-batch):
resuming needs no iterator state, and a multi-process run can take its slice of the
same global batch. Imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from moe_vlm.config.schema import ConfigError, DataConfig
from moe_vlm.data.sample import IGNORE_INDEX, collate
from moe_vlm.data.synthetic_text import SyntheticText
from moe_vlm.data.tokenizer import ByteTokenizer


class SampleSource(Protocol):
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


@dataclass
class DataBundle:
    train: SampleSource  # indexable; unbounded or with __len__
    eval: SampleSource  # indexable, with __len__
    tokenizer: Any
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] = collate

    def train_batch(self, step: int, micro: int, micro_batch_size: int,
                    batch_size: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``micro`` of global step ``step``: samples
        ``step*batch_size + micro*micro_batch_size + [0, micro_batch_size)``."""
        start = step * batch_size + micro * micro_batch_size
        return self.collate([self.train[start + i] for i in range(micro_batch_size)])

    def eval_batches(self, batch_size: int):
        n = len(self.eval)  # type: ignore[arg-type]
        for start in range(0, n, batch_size):
            yield self.collate([self.eval[i] for i in range(start, min(n, start + batch_size))])


def _synthetic_text(cfg: DataConfig) -> DataBundle:
    return DataBundle(train=SyntheticText(cfg.seq_len, cfg.seed, "train"),
                      eval=SyntheticText(cfg.seq_len, cfg.seed, "eval", cfg.n_eval_samples),
                      tokenizer=ByteTokenizer())


DATASETS: dict[str, Callable[[DataConfig], DataBundle]] = {"synthetic_text": _synthetic_text}


def build_data(cfg: DataConfig) -> DataBundle:
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; choose one of {list(DATASETS)}")
    return DATASETS[cfg.name](cfg)


__all__ = ["ByteTokenizer", "DataBundle", "SyntheticText", "build_data", "collate", "DATASETS"]
