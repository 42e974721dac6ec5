"""Noise schedules gamma(z, t): scalar (VDM family) and multivariate (MuLAN)."""

from __future__ import annotations

from mulan.config import SCALAR_KINDS, ScheduleConfig
from mulan.schedules.base import BoundSchedule, GammaOut, Schedule
from mulan.schedules.scalar import FixedLinear, LearnedLinear, MonotoneNet


def build_schedule(cfg: ScheduleConfig, shape: tuple[int, ...], latent_dim: int) -> Schedule:
    """The schedule named by ``cfg.kind`` for images of ``shape`` and a latent of ``latent_dim`` (0: none)."""
    if cfg.kind == "fixed_linear":
        return FixedLinear(cfg)
    if cfg.kind == "learned_linear":
        return LearnedLinear(cfg)
    if cfg.kind == "monotone_net":
        return MonotoneNet(cfg)
    from mulan.schedules import multivariate

    cls = {
        "polynomial": multivariate.PolynomialSchedule,
        "pixel_monotone_net": multivariate.PixelMonotoneSchedule,
        "pixel_sigmoid": multivariate.PixelSigmoidSchedule,
    }[cfg.kind]
    return cls(cfg, tuple(shape), latent_dim)


__all__ = ["BoundSchedule", "GammaOut", "Schedule", "build_schedule", "SCALAR_KINDS"]
