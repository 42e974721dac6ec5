"""Downsampled ImageNet (32x32 or 64x64) as .npz batches.

Each batch holds ``data`` (N, 3*H*W) uint8 in CHW order (and ``labels``, unused). A folder holds
``train_data_batch_1.npz``... and ``val_data.npz``; ``data.path`` may also name a single .npz.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.dataset import RawSplits, split_by_fraction
from mulan.data.files import one_line, reading, require_file, resolve
from mulan.errors import DataError

CHANNELS = 3  # downsampled ImageNet is RGB
TRAIN_GLOB = "train_data_batch_*.npz"
TEST_FILE = "val_data.npz"


def read_npz_images(path: Path, shape: tuple[int, ...]) -> Tensor:
    """The ``data`` array of one .npz batch as uint8 (N, 3, H, W), H and W from ``shape`` (C, H, W).

    Rows of another length are reshaped to the square they describe, so the shape check reports it.
    """
    what = "npz file"
    require_file(path, what)
    with reading(path, what):
        if not zipfile.is_zipfile(path):
            raise DataError(f"{what} {path} is not a zip/npz archive")
        with np.load(path, allow_pickle=False) as archive:
            if "data" not in archive.files:
                keys = one_line(", ".join(archive.files[:8]), 120)
                raise DataError(f"{what} {path} has no 'data' array (arrays: {keys or 'none'})")
            data = archive["data"]
    if data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{what} {path}: 'data' is a {data.dtype} array {data.shape}, expected uint8 (N, 3*H*W)")
    if data.shape[0] == 0:
        raise DataError(f"{what} {path} holds no images")
    _, h, w = shape
    if data.shape[1] != CHANNELS * h * w:
        side = math.isqrt(data.shape[1] // CHANNELS)
        if CHANNELS * side * side != data.shape[1]:
            raise DataError(f"{what} {path}: rows of {data.shape[1]} values are not 3 square channels")
        h = w = side
    return torch.from_numpy(np.ascontiguousarray(data).reshape(-1, CHANNELS, h, w).copy())


def _batch_number(path: Path) -> tuple[int, str]:
    """Sort key: the batch number in the file name (so batch 10 follows batch 9), then the name."""
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else -1, path.name)


def read_npz_batches(paths: list[Path], shape: tuple[int, ...], limit: int) -> Tensor:
    """The batches in order, concatenated; stops early once ``limit`` (> 0) images are read."""
    parts: list[Tensor] = []
    for path in paths:
        parts.append(read_npz_images(path, shape))
        if limit > 0 and sum(len(p) for p in parts) >= limit:
            break
    return torch.cat(parts)


def _test_file(text: str) -> Path:
    """``data.test_path`` as a file: itself, or ``val_data.npz`` inside it when it is a folder."""
    path = resolve(text)
    return path / TEST_FILE if path.is_dir() else path


def load_imagenet32(cfg: DataConfig) -> RawSplits:
    """Train batches and val_data from the folder ``data.path``, or a single .npz split by fraction."""
    if not cfg.path:
        raise DataError("data.name=imagenet32 needs data.path: a folder of train_data_batch_*.npz and val_data.npz")
    root = resolve(cfg.path)
    if not root.is_dir():
        train = read_npz_images(root, cfg.shape)
        if not cfg.test_path:
            return split_by_fraction(train, cfg, str(root))
        test_path = _test_file(cfg.test_path)
        return RawSplits(train, read_npz_images(test_path, cfg.shape), str(root), str(test_path))
    with reading(root, "ImageNet folder"):
        train_paths = sorted(root.glob(TRAIN_GLOB), key=_batch_number)
    if not train_paths:
        raise DataError(f"ImageNet folder {root} has no {TRAIN_GLOB} files")
    test_path = _test_file(cfg.test_path) if cfg.test_path else root / TEST_FILE
    train = read_npz_batches(train_paths, cfg.shape, cfg.limit)
    return RawSplits(train, read_npz_images(test_path, cfg.shape), str(root), str(test_path))
