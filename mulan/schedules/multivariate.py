"""Multivariate, learned, input-adaptive schedules gamma(z, t) (MuLAN; SPEC "The noise schedule").

A decoder (``decoders.py``) maps z to per-pixel coefficient maps once per batch (``bind``); each schedule is
then a per-pixel monotone function f(t) of those coefficients, normalised to fixed end points:

    r(t) = (f(t) - f(0)) / (f(1) - f(0)) in [0, 1],   gamma = gamma_min + (gamma_max - gamma_min) r(t),
    dgamma/dt = (gamma_max - gamma_min) f'(t) / (f(1) - f(0))   (closed form, no autodiff).

f(0) and f(1) are computed by the same code as f(t), so t = 0 and t = 1 give r = 0 and r = 1 exactly, and
:func:`_span` maps those to exactly gamma_min and gamma_max (also in float32).

Learned end points (``cfg.learn_ends``, an addition to the paper, whose ends are fixed): gamma_min = b and
gamma_max = b + |w| become parameters, as in learned VDM, either two scalars or one pair per pixel. r(t) is
unchanged, so gamma(0) = b and gamma(1) = b + |w| hold exactly and the bound stays valid for any values.

Ablations (SPEC "Ablations"): ``cfg.adaptive = False`` or ``latent_dim = 0`` feed the decoder a constant (zeros;
its biases make that a learned constant) instead of z, computed once and broadcast over the batch;
``cfg.pixel_mean = True`` averages r and dr/dt over pixels, giving a scalar but still z-conditioned schedule.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.config import ScheduleConfig
from mulan.schedules.base import BoundSchedule, GammaOut, Schedule, as_col
from mulan.schedules.decoders import build_decoder



class PixelSchedule(Schedule):
    """Shared machinery of the per-pixel schedules: decoder input, normalisation, pixel mean.

    Subclasses set ``n_maps`` and define ``_coefficients`` (decoder maps -> a tuple of tensors), ``_f`` (the
    unnormalised monotone function) and ``_df`` (its time derivative), both per pixel, for t of shape
    (T, 1, 1, 1).
    """

    n_maps: int

    def __init__(self, cfg: ScheduleConfig, shape: tuple[int, int, int], latent_dim: int):
        super().__init__()
        self.gamma_min, self.gamma_max = float(cfg.gamma_min), float(cfg.gamma_max)
        self.shape = tuple(int(s) for s in shape)
        self.latent_dim = int(latent_dim)
        self.adaptive = bool(cfg.adaptive) and self.latent_dim > 0
        self.pixel_mean = bool(cfg.pixel_mean)
        self.learn_ends = cfg.learn_ends
        self.per_pixel = not self.pixel_mean or self.learn_ends == "pixel"
        self.in_dim = max(self.latent_dim, 1)
        self.decoder = build_decoder(cfg, self.shape, self.in_dim, self.n_maps)
        if self.learn_ends != "none":
            ends_shape = self.shape if self.learn_ends == "pixel" else ()
            self.b = nn.Parameter(torch.full(ends_shape, self.gamma_min))  # gamma(0)
            self.w = nn.Parameter(torch.full(ends_shape, self.gamma_max - self.gamma_min))  # gamma(1) - gamma(0) = |w|

    def ends(self) -> tuple[float | Tensor, float | Tensor]:
        """(gamma(0), gamma(1)): the fixed ends as floats, or the learned ones (0-d or (C, H, W) tensors)."""
        if self.learn_ends == "none":
            return self.gamma_min, self.gamma_max
        return self.b, self.b + self.w.abs()

    @abstractmethod
    def _coefficients(self, maps: Tensor) -> tuple[Tensor, ...]:
        """Decoder output (B, n_maps, C, H, W) -> the coefficients ``_f`` and ``_df`` use."""

    @abstractmethod
    def _f(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        """Unnormalised per-pixel f(t), non-decreasing in t; t is (T, 1, 1, 1)."""

    @abstractmethod
    def _df(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        """df/dt at t, >= 0 and > 0 on average over [0, 1]."""

    def _decoder_input(self, z: Tensor | None, batch: int) -> Tensor:
        ref = next(self.decoder.parameters())
        if not self.adaptive:
            return ref.new_zeros(1, self.in_dim)  # a constant, shared by the batch
        if z is None:
            raise ValueError("this schedule is adaptive: bind() needs the latent z, got None")
        z = z.reshape(z.shape[0], -1).to(ref.dtype)
        if z.shape != (batch, self.latent_dim):
            raise ValueError(f"expected z of shape ({batch}, {self.latent_dim}), got {tuple(z.shape)}")
        return z

    @staticmethod
    def _span(r: Tensor, g0: float | Tensor, g1: float | Tensor) -> Tensor:
        """g0 + (g1 - g0) r, evaluated so that r = 0 and r = 1 give exactly g0 and g1 (like lerp)."""
        d = g1 - g0
        return torch.where(r < 0.5, g0 + d * r, g1 - d * (1.0 - r))

    def bind(self, z: Tensor | None, batch: int) -> BoundSchedule:
        coef = self._coefficients(self.decoder(self._decoder_input(z, batch)))
        dtype = coef[0].dtype
        one = torch.ones(1, 1, 1, 1, dtype=dtype, device=coef[0].device)
        f0 = self._f(coef, torch.zeros_like(one))
        scale = self._f(coef, one) - f0  # f(1) - f(0) > 0
        g0, g1 = (e.to(dtype) if isinstance(e, Tensor) else e for e in self.ends())
        d = g1 - g0

        def at(t: Tensor) -> GammaOut:
            t = as_col(t).to(dtype)
            if t.shape[0] == 1 and batch > 1:
                t = t.expand(batch, 1, 1, 1)
            out_shape = (t.shape[0], *self.shape)
            r = ((self._f(coef, t) - f0) / scale).clamp(0.0, 1.0).expand(out_shape)
            dr_dt = (self._df(coef, t) / scale).expand(out_shape)
            if self.pixel_mean:
                r, dr_dt = r.mean(dim=(1, 2, 3), keepdim=True), dr_dt.mean(dim=(1, 2, 3), keepdim=True)
            return GammaOut(gamma=self._span(r, g0, g1), dgamma_dt=d * dr_dt)

        return at


class PolynomialSchedule(PixelSchedule):
    """MuLAN's default: gamma' proportional to (a t^2 + b t + c)^2 per pixel, fixed end points.

    f(t) = P(t) = a^2 t^5/5 + ab t^4/2 + (b^2 + 2ac) t^3/3 + bc t^2 + c^2 t (Horner form), P' = (at^2+bt+c)^2,
    with c = 1e-3 + softplus(.) > 0 so P(1) > 0. All maps start at 0 (a = b = 0): gamma starts linear.
    """

    n_maps = 3

    def _coefficients(self, maps: Tensor) -> tuple[Tensor, ...]:
        a, b = maps[:, 0], maps[:, 1]
        c = 1e-3 + F.softplus(maps[:, 2])
        # coefficients of t^1 .. t^5 in P
        k = (c * c, b * c, (b * b + 2.0 * a * c) / 3.0, a * b / 2.0, a * a / 5.0)
        return (a, b, c) + k

    def _f(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        k1, k2, k3, k4, k5 = coef[3:]
        return t * (k1 + t * (k2 + t * (k3 + t * (k4 + t * k5))))

    def _df(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        a, b, c = coef[:3]
        return ((a * t + b) * t + c).square()


class PixelMonotoneSchedule(PixelSchedule):
    """A per-pixel monotone network: f(t) = l t + sum_j w_j sigmoid(s_j (t - mu_j)), j = 1..K.

    A one-hidden-layer monotone net in t per pixel, VDM-style: positive output weights and positive input
    slopes (softplus rather than |W|, so gradients are never 0 at 0). z modulates the K + 1 non-negative
    mixing weights (l = 1e-3 + softplus, w_j = softplus of decoder maps), so the decoder emits K + 1 maps
    rather than 3K + 1; the K slopes s_j > 0 and centres mu_j are learned per pixel and shared across z
    (2 K n parameters). At initialisation the centres tile [0, 1] at j/(K-1) with slopes 3K and all
    weights equal, so the sum of sigmoids is a near-linear ramp: gamma starts within 0.5% of the range
    of the linear schedule. f'(t) is closed form.
    """

    def __init__(self, cfg: ScheduleConfig, shape: tuple[int, int, int], latent_dim: int):
        self.features = cfg.pixel_features  # K sigmoid features per pixel
        self.n_maps = cfg.pixel_features + 1  # l and w_1..w_K
        super().__init__(cfg, shape, latent_dim)
        K = self.features
        centres = torch.arange(K, dtype=torch.float32) / max(K - 1, 1)
        slope = torch.tensor(3.0 * K)
        self.mu = nn.Parameter(centres.reshape(K, 1, 1, 1).repeat(1, *self.shape))
        self.raw_slope = nn.Parameter(torch.log(torch.expm1(slope)).expand(K, *self.shape).clone())

    def _coefficients(self, maps: Tensor) -> tuple[Tensor, ...]:
        l = 1e-3 + F.softplus(maps[:, 0])  # (B, C, H, W)
        w = F.softplus(maps[:, 1:])  # (B, K, C, H, W)
        s = F.softplus(self.raw_slope).to(maps.dtype)  # (K, C, H, W)
        return l, w, s, self.mu.to(maps.dtype)

    def _f(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        l, w, s, mu = coef
        u = torch.sigmoid(s * (t.unsqueeze(1) - mu))  # (T, K, C, H, W)
        return l * t + (w * u).sum(dim=1)

    def _df(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        l, w, s, mu = coef
        u = torch.sigmoid(s * (t.unsqueeze(1) - mu))
        return l + (w * s * u * (1.0 - u)).sum(dim=1)


class PixelSigmoidSchedule(PixelSchedule):
    """f(t) = sigmoid(s (t - mu)) per pixel, slope s = 1e-2 + softplus(.) > 0, centre mu = sigmoid(.) in (0, 1).

    Keeping the centre inside (0, 1) keeps f(1) - f(0) >= sigmoid(s/2) - 1/2 > 0 away from underflow. Maps
    start at 0: s ~ 0.70, mu = 1/2, where the sigmoid is nearly linear on [0, 1].
    """

    n_maps = 2

    def _coefficients(self, maps: Tensor) -> tuple[Tensor, ...]:
        return 1e-2 + F.softplus(maps[:, 0]), torch.sigmoid(maps[:, 1])

    def _f(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        s, mu = coef
        return torch.sigmoid(s * (t - mu))

    def _df(self, coef: tuple[Tensor, ...], t: Tensor) -> Tensor:
        s, mu = coef
        u = torch.sigmoid(s * (t - mu))
        return s * u * (1.0 - u)
