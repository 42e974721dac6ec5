"""The dataset type, the fixed train/test split and the checks every loaded split passes.

Images are uint8 tensors (N, C, H, W) whose pixels take V = ``num_values`` values 0..V-1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.errors import DataError


@dataclass(eq=False)
class ImageDataset:
    """One split of a dataset: images (N, C, H, W) uint8, C-contiguous, on the CPU.

    The images are not copied; do not modify them after calling :meth:`fingerprint`, which is cached.
    """

    images: Tensor
    num_values: int  # V: pixel values are 0..V-1
    name: str  # DataConfig.name, e.g. "digits"
    split: str  # "train" or "test"
    source: str  # where the images came from: a path, or "sklearn digits" / "synthetic"
    _fingerprint: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        self.images = self.images.detach().cpu().contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies exactly these images: sha256 of their raw C-contiguous uint8 bytes, plus metadata."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.images.numpy().data).hexdigest()
            self._fingerprint = {
                "name": self.name,
                "split": self.split,
                "source": self.source,
                "count": len(self),
                "shape": list(self.images.shape[1:]),
                "num_values": self.num_values,
                "sha256": digest,
            }
        return {**self._fingerprint, "shape": list(self._fingerprint["shape"])}


@dataclass
class RawSplits:
    """What a format reader returns: unvalidated train and test images and where each came from."""

    train: Tensor
    test: Tensor
    train_source: str
    test_source: str


def split_by_fraction(images: Tensor, cfg: DataConfig, source: str) -> RawSplits:
    """The fixed split: a permutation seeded by ``cfg.split_seed``; its first round(f N) indices are the test set."""
    n = images.shape[0]
    n_test = round(cfg.test_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    return RawSplits(images[perm[n_test:]], images[perm[:n_test]], source, source)


def carve_validation(images: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val): ``size`` images chosen by a permutation seeded by ``seed`` form ``val``, the rest ``train``;
    both keep the images' order. The permutation is drawn over the whole training split with its own stream
    (``seed`` + 1), so it is independent of the train/test split of sources without one."""
    n = images.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[perm[:size]] = True
    return images[~chosen], images[chosen]


def check_split(images: Tensor, cfg: DataConfig, split: str, source: str) -> None:
    """DataError unless the split is non-empty, every image has ``cfg.shape`` and every value is < V."""
    what = f"{cfg.name} {split} images from {source}"
    if images.shape[0] == 0:
        raise DataError(f"{what}: the split is empty")
    found = tuple(images.shape[1:])
    if found != tuple(cfg.shape):
        raise DataError(f"{what} have shape {found}, expected data.shape={tuple(cfg.shape)}")
    top = int(images.max())
    if top >= cfg.num_values:
        raise DataError(
            f"{what} hold the value {top}, but data.num_values={cfg.num_values} allows only 0..{cfg.num_values - 1}"
        )
