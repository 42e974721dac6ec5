"""The schedule interface: gamma(z, t) and its time derivative, returned together.

gamma is the log noise-to-signal ratio, variance preserving: sigma_t^2 = sigmoid(gamma),
alpha_t^2 = sigmoid(-gamma) (SPEC "Notation"). A scalar schedule returns shapes (B, 1, 1, 1); a
multivariate one (B, C, H, W); both broadcast against images (B, C, H, W).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class GammaOut:
    """gamma(z, t) and d gamma / dt, each (B, 1, 1, 1) or (B, C, H, W)."""

    gamma: Tensor
    dgamma_dt: Tensor

    @property
    def alpha2(self) -> Tensor:
        """alpha_t^2 = sigmoid(-gamma)."""
        return torch.sigmoid(-self.gamma)

    @property
    def sigma2(self) -> Tensor:
        """sigma_t^2 = sigmoid(gamma)."""
        return torch.sigmoid(self.gamma)


BoundSchedule = Callable[[Tensor], GammaOut]
"""A schedule with z fixed: maps times t (B,) to :class:`GammaOut`."""


class Schedule(nn.Module, ABC):
    """Base class of all noise schedules.

    ``bind(z, batch)`` does the z-dependent work once (e.g. the network from z to per-pixel polynomial
    coefficients) and returns a function of t alone, so an ELBO that needs gamma at t, 0 and 1 pays for it
    once. ``forward(t, z)`` is ``bind(z, len(t))(t)``.
    """

    per_pixel: bool = False  # True when gamma differs between pixels

    @abstractmethod
    def bind(self, z: Tensor | None, batch: int) -> BoundSchedule:
        """Fix z (shape (B, m), or None) for a batch of size ``batch``."""

    def forward(self, t: Tensor, z: Tensor | None = None) -> GammaOut:
        return self.bind(z, t.shape[0])(t)


def as_col(t: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting against images."""
    return t.reshape(-1, 1, 1, 1)
