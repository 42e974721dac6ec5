"""``load_splits``: read the configured dataset, check it against the config, apply the limit."""

from __future__ import annotations

import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable

from mulan.config import DataConfig
from mulan.data.bundled import load_digits, load_synthetic
from mulan.data.cifar import load_cifar10
from mulan.data.dataset import ImageDataset, RawSplits, check_split
from mulan.data.files import describe
from mulan.data.idx import load_fashion_mnist, load_idx
from mulan.data.imagenet import load_imagenet32
from mulan.data.png import load_png
from mulan.errors import DataError

READERS: dict[str, Callable[[DataConfig], RawSplits]] = {
    "digits": load_digits,
    "idx": load_idx,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagenet32": load_imagenet32,
    "png": load_png,
    "synthetic": load_synthetic,
}

# Failures of reading untrusted files; the readers already wrap them, this is the last line of defence.
INPUT_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, MemoryError, struct.error, zlib.error,
                zipfile.BadZipFile, pickle.UnpicklingError)


def load_splits(cfg: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """The (train, test) splits of ``cfg.name``, each checked and cut to the first ``cfg.limit`` images.

    Every image must have shape ``cfg.shape`` and values below ``cfg.num_values``, and neither split may
    be empty. Raises :class:`~mulan.errors.DataError` (one line, naming the file) for any bad input.
    """
    read = READERS.get(cfg.name)
    if read is None:
        raise DataError(f"unknown dataset data.name={cfg.name!r}; choose one of {', '.join(READERS)}")
    try:
        raw = read(cfg)
    except INPUT_ERRORS as exc:
        where = cfg.path or "its default location"
        raise DataError(f"cannot read {cfg.name} data from {where}: {describe(exc)}") from exc
    splits = []
    for split, images, source in (("train", raw.train, raw.train_source), ("test", raw.test, raw.test_source)):
        check_split(images, cfg, split, source)
        if cfg.limit > 0:
            images = images[: cfg.limit]
        splits.append(ImageDataset(images.contiguous(), cfg.num_values, cfg.name, split, source))
    return splits[0], splits[1]
