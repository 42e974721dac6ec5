"""MNIST-format IDX image files (plain or gzipped), and Fashion-MNIST as Debian installs it.

An IDX image file is a 4-byte magic 0x00000803 (uint8, 3 dimensions), three big-endian uint32 sizes
N, H, W, then N*H*W pixel bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.dataset import RawSplits, split_by_fraction
from mulan.data.files import open_maybe_gzip, read_at_most, reading, require_dir, require_file, resolve
from mulan.errors import DataError

IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions
LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension: a label file given by mistake
HEADER_BYTES = 16
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def read_idx_images(path: Path) -> Tensor:
    """The images of an IDX file (optionally gzipped) as uint8 (N, 1, H, W)."""
    what = "IDX file"
    require_file(path, what)
    with reading(path, what), open_maybe_gzip(path) as stream:
        header = read_at_most(stream, HEADER_BYTES)
        if len(header) < 4:
            raise DataError(f"{what} {path} is truncated: {len(header)} bytes, too short for the magic number")
        magic = int.from_bytes(header[:4], "big")
        if magic != IMAGES_MAGIC:
            hint = " (a label file, not images)" if magic == LABELS_MAGIC else ""
            raise DataError(
                f"{what} {path} has magic 0x{magic:08x}{hint}, "
                f"expected 0x{IMAGES_MAGIC:08x} (uint8 images, 3 dimensions)"
            )
        if len(header) < HEADER_BYTES:
            raise DataError(f"{what} {path} is truncated inside its {HEADER_BYTES}-byte header")
        n, h, w = struct.unpack(">III", bytes(header[4:HEADER_BYTES]))
        count = n * h * w
        body = read_at_most(stream, count + 1)
    if len(body) < count:
        raise DataError(
            f"{what} {path} is truncated: its header announces {n} images of {h}x{w} ({count} bytes) "
            f"but only {len(body)} bytes follow"
        )
    if len(body) > count:
        raise DataError(f"{what} {path} is corrupt: bytes follow the {n} images of {h}x{w} its header announces")
    if count == 0:
        raise DataError(f"{what} {path} holds no images (its header says {n} images of {h}x{w})")
    return torch.frombuffer(body, dtype=torch.uint8).reshape(n, 1, h, w)


def load_idx(cfg: DataConfig) -> RawSplits:
    """``data.path``: training IDX images; ``data.test_path``: test images, or empty to split by fraction."""
    if not cfg.path:
        raise DataError("data.name=idx needs data.path: an IDX images file such as train-images-idx3-ubyte.gz")
    train_path = resolve(cfg.path)
    train = read_idx_images(train_path)
    if not cfg.test_path:
        return split_by_fraction(train, cfg, str(train_path))
    test_path = resolve(cfg.test_path)
    return RawSplits(train, read_idx_images(test_path), str(train_path), str(test_path))


def find_fashion_mnist(folder: Path, split: str) -> Path:
    """The Fashion-MNIST images file of ``split`` in ``folder`` (gzipped or not); DataError listing what was tried."""
    stem = FASHION_MNIST_STEMS[split]
    tried = [folder / f"{stem}.gz", folder / stem]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST {split} images not found; tried {', '.join(map(str, tried))}; "
        "install them with `apt-get install dataset-fashion-mnist` or set data.path to a folder holding them"
    )


def load_fashion_mnist(cfg: DataConfig) -> RawSplits:
    """Fashion-MNIST from ``data.path`` (a folder), or from Debian's package folder when it is empty."""
    folder = resolve(cfg.path) if cfg.path else FASHION_MNIST_DIR
    if cfg.path:
        require_dir(folder, "Fashion-MNIST folder")
    train_path, test_path = find_fashion_mnist(folder, "train"), find_fashion_mnist(folder, "test")
    return RawSplits(read_idx_images(train_path), read_idx_images(test_path), str(train_path), str(test_path))


FASHION_MNIST_LABEL_STEMS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
LABELS_HEADER_BYTES = 8


def read_idx_labels(path: Path) -> Tensor:
    """The labels of an IDX label file (optionally gzipped): magic 0x00000801, a big-endian uint32 N, N bytes."""
    what = "IDX label file"
    require_file(path, what)
    with reading(path, what), open_maybe_gzip(path) as stream:
        header = read_at_most(stream, LABELS_HEADER_BYTES)
        if len(header) < LABELS_HEADER_BYTES or int.from_bytes(header[:4], "big") != LABELS_MAGIC:
            raise DataError(f"{what} {path} does not start with the label magic 0x{LABELS_MAGIC:08x} and a count")
        (n,) = struct.unpack(">I", bytes(header[4:]))
        body = read_at_most(stream, n + 1)
    if len(body) != n:
        raise DataError(f"{what} {path} announces {n} labels but holds {len(body)} bytes")
    return torch.frombuffer(body, dtype=torch.uint8).long()


def fashion_mnist_labels(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train, test) labels of Fashion-MNIST from the folder :func:`load_fashion_mnist` reads."""
    folder = resolve(cfg.path) if cfg.path else FASHION_MNIST_DIR
    found = []
    for split, stem in FASHION_MNIST_LABEL_STEMS.items():
        tried = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            raise DataError(f"Fashion-MNIST {split} labels not found; tried {', '.join(map(str, tried))}")
        found.append(read_idx_labels(path))
    return found[0], found[1]
