"""Decoders from the auxiliary latent z to per-pixel coefficient maps of a multivariate schedule.

Every decoder maps (B, in_dim) -> (B, n_maps, C, H, W) and starts at exactly 0 for every input (its
output layer is zero-initialised), so each schedule decides what "0" means and makes it the linear gamma
(SPEC "The noise schedule": head a zero-initialised; the reference zero-initialises only head a, so its
polynomial starts curved and z-dependent, ours starts exactly linear). Three sizes:

- ``dense``: the reference network, z -> Dense(n) -> swish -> Dense(n) -> swish -> n_maps Dense(n) heads,
  n = C*H*W (about 38M parameters at 3x32x32 with three maps: more than the denoiser).
- ``lowrank``: an MLP of width ``cfg.hidden``, then per map coefficients on a learned rank-``cfg.hidden``
  basis of per-pixel patterns, plus a per-pixel bias.
- ``conv``: a ``cfg.hidden``-channel feature map at about a quarter of the resolution, upsampled twice with
  3x3 convolutions, plus a per-pixel bias per map (so a constant input can still express any pattern).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.config import ScheduleConfig


class DenseDecoder(nn.Module):
    """The reference decoder: two Dense(n) layers with swish, then one Dense(n) head per map."""

    def __init__(self, shape: tuple[int, int, int], in_dim: int, n_maps: int):
        super().__init__()
        self.shape, self.n_maps = tuple(shape), n_maps
        n = math.prod(shape)
        self.l1 = nn.Linear(in_dim, n)
        self.l2 = nn.Linear(n, n)
        self.heads = nn.Linear(n, n_maps * n)  # the n_maps heads, stacked
        with torch.no_grad():
            self.heads.weight.zero_()
            self.heads.bias.zero_()

    def forward(self, z: Tensor) -> Tensor:
        h = F.silu(self.l2(F.silu(self.l1(z))))
        return self.heads(h).reshape(z.shape[0], self.n_maps, *self.shape)


class LowRankDecoder(nn.Module):
    """z -> MLP(width r) -> per map r coefficients on a learned (r, n) basis, plus a per-pixel bias.

    The rank r equals ``cfg.hidden``. The coefficient layer starts at zero (so the output starts at the
    bias, 0); the basis starts random, so gradients reach the coefficients from the first step.
    """

    def __init__(self, shape: tuple[int, int, int], in_dim: int, n_maps: int, hidden: int):
        super().__init__()
        self.shape, self.n_maps = tuple(shape), n_maps
        n = math.prod(shape)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.coef = nn.Linear(hidden, n_maps * hidden)
        self.basis = nn.Parameter(torch.randn(n_maps, hidden, n) / math.sqrt(hidden))
        self.bias = nn.Parameter(torch.zeros(n_maps, n))
        with torch.no_grad():
            self.coef.weight.zero_()
            self.coef.bias.zero_()

    def forward(self, z: Tensor) -> Tensor:
        coef = self.coef(self.mlp(z)).reshape(z.shape[0], self.n_maps, 1, -1)  # (B, maps, 1, r)
        maps = (coef @ self.basis).squeeze(2) + self.bias  # (B, maps, n)
        return maps.reshape(z.shape[0], self.n_maps, *self.shape)


class ConvDecoder(nn.Module):
    """z -> Linear -> (hidden, ~H/4, ~W/4) -> [upsample, 3x3 conv, swish] x 2 -> 3x3 conv -> maps + bias.

    Intermediate sizes are ceil(H/4) and ceil(H/2) (at least 1), nearest-neighbour upsampling, so any image
    size works. The last convolution is zero-initialised; the learned per-pixel bias (n_maps, C, H, W),
    also 0 at first, lets even a constant input (the non-adaptive ablation) express any per-pixel pattern.
    """

    def __init__(self, shape: tuple[int, int, int], in_dim: int, n_maps: int, hidden: int):
        super().__init__()
        self.shape, self.n_maps, self.hidden = tuple(shape), n_maps, hidden
        c, h, w = shape
        self.sizes = [(-(-h // 4), -(-w // 4)), (-(-h // 2), -(-w // 2)), (h, w)]
        h0, w0 = self.sizes[0]
        self.inp = nn.Linear(in_dim, hidden * h0 * w0)
        self.up1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.up2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, n_maps * c, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(n_maps, c, h, w))
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, z: Tensor) -> Tensor:
        h = F.silu(self.inp(z)).reshape(z.shape[0], self.hidden, *self.sizes[0])
        h = F.silu(self.up1(F.interpolate(h, size=self.sizes[1], mode="nearest")))
        h = F.silu(self.up2(F.interpolate(h, size=self.sizes[2], mode="nearest")))
        return self.out(h).reshape(z.shape[0], self.n_maps, *self.shape) + self.bias


def build_decoder(cfg: ScheduleConfig, shape: tuple[int, ...], in_dim: int, n_maps: int) -> nn.Module:
    """The decoder named by ``cfg.decoder``: (B, in_dim) -> (B, n_maps, C, H, W), 0 at initialisation."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"expected an image shape (C, H, W), got {shape}")
    if cfg.decoder == "dense":
        return DenseDecoder(shape, in_dim, n_maps)
    if cfg.decoder == "lowrank":
        return LowRankDecoder(shape, in_dim, n_maps, cfg.hidden)
    if cfg.decoder == "conv":
        return ConvDecoder(shape, in_dim, n_maps, cfg.hidden)
    raise ValueError(f"unknown schedule decoder {cfg.decoder!r}")
