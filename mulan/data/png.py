"""A folder of 8-bit PNG files (searched recursively, in order of relative path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.dataset import RawSplits, split_by_fraction
from mulan.data.files import reading, require_dir, resolve
from mulan.errors import DataError

MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode images are converted to
EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}  # converting others (16-bit, float) would clip


def png_files(folder: Path) -> list[Path]:
    """The .png files under ``folder``, sorted by their path relative to it (deterministic across machines)."""
    require_dir(folder, "PNG folder")
    with reading(folder, "PNG folder"):
        found = [p for p in folder.rglob("*") if p.suffix.lower() == ".png" and p.is_file()]
    if not found:
        raise DataError(f"PNG folder {folder} holds no .png files")
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_png(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One PNG as uint8 (H, W, C) in the mode of ``shape``'s channel count."""
    c, h, w = shape
    what = "PNG file"
    with reading(path, what), Image.open(path, formats=["PNG"]) as image:
        if image.size != (w, h):
            raise DataError(f"{what} {path} is {image.width}x{image.height}, expected {w}x{h} (data.shape={shape})")
        if image.mode not in EIGHT_BIT_MODES:
            raise DataError(f"{what} {path} has mode {image.mode}; only 8-bit PNGs are supported")
        return np.array(image.convert(MODES[c])).reshape(h, w, c)


def read_png_folder(folder: Path, shape: tuple[int, ...]) -> Tensor:
    """All PNGs under ``folder`` as uint8 (N, C, H, W), C, H, W from ``shape``."""
    if shape[0] not in MODES:
        raise DataError(f"data.name=png supports 1 (grey) or 3 (RGB) channels, but data.shape={shape}")
    files = png_files(folder)
    images = torch.empty((len(files), *shape), dtype=torch.uint8)
    for i, path in enumerate(files):
        images[i] = torch.from_numpy(read_png(path, shape)).permute(2, 0, 1)
    return images


def load_png(cfg: DataConfig) -> RawSplits:
    """PNGs under ``data.path``; the test set from ``data.test_path``, or split by fraction when it is empty."""
    if not cfg.path:
        raise DataError("data.name=png needs data.path: a folder of .png files")
    root = resolve(cfg.path)
    train = read_png_folder(root, cfg.shape)
    if not cfg.test_path:
        return split_by_fraction(train, cfg, str(root))
    test_root = resolve(cfg.test_path)
    return RawSplits(train, read_png_folder(test_root, cfg.shape), str(root), str(test_root))
