"""CIFAR-10, python version (pickled batches) or binary version (fixed-size records).

Python batches are pickles written by Python 2: dicts with b'data' (N, 3072) uint8 in CHW order and
b'labels'. They are read with a restricted unpickler (:mod:`mulan.data.safe_pickle`) that can rebuild
uint8 arrays and nothing else, so a tampered batch cannot run code. Binary batches are records of
1 label byte + 3072 CHW image bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.dataset import RawSplits
from mulan.data.files import one_line, reading, require_dir, require_file, resolve
from mulan.data.safe_pickle import safe_load, to_uint8_array
from mulan.errors import DataError

CIFAR_SHAPE = (3, 32, 32)  # the format's definition: every CIFAR-10 image is 3x32x32
ROW_BYTES = math.prod(CIFAR_SHAPE)
RECORD_BYTES = 1 + ROW_BYTES  # binary version: label byte, then the image
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
SUBFOLDERS = {"py": "cifar-10-batches-py", "bin": "cifar-10-batches-bin"}


def read_cifar_pickle(path: Path) -> Tensor:
    """The images of one python-version batch as uint8 (N, 3, 32, 32)."""
    what = "CIFAR-10 batch"
    require_file(path, what)
    with reading(path, what):
        batch = safe_load(path.read_bytes(), path)
        if not isinstance(batch, dict):
            raise DataError(f"{what} {path} holds a {type(batch).__name__}, expected a dict with b'data'")
        key = next((k for k in (b"data", "data") if k in batch), None)
        if key is None:
            keys = one_line(", ".join(repr(k) for k in list(batch)[:8]), 120)
            raise DataError(f"{what} {path} has no b'data' entry (keys: {keys})")
        data = to_uint8_array(batch[key], path, "b'data'")
        if data.shape[1] != ROW_BYTES:
            raise DataError(f"{what} {path}: b'data' has rows of {data.shape[1]} bytes, expected (N, {ROW_BYTES})")
        if data.shape[0] == 0:
            raise DataError(f"{what} {path} holds no images")
    return torch.from_numpy(data.reshape(-1, *CIFAR_SHAPE))


def read_cifar_bin(path: Path) -> Tensor:
    """The images of one binary-version batch as uint8 (N, 3, 32, 32); labels are dropped."""
    what = "CIFAR-10 binary batch"
    require_file(path, what)
    with reading(path, what):
        raw = path.read_bytes()
    if len(raw) % RECORD_BYTES:
        raise DataError(
            f"{what} {path} is truncated or corrupt: {len(raw)} bytes is not a multiple of the "
            f"{RECORD_BYTES}-byte record (1 label + {ROW_BYTES} pixels)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    return torch.from_numpy(records[:, 1:].reshape(-1, *CIFAR_SHAPE).copy())


def find_cifar(root: Path) -> tuple[Path, Literal["py", "bin"]]:
    """The folder holding the batches (``root`` or one of its standard subfolders) and which version it is."""
    require_dir(root, "CIFAR-10 folder")
    for folder in (root, root / SUBFOLDERS["py"], root / SUBFOLDERS["bin"]):
        if (folder / TRAIN_BATCHES[0]).is_file():
            return folder, "py"
        if (folder / f"{TRAIN_BATCHES[0]}.bin").is_file():
            return folder, "bin"
    raise DataError(
        f"no CIFAR-10 batches in {root}: expected data_batch_1..5 and test_batch (python version) or "
        f"data_batch_1.bin..5.bin and test_batch.bin (binary version), there or in "
        f"{SUBFOLDERS['py']}/ or {SUBFOLDERS['bin']}/"
    )


def load_cifar10(cfg: DataConfig) -> RawSplits:
    """CIFAR-10's own split: the five training batches, and the test batch, from the folder ``data.path``."""
    if not cfg.path:
        raise DataError("data.name=cifar10 needs data.path: the folder holding cifar-10-batches-py or -bin")
    folder, version = find_cifar(resolve(cfg.path))
    suffix, read = ("", read_cifar_pickle) if version == "py" else (".bin", read_cifar_bin)
    train = torch.cat([read(folder / f"{name}{suffix}") for name in TRAIN_BATCHES])
    test = read(folder / f"{TEST_BATCH}{suffix}")
    return RawSplits(train, test, str(folder), str(folder / f"{TEST_BATCH}{suffix}"))
