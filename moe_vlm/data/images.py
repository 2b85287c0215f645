"""Image loading: file -> normalised ``[3, H, W]`` float tensor.

Shapes: H = W = ``image_size``.

Every image goes through the same path (RGB, square bicubic resize, [0, 1], per-channel
``(x - mean) / std``) so the vision tower sees the statistics it was trained with
(``vision.image_mean`` / ``vision.image_std``). A file that is missing or cannot be
decoded raises ``ImageError`` (a ``ValueError``) naming the path, so a dataset can skip
the row and count why instead of crashing mid-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


class ImageError(ValueError):
    """An image that cannot be used. ``kind`` is ``"missing"`` or ``"corrupt"``."""

    def __init__(self, path: str | Path, kind: str, detail: str = ""):
        self.path, self.kind = str(path), kind
        super().__init__(f"{kind} image {self.path}" + (f": {detail}" if detail else ""))


def image_to_tensor(image: Image.Image, image_size: int, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """A PIL image -> ``[3, image_size, image_size]`` float32, normalised per channel."""
    rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)  # [H, W, 3]
    x = x.permute(2, 0, 1).contiguous()  # [3, H, W]
    m = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
    s = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
    return (x - m) / s  # [3, H, W]


def load_image(path: str | Path, image_size: int, mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """Open, decode fully (so truncated files fail here, not later) and normalise."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "missing", "no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return image_to_tensor(img, image_size, mean, std)  # [3, H, W]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for unknown formats, OSError for
        # truncated data and SyntaxError/ValueError for some malformed headers.
        raise ImageError(path, "corrupt", f"{type(e).__name__}: {e}") from e


__all__ = ["ImageError", "image_to_tensor", "load_image"]
