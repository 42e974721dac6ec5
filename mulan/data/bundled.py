"""Datasets that need no files: scikit-learn's digits (the default) and deterministic synthetic images."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.dataset import RawSplits, split_by_fraction
from mulan.errors import DataError

DIGITS_SOURCE = "sklearn digits"
SYNTHETIC_SOURCE = "synthetic"
SYNTHETIC_TRAIN = 512  # images in the synthetic training split
SYNTHETIC_TEST = 128  # images in the synthetic test split
SYNTHETIC_BLOBS = 4  # Gaussian bumps per image, on top of a linear gradient


def load_digits(cfg: DataConfig) -> RawSplits:
    """scikit-learn's 1797 8x8 digits (values 0..16, so V=17), split by ``data.test_fraction``."""
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: only this dataset needs it

    x, _ = sklearn_digits(return_X_y=True)
    side = math.isqrt(x.shape[1])
    images = torch.from_numpy(x).round().to(torch.uint8).reshape(-1, 1, side, side)
    return split_by_fraction(images, cfg, DIGITS_SOURCE)


def synthetic_images(n: int, shape: tuple[int, ...], num_values: int, generator: torch.Generator) -> Tensor:
    """``n`` smooth images of ``shape`` (C, H, W) with values 0..V-1: a gradient plus Gaussian blobs.

    Colours are mostly shared across channels (correlated, like natural images); float64 keeps the
    quantisation the same across machines.
    """
    c, h, w = shape
    dtype = torch.float64
    ys = torch.linspace(0, 1, h, dtype=dtype).view(1, h, 1)
    xs = torch.linspace(0, 1, w, dtype=dtype).view(1, 1, w)
    slope = torch.randn(n, c, 2, generator=generator, dtype=dtype)
    field = slope[..., 0, None, None] * (ys - 0.5) + slope[..., 1, None, None] * (xs - 0.5)
    for _ in range(SYNTHETIC_BLOBS):
        centre = torch.rand(n, 2, 1, 1, generator=generator, dtype=dtype)
        width = 0.08 + 0.25 * torch.rand(n, 1, 1, generator=generator, dtype=dtype)
        shared = torch.randn(n, 1, generator=generator, dtype=dtype)
        colour = 2.0 * shared + 0.5 * torch.randn(n, c, generator=generator, dtype=dtype)
        dist2 = (ys - centre[:, 0]) ** 2 + (xs - centre[:, 1]) ** 2  # (n, H, W)
        field = field + colour[:, :, None, None] * torch.exp(-dist2 / (2 * width**2))[:, None]
    u = torch.sigmoid(field)  # (0, 1)
    return (u * num_values).floor().clamp(max=num_values - 1).to(torch.uint8)


def load_synthetic(cfg: DataConfig) -> RawSplits:
    """512 training and 128 test images of ``data.shape`` and ``data.num_values``, seeded by ``data.split_seed``."""
    if cfg.num_values > 256:
        raise DataError(f"data.name=synthetic makes uint8 images: data.num_values must be <= 256, not {cfg.num_values}")
    generator = torch.Generator().manual_seed(cfg.split_seed)
    images = synthetic_images(SYNTHETIC_TRAIN + SYNTHETIC_TEST, cfg.shape, cfg.num_values, generator)
    return RawSplits(images[:SYNTHETIC_TRAIN], images[SYNTHETIC_TRAIN:], SYNTHETIC_SOURCE, SYNTHETIC_SOURCE)
