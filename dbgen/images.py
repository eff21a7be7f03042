"""Image grids: many uint8 images as one PNG (the trainer's periodic samples and ``python -m dbgen.sample``)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import write_atomic

__all__ = ["image_grid", "save_grid"]


def image_grid(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` -> one uint8 ``(rows*(H+pad)-pad, cols*(W+pad)-pad, C)`` array, row-major, with
    ``ceil(sqrt(N))`` columns and white gaps of ``pad`` pixels."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, dtype=np.uint8)
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = hwc[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path) -> Path:
    """Write :func:`image_grid` of ``images`` as a PNG, atomically; returns the path."""
    grid = image_grid(images)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    return write_atomic(path, buf.getvalue())
