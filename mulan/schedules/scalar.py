"""Scalar schedules of the VDM family: one gamma for every pixel, independent of z.

VDM (Kingma et al. 2021) shows the continuous-time diffusion loss depends on a scalar schedule only through
its end points gamma(0), gamma(1); these schedules are the baselines MuLAN is measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.config import ScheduleConfig
from mulan.schedules.base import BoundSchedule, GammaOut, Schedule, as_col


class FixedLinear(Schedule):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t, nothing learned."""

    def __init__(self, cfg: ScheduleConfig):
        super().__init__()
        self.gamma_min, self.gamma_max = cfg.gamma_min, cfg.gamma_max

    def bind(self, z: Tensor | None, batch: int) -> BoundSchedule:
        def at(t: Tensor) -> GammaOut:
            t = as_col(t)
            slope = torch.full_like(t, self.gamma_max - self.gamma_min)
            return GammaOut(gamma=self.gamma_min + slope * t, dgamma_dt=slope)

        return at


class LearnedLinear(Schedule):
    """gamma(t) = b + |w| t with learned end points gamma(0) = b, gamma(1) = b + |w| (VDM)."""

    def __init__(self, cfg: ScheduleConfig):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(float(cfg.gamma_min)))
        self.w = nn.Parameter(torch.tensor(float(cfg.gamma_max - cfg.gamma_min)))

    def bind(self, z: Tensor | None, batch: int) -> BoundSchedule:
        def at(t: Tensor) -> GammaOut:
            t = as_col(t)
            slope = self.w.abs().expand_as(t)
            return GammaOut(gamma=self.b + slope * t, dgamma_dt=slope)

        return at


class PositiveLinear(nn.Linear):
    """A linear layer with weights |W| (monotone non-decreasing in every input)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.abs(), self.bias)


class MonotoneNet(Schedule):
    """VDM's learned monotone network: gamma(t) = l1(t) + l3(phi(l2(l1(t)))) with |W| weights.

    Non-decreasing in t because every weight is non-negative and phi = 2 (sigmoid - 1/2) is increasing. The end
    points are learned; they start at (gamma_min, gamma_max). d gamma / dt is taken by forward-mode autodiff,
    which stays differentiable with respect to the parameters.
    """

    def __init__(self, cfg: ScheduleConfig):
        super().__init__()
        self.l1 = PositiveLinear(1, 1)
        self.l2 = PositiveLinear(1, cfg.monotone_features)
        self.l3 = PositiveLinear(cfg.monotone_features, 1, bias=False)
        with torch.no_grad():
            # Start as the linear schedule: the non-linear branch is zero, l1(t) = gamma_min + (range) t.
            self.l1.weight.fill_(cfg.gamma_max - cfg.gamma_min)
            self.l1.bias.fill_(cfg.gamma_min)
            self.l3.weight.zero_()

    def _gamma(self, t: Tensor) -> Tensor:
        h = self.l1(t)
        g = 2.0 * (torch.sigmoid(self.l2(h)) - 0.5)
        return h + self.l3(g) / self.l2.out_features

    def bind(self, z: Tensor | None, batch: int) -> BoundSchedule:
        def at(t: Tensor) -> GammaOut:
            t1 = t.reshape(-1, 1).to(self.l1.weight.dtype)
            gamma, dgamma = torch.func.jvp(self._gamma, (t1,), (torch.ones_like(t1),))
            return GammaOut(gamma=as_col(gamma), dgamma_dt=as_col(dgamma))

        return at
