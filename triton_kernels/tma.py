"""TMA (tensor-memory-accelerator) variant of the grouped-GEMM operand loads.

On sm_90+ a tile load through a tensor descriptor is one ``cp.async.bulk.tensor`` issued
by one thread, completing on an mbarrier, instead of every thread issuing 16-byte
``cp.async`` copies: fewer instructions and registers in the main loop, and out-of-bounds
rows and columns come back as zeros from the hardware.

Descriptors are made on the device (``tl.make_tensor_descriptor``), so the block shape
follows the autotuned config and a descriptor can end where a group ends:
- forward (``_gg_kernel``): A [R, K] once per program (rows of the next group may load
  into a tile but only feed output rows that the store masks off) and W as a 3-D
  [E, K, N] (or [E, N, K] read transposed) descriptor, so a K tail never reads the next
  expert's weights;
- weight gradient (``_gg_dw_kernel``): per tile, descriptors over the group's rows only
  (``shape[0] = end - start``): the reduction over rows must not see the next group.
Gathered operands (``HAS_A_IDX`` / ``HAS_B_IDX``) keep pointer loads: Hopper's TMA has no
row gather.

Descriptor creation writes a 128-byte tensor map per descriptor to a global scratch
buffer that Triton asks ``triton.set_allocator`` for at launch; ``ensure_allocator`` sets
a torch-backed one when the user set none. Requirements checked on the host (``*_ok``):
the innermost stride 1, the other strides and the base 16-byte aligned.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

HAS_DEVICE_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")


def _aligned(t: Tensor, *dims: int) -> bool:
    """Base 16-byte aligned, innermost stride 1, the strides of ``dims`` 16-byte multiples."""
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((t.stride(d) * es) % 16 == 0 for d in dims))


def tma_available(device: torch.device) -> bool:
    """This Triton has device-side tensor descriptors and the device has TMA (sm_90+). On
    the CPU: the interpreter emulates descriptors, and launches recorded on CPU tensors
    without it are ahead-of-time compile checks for an sm_90 target."""
    if not HAS_DEVICE_DESCRIPTORS:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return True


def gg_tma_ok(a: Tensor, w: Tensor, a_idx: Optional[Tensor], transpose_w: bool,
              swiglu: bool = False) -> bool:
    """Can ``_gg_kernel`` run its TMA variant on these operands? (A through a descriptor
    only when it is not gathered; W [E, K, N] row-major, or [E, N, K] when transposed.)
    A tile's innermost start must be 16-byte aligned too (Triton's interpreter asserts it):
    with SwiGLU the up columns start at N, so N must be."""
    if not tma_available(a.device):
        return False
    a_ok = a_idx is not None or _aligned(a, 0)
    up_ok = not swiglu or (w.shape[1 if transpose_w else 2] // 2 * w.element_size()) % 16 == 0
    return a_ok and up_ok and _aligned(w, 0, 1)


def dw_tma_ok(a: Tensor, b: Tensor, a_idx: Optional[Tensor], b_idx: Optional[Tensor]) -> bool:
    """Can ``_gg_dw_kernel`` run its TMA variant? A per-group descriptor starts at row
    ``start`` of any group, so the row stride itself must be 16-byte aligned."""
    if not tma_available(a.device) or (a_idx is not None and b_idx is not None):
        return False
    return (a_idx is not None or _aligned(a, 0)) and (b_idx is not None or _aligned(b, 0))


def _alloc(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton a global-scratch allocator for descriptor creation unless the user set
    one. Triton keeps it in a ContextVar, so this runs in every launching thread (the
    backward runs in autograd's device threads)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # pragma: no cover - a Triton without the module: set it anyway
        pass
    triton.set_allocator(_alloc)


@triton.jit
def w_tile(w_desc, e, k0, n0, TRANS_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile of expert ``e`` at (k0, n0) from a 3-D descriptor
    over W [E, K, N], or over W [E, N, K] read transposed."""
    if TRANS_W:
        return w_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
    else:
        return w_desc.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
