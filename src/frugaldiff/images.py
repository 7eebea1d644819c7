"""Image helpers: tensors in [-1, 1] ↔ uint8 arrays, sample grids and PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GRID_PAD_VALUE = 255  # white lines between grid cells
MIN_CELL_PIXELS = 64  # save_grid upscales small images until a cell is at least this wide


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] → uint8 array [N, H, W, C] (clamped, rounded)."""
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    scaled = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """uint8 array [N, H, W, C] → float32 images [N, C, H, W] in [-1, 1]."""
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(f"expected a uint8 array [N, H, W, C], got {a.dtype} {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float() / 127.5 - 1


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 images [N, H, W, C] → one uint8 image [H', W', C], ``pad`` white pixels around every cell.

    ``ncols`` defaults to ceil(sqrt(N)), which gives a square-ish grid.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty array [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), GRID_PAD_VALUE, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_grid(
    images: np.ndarray, path: str | os.PathLike[str], ncols: int | None = None, scale: int | None = None
) -> None:
    """Write uint8 images [N, H, W, C] (C = 1 or 3) as one PNG grid, upscaled ``scale``× (nearest neighbour).

    ``scale`` defaults to the smallest factor making each cell at least 64 pixels wide and high.
    The parent folder is created when missing.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [N, H, W, C] with C = 1 or 3, got shape {images.shape}")
    if scale is None:
        scale = max(1, math.ceil(MIN_CELL_PIXELS / min(images.shape[1:3])))
    grid = make_grid(images, ncols)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
