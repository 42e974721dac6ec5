"""``load_splits``: read the configured dataset, check it against the config, carve the validation split, apply
the limit."""

from __future__ import annotations

import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable

from mulan.config import DataConfig
from mulan.data.bundled import load_digits, load_synthetic
from mulan.data.cifar import load_cifar10
from mulan.data.dataset import ImageDataset, RawSplits, carve_validation, check_split
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


SPLITS = ("train", "val", "test")


def load_all_splits(cfg: DataConfig) -> dict[str, ImageDataset]:
    """The ``train``, ``val`` and ``test`` splits of ``cfg.name``, each checked and cut to the first ``cfg.limit``.

    ``val`` holds ``cfg.val_size`` training images chosen by a permutation seeded by ``cfg.split_seed`` (kept
    in their file order) and ``train`` the others: validation images are never trained on. Without a validation
    split (``val_size = 0``) ``val`` is absent. Every image must have shape ``cfg.shape`` and values below
    ``cfg.num_values``, and no split may be empty. Raises :class:`~mulan.errors.DataError` (one line, naming
    the file) for any bad input.
    """
    read = READERS.get(cfg.name)
    if read is None:
        raise DataError(f"unknown dataset data.name={cfg.name!r}; choose one of {', '.join(READERS)}")
    try:
        raw = read(cfg)
    except INPUT_ERRORS as exc:
        where = cfg.path or "its default location"
        raise DataError(f"cannot read {cfg.name} data from {where}: {describe(exc)}") from exc
    check_split(raw.train, cfg, "train", raw.train_source)
    check_split(raw.test, cfg, "test", raw.test_source)
    parts = {"train": (raw.train, raw.train_source), "test": (raw.test, raw.test_source)}
    if cfg.val_size > 0:
        if cfg.val_size >= raw.train.shape[0]:
            raise DataError(f"data.val_size={cfg.val_size} leaves no training images: {cfg.name} has "
                            f"{raw.train.shape[0]} in its training split")
        train, val = carve_validation(raw.train, cfg.val_size, cfg.split_seed)
        parts = {"train": (train, raw.train_source), "val": (val, raw.train_source), "test": parts["test"]}
    splits = {}
    for split, (images, source) in parts.items():
        if cfg.limit > 0:
            images = images[: cfg.limit]
        splits[split] = ImageDataset(images.contiguous(), cfg.num_values, cfg.name, split, source)
    return splits


def load_splits(cfg: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """The (train, test) splits of :func:`load_all_splits` (train without the validation images)."""
    splits = load_all_splits(cfg)
    return splits["train"], splits["test"]


def load_split(cfg: DataConfig, split: str) -> ImageDataset:
    """One split, ``train``, ``val`` or ``test``; asking for ``val`` without ``data.val_size`` is a one-line error."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    splits = load_all_splits(cfg)
    if split not in splits:
        raise DataError(f"there is no validation split: this model was configured with data.val_size=0 "
                        f"(its training used every training image)")
    return splits[split]
