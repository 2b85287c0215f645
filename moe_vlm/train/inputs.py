"""What a model's forward gets in training and evaluation: the batch's tensors on the
device, and the precision it runs in (``train.precision``: autocast or fp32)."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from torch import Tensor

from moe_vlm.model.moe import real_rows


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast where supported (``auto``: CUDA with bf16), else None (fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """Autocast to ``dtype`` on ``device``'s type; nothing when ``dtype`` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The keyword arguments a model's forward takes from a (CPU) batch, on ``device``.

    The token mask goes too, so padding is not routed in evaluation either (with capacity
    dropping or expert choice it would compete with real tokens for slots), with the real
    tokens' flat indices found here on the host (``token_rows``), so no MoE layer asks the
    device for them. A batch without padding passes neither."""
    keys = [k for k in ("input_ids", "labels", "pixel_values", "doc_ids", "position_ids")
            if k in batch]
    host = {k: batch[k] for k in keys}
    mask = batch.get("token_mask")
    if mask is not None:
        rows = real_rows(mask.cpu())  # [T], or None: nothing padded
        if rows is not None:
            host.update(token_mask=mask, token_rows=rows)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in host.items()}
    # Pinned host memory lets the copies run asynchronously, queued on the stream before
    # the forward that reads them, instead of each waiting for the host.
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items()}
