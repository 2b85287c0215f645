"""Counting ids into a fixed number of bins, without a host sync.

``torch.bincount`` sizes its output by the largest id, so on CUDA it reads that id back to
the host (a sync in every MoE layer), and for ``torch.compile`` its output size is
data-dependent. The bin count is always known here (experts, groups), so a
``scatter_add_`` into ``n`` zeros gives the same integers with neither.
"""

from __future__ import annotations

import torch
from torch import Tensor


def count_ids(ids: Tensor, n: int) -> Tensor:
    """Occurrences of each value of ``ids`` (any shape, int64, values in ``[0, n)``) ->
    int64 ``[n]``; equal to ``torch.bincount(ids.flatten(), minlength=n)``. An id outside
    ``[0, n)`` is an index error (on CUDA a device-side assert), never a longer output."""
    flat = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int64))
