"""Images on disk: PNG grids to look at, ``.npz`` integer arrays to compute with, folders of one PNG per image;
all written atomically (a file whole or not at all, a folder renamed into place when complete)."""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from mulan.checkpoint import atomic_write
from mulan.errors import OutputError

SEPARATOR = (70, 130, 180)  # steel blue: the line between tiles, unlike any grey pixel value
FORMATS = {".png": "a PNG grid", ".npz": "NumPy arrays: images (N, C, H, W) integers 0..V-1, z, num_values"}


def make_grid(images: Tensor, num_values: int, *, nrow: int | None = None, pad: int = 1, scale: int = 1,
              separator: tuple[int, int, int] = SEPARATOR) -> Tensor:
    """(N, C, H, W) integers in 0..V-1 -> one uint8 RGB image (3, H', W'), values 0..255, ``nrow`` tiles a row.

    Each image is enlarged ``scale`` times (nearest) and tiles are separated by ``pad`` pixels of the colour
    ``separator``, so neighbours stay apart even where their borders are black. Grey images become grey RGB;
    channel counts other than 1 and 3 show the first.
    """
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    x = (images.float() * (255.0 / (num_values - 1))).round().clamp(0, 255).to(torch.uint8)
    if c not in (1, 3):  # show the first channel of unusual channel counts
        x, c = x[:, :1], 1
    x = x.expand(n, 3, h, w).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    grid = torch.tensor(separator, dtype=torch.uint8).reshape(3, 1, 1).repeat(1, ncol * (h + pad) + pad,
                                                                                nrow * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def png_bytes(image: Tensor) -> bytes:
    """A uint8 (C, H, W) image (C = 1 or 3) encoded as PNG."""
    from PIL import Image

    c = image.shape[0]
    arr = image.permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def save_png(grid: Tensor, path: Path) -> None:
    """Save a uint8 (C, H, W) image (C = 1 or 3) as a PNG."""
    data = png_bytes(grid)
    atomic_write(Path(path), lambda f: f.write(data))


def save_npz(path: Path, **arrays) -> None:
    """NumPy arrays as one uncompressed .npz, written atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def save_png_folder(images: Tensor, out: Path) -> None:
    """Images (N, C, H, W) uint8, C = 1 or 3, as a new folder ``out`` of PNGs named by index (000000.png...),
    built in a temporary folder beside it and renamed into place; an :class:`OutputError` leaves nothing."""
    out = Path(out)
    width = max(6, len(str(images.shape[0] - 1)))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i, image in enumerate(images):
            (tmp / f"{i:0{width}d}.png").write_bytes(png_bytes(image.to(torch.uint8)))
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not write {out}: {e.strerror or e} (nothing was written)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def grid_scale(shape: tuple[int, ...], tiles: int, min_size: int = 256) -> int:
    """The integer enlargement that makes a grid of ``tiles`` images of ``shape`` (.., H, W) about ``min_size``
    pixels across (small images are enlarged before gridding, so separators stay thin)."""
    across = max(1, math.ceil(math.sqrt(tiles))) * max(shape[-2], shape[-1])
    return max(1, math.ceil(min_size / across))


def save_grid(images: Tensor, num_values: int, path: Path, *, nrow: int | None = None, min_size: int = 256) -> None:
    """Save images (N, C, H, W) with values 0..V-1 as one PNG grid, enlarged to about ``min_size`` pixels."""
    scale = grid_scale(images.shape, images.shape[0], min_size)
    save_png(make_grid(images.cpu(), num_values, nrow=nrow, scale=scale, pad=2 if scale > 1 else 1), path)


def check_format(path: Path) -> str:
    """The suffix of a samples file if mulan writes it (.png, .npz), else a one-line :class:`OutputError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        choices = "; ".join(f"{k} ({v})" for k, v in FORMATS.items())
        raise OutputError(f"cannot write samples as {suffix or 'a file without a suffix'} ({path}): "
                          f"the suffix decides the format, one of {choices}")
    return suffix


def save_samples(images: Tensor, num_values: int, path: Path, *, z: Tensor | None = None) -> None:
    """Samples (N, C, H, W), integers 0..V-1, as the format ``path``'s suffix names (see :data:`FORMATS`).

    ``.npz`` holds ``images`` (uint8, or int32 when V > 256), ``z`` (N, m) float32, the latent each image was
    drawn with ((N, 0) without a latent), and ``num_values``.
    """
    import numpy as np

    if check_format(path) == ".png":
        save_grid(images, num_values, path)
        return
    x = images.cpu().numpy().astype(np.uint8 if num_values <= 256 else np.int32)
    zs = (z.detach().float().cpu().numpy() if z is not None else np.zeros((x.shape[0], 0), np.float32))
    save_npz(path, images=x, z=zs, num_values=np.int64(num_values))
