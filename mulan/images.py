"""Image grids as PNG files (Pillow), written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from torch import Tensor

from mulan.checkpoint import atomic_write


def make_grid(images: Tensor, num_values: int, *, nrow: int | None = None, pad: int = 1) -> Tensor:
    """(N, C, H, W) integers in 0..V-1 -> one uint8 image (C', H', W') with C' in {1, 3}, values 0..255."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    x = (images.float() * (255.0 / (num_values - 1))).round().clamp(0, 255).to(torch.uint8)
    if c not in (1, 3):  # show the first channel of unusual channel counts
        x, c = x[:, :1], 1
    grid = torch.zeros((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def save_png(grid: Tensor, path: Path, *, min_size: int = 256) -> None:
    """Save a uint8 (C, H, W) image, enlarged by an integer factor (nearest) to at least ``min_size``."""
    from PIL import Image

    c, h, w = grid.shape
    arr = grid.permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = max(1, math.ceil(min_size / max(h, w)))
    if scale > 1:
        img = img.resize((w * scale, h * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def save_grid(images: Tensor, num_values: int, path: Path, *, nrow: int | None = None) -> None:
    """Save images (N, C, H, W) with values 0..V-1 as one PNG grid."""
    save_png(make_grid(images.cpu(), num_values, nrow=nrow), path)
