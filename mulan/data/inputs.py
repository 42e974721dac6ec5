"""Images a user hands to a command: a PNG folder, an IDX file or an .npz, or a split of the configured data.

An .npz holds either ``images`` (N, C, H, W) uint8, as mulan writes it (``mulan decompress``, ``mulan sample``),
or ImageNet's ``data`` rows (:func:`~mulan.data.imagenet.read_npz_images`). Every failure is a one-line
:class:`~mulan.errors.DataError` naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.dataset import check_split
from mulan.data.files import describe
from mulan.data.idx import read_idx_images
from mulan.data.imagenet import read_npz_images
from mulan.data.load import load_split
from mulan.data.png import read_png_folder
from mulan.errors import DataError


def read_image_file(path: Path, shape: tuple[int, ...]) -> Tensor:
    """Images (N, C, H, W) uint8 from a PNG folder, an .npz or an IDX file (C, H, W from ``shape`` where the
    format does not carry them); not yet checked against a config."""
    if path.is_dir():
        return read_png_folder(path, shape)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "images" in archive.files:
                    data = archive["images"]
                    if data.dtype != np.uint8 or data.ndim != 4:
                        raise DataError(f"npz file {path}: 'images' is a {data.dtype} array {data.shape}, "
                                        "expected uint8 (N, C, H, W)")
                    return torch.from_numpy(np.ascontiguousarray(data).copy())
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read npz file {path}: {describe(e)}") from None
        return read_npz_images(path, shape)
    return read_idx_images(path)


def read_input(cfg: DataConfig, source: str | Path | None, split: str = "test", limit: int = 0) -> Tensor:
    """Images (N, C, H, W) uint8: the ``split`` of the configured data when ``source`` is None, else the file or
    folder ``source``, checked against ``cfg`` (shape, values below V); the first ``limit`` (> 0) only."""
    if source is None:
        images = load_split(cfg, split).images
    else:
        path = Path(source).expanduser()
        images = read_image_file(path, tuple(cfg.shape))
        check_split(images, cfg, "input", str(path))
    return images[:limit] if limit > 0 else images
