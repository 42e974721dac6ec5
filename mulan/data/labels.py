"""Class labels of the labelled datasets (digits, Fashion-MNIST), split exactly as their images are.

``load_labelled(cfg)`` returns each split's images (as :func:`mulan.data.load_all_splits` gives them) with their
labels: the labels go through the same train/test permutation (digits), validation carving and limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.dataset import ImageDataset, carve_validation, split_by_fraction
from mulan.data.idx import fashion_mnist_labels
from mulan.data.load import load_all_splits
from mulan.errors import DataError

LABELLED = {"digits": 10, "fashion-mnist": 10}  # dataset -> number of classes
CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"],
}


@dataclass
class Labelled:
    """One split's images and their labels (N,) int64 in 0..classes-1."""

    images: ImageDataset
    labels: Tensor


def _raw_labels(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        _, y = load_digits(return_X_y=True)
        raw = split_by_fraction(torch.from_numpy(y).long(), cfg, "sklearn digits")
        return raw.train, raw.test
    return fashion_mnist_labels(cfg)


def load_labelled(cfg: DataConfig) -> dict[str, Labelled]:
    """Every split of ``cfg`` ('train', 'val' when carved, 'test') with its labels; DataError if unlabelled."""
    if cfg.name not in LABELLED:
        raise DataError(f"data {cfg.name!r} has no labels; labelled datasets: {', '.join(LABELLED)}")
    splits = load_all_splits(cfg)
    train, test = _raw_labels(cfg)
    labels = {"train": train, "test": test}
    if cfg.val_size > 0:
        labels["train"], labels["val"] = carve_validation(train, cfg.val_size, cfg.split_seed)
    out = {}
    for split, data in splits.items():
        y = labels[split][: cfg.limit] if cfg.limit > 0 else labels[split]
        if y.shape[0] != len(data):
            raise DataError(f"{cfg.name} {split}: {len(data)} images but {y.shape[0]} labels")
        out[split] = Labelled(data, y)
    return out
