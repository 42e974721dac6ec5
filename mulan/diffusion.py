"""The diffusion model and its negative ELBO (SPEC "Negative ELBO"), one class for VDM and MuLAN.

VDM is this model with no latent and a scalar schedule; MuLAN adds a latent z inferred from x and a
per-pixel schedule gamma(z, t). Every term is returned per example, in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan import rng
from mulan.config import Config, ModelConfig
from mulan.latent import LatentOut, build_latent
from mulan.nn.unet import UNet
from mulan.rng import Generator
from mulan.schedules import BoundSchedule, GammaOut, build_schedule

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t (B,C,H,W), t (B,)) -> eps_hat (B,C,H,W), with z fixed."""


@dataclass
class ELBOTerms:
    """Per-example terms of the negative ELBO, each (B,) in nats."""

    recon: Tensor  # -log p(x | x_0), discrete decoder
    prior: Tensor  # KL(q(x_1 | x, z) || N(0, I))
    diffusion: Tensor  # continuous- or discrete-time diffusion loss
    latent: Tensor  # KL(q(z | x) || p(z)) as charged (see latent_kl)
    latent_kl: str  # which latent KL was charged: 'none', 'surrogate', 'strict' or 'analytic'

    @property
    def total(self) -> Tensor:
        """Negative ELBO in nats, (B,)."""
        return self.recon + self.prior + self.diffusion + self.latent

    def as_dict(self) -> dict[str, Tensor]:
        return {"recon": self.recon, "prior": self.prior, "diffusion": self.diffusion, "latent": self.latent}


@dataclass
class Conditioned:
    """The model with z fixed for a batch: what samplers and likelihood estimators need."""

    z: Tensor | None  # (B, m) or None
    bound: BoundSchedule  # t (B,) -> GammaOut
    eps_fn: EpsFn  # (x_t, t) -> eps_hat
    latent: LatentOut  # z and its KL


def bits_per_dim(nats: Tensor | float, n: int) -> Tensor | float:
    """nats per example (a tensor or a number) -> bits per dimension: nats / (n ln 2), n the dimensions per example."""
    return nats / (n * math.log(2.0))


def encode(x: Tensor, num_values: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integers 0..V-1 -> x_tilde = 2 (x + 0.5) / V - 1 in (-1, 1) (SPEC notation)."""
    return 2.0 * (x.to(dtype) + 0.5) / num_values - 1.0


def antithetic_times(batch: int, *, generator: Generator = None, device=None) -> Tensor:
    """Low-discrepancy times t_i = (u + i/B) mod 1 with one uniform u (SPEC "Time sampling")."""
    return rng.antithetic_times(batch, generator, device=device)


class Diffusion(nn.Module):
    """Schedule, latent and denoiser; computes the negative ELBO per example.

    Args:
        cfg: the model configuration.
        shape: image shape (C, H, W).
        num_values: V, the number of values per pixel.
    """

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], num_values: int):
        super().__init__()
        self.cfg, self.shape, self.num_values = cfg, tuple(shape), num_values
        self.n = math.prod(self.shape)
        self.latent = build_latent(cfg.latent, self.shape)
        self.schedule = build_schedule(cfg.schedule, self.shape, self.latent.dim)
        self.denoiser = UNet(cfg.denoiser, self.shape, cond_dim=self.latent.dim)
        self.register_buffer("_probe", torch.zeros(()), persistent=False)  # follows .to(dtype/device)
        # Run-time settings of the denoiser call, not state (see set_runtime).
        self.amp_dtype: torch.dtype | None = None
        self.channels_last = False

    def set_runtime(self, *, amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> "Diffusion":
        """Autocast the denoiser (only) to ``amp_dtype`` while training, and/or run it channels-last.

        The schedule, the latent and every ELBO term stay in the model's dtype; the denoiser's output is cast
        back to it. Evaluation (``.eval()``) never autocasts, so likelihoods are computed in full precision.
        """
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        return self

    # --- encoding ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point type (float32 unless converted with ``.double()`` etc.)."""
        return self._probe.dtype

    @property
    def device(self) -> torch.device:
        return self._probe.device

    def encode(self, x: Tensor) -> Tensor:
        """Integers 0..V-1 -> x_tilde = 2 (x + 0.5) / V - 1 in (-1, 1)."""
        return encode(x, self.num_values, self.dtype)

    def _values(self, device) -> Tensor:
        """x_tilde(v) for every v in 0..V-1."""
        return self.encode(torch.arange(self.num_values, device=device))

    # --- the network ---------------------------------------------------------------------------------------
    def rescale_gamma(self, gamma: Tensor) -> Tensor:
        """gamma rescaled to [0, 1] by the configured ends (the initial ones, when the ends are learned)."""
        s = self.cfg.schedule
        return (gamma - s.gamma_min) / (s.gamma_max - s.gamma_min)

    def time_input(self, gamma: Tensor) -> Tensor:
        """The denoiser's time input: the pixel-mean of gamma, rescaled (:meth:`rescale_gamma`)."""
        return self.rescale_gamma(gamma.flatten(1).mean(1))

    def eps_hat(self, x_t: Tensor, g: GammaOut, z: Tensor | None) -> Tensor:
        """eps_hat(x_t, z, t); a v-prediction network's output is converted by eps = sigma x_t + alpha v.

        The network sees the pixel-mean of gamma and, with ``denoiser.gamma_input='map'``, the gamma map too."""
        time = self.time_input(g.gamma)
        extra = (self.rescale_gamma(g.gamma).expand_as(x_t),) if self.cfg.denoiser.gamma_input == "map" else ()
        net_in = x_t.contiguous(memory_format=torch.channels_last) if self.channels_last else x_t
        if self.amp_dtype is not None and self.training:
            with torch.autocast(x_t.device.type, dtype=self.amp_dtype):
                out = self.denoiser(net_in, time, z, *extra)
            out = out.to(x_t.dtype)
        else:
            out = self.denoiser(net_in, time, z, *extra)
        if self.cfg.prediction == "v":
            out = g.sigma2.sqrt() * x_t + g.alpha2.sqrt() * out
        return out

    def condition(self, x: Tensor | None = None, *, z: Tensor | None = None, batch: int | None = None,
                  strict: bool = True, generator: Generator = None) -> Conditioned:
        """Fix z: inferred from images ``x`` (uint8/long), given directly, or drawn from the prior."""
        if x is not None:
            lat = self.latent(self.encode(x), strict=strict, generator=generator)
            batch = x.shape[0]
        else:
            device = self.device
            if z is None:
                if batch is None:
                    raise ValueError("condition() needs images x, a latent z, or a batch size")
                z = self.latent.sample_prior(batch, generator=generator, device=device)
            batch = z.shape[0] if z is not None else batch
            lat = LatentOut(z=z, kl=torch.zeros(batch, device=device), kl_kind="none")
        bound = self.schedule.bind(lat.z, batch)

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.eps_hat(x_t, bound(t), lat.z)

        return Conditioned(z=lat.z, bound=bound, eps_fn=eps_fn, latent=lat)

    # --- the negative ELBO ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, **kwargs) -> ELBOTerms:
        """:meth:`elbo_terms` (``forward`` is what DistributedDataParallel calls)."""
        return self.elbo_terms(x, **kwargs)

    def elbo_terms(self, x: Tensor, *, t: Tensor | None = None, generator: Generator = None,
                   strict: bool | None = None) -> ELBOTerms:
        """Per-example negative ELBO terms in nats for images ``x`` (B, C, H, W), integers in 0..V-1.

        Args:
            t: diffusion times (B,) in [0, 1]; default antithetic (or i.i.d. when configured).
            generator: source of every random draw of this call (noise, times, latent perturbation); a
                :class:`~mulan.rng.ShardedGenerator` makes this call one part of a larger batch.
            strict: charge the strict latent KL (default: in eval mode, or when configured for training).
        """
        if strict is None:
            strict = not self.training or self.cfg.latent.train_kl == "strict"
        x_tilde = self.encode(x)
        cond = self.condition(x, strict=strict, generator=generator)
        bound, z, B = cond.bound, cond.z, x.shape[0]
        g0 = bound(torch.zeros(B, device=x.device, dtype=x_tilde.dtype))
        g1 = bound(torch.ones(B, device=x.device, dtype=x_tilde.dtype))
        if t is None:
            t = (antithetic_times(B, generator=generator, device=x.device) if self.cfg.antithetic
                 else rng.rand((B,), generator, device=x.device)).to(x_tilde.dtype)
        return ELBOTerms(
            recon=self._recon(x, x_tilde, g0, generator),
            prior=self._prior(x_tilde, g1),
            diffusion=self._diffusion(x_tilde, t, bound, z, generator),
            latent=cond.latent.kl,
            latent_kl=cond.latent.kl_kind,
        )

    def decoder_logits(self, x0_rescaled: Tensor, gamma0: Tensor) -> Tensor:
        """log p(x = v | x_0) up to a constant, (B, C, H, W, V): -1/2 ((x_0' - x_tilde(v)) exp(-gamma_0/2))^2."""
        return decoder_logits(x0_rescaled, gamma0, self._values(x0_rescaled.device))

    def _recon(self, x: Tensor, x_tilde: Tensor, g0: GammaOut, generator) -> Tensor:
        return discrete_recon(x, x_tilde, g0, self._values(x.device), generator)

    def _prior(self, x_tilde: Tensor, g1: GammaOut) -> Tensor:
        return prior_kl(x_tilde, g1)

    def _diffusion(self, x_tilde: Tensor, t: Tensor, bound: BoundSchedule, z: Tensor | None, generator) -> Tensor:
        return diffusion_loss(x_tilde, t, bound, lambda x_t, t, g: self.eps_hat(x_t, g, z),
                              timesteps=self.cfg.timesteps, generator=generator)


# --- the terms, for any schedule and denoiser --------------------------------------------------------------
# Functions of plain callables so users can bound the likelihood of their own networks (mulan.likelihood.elbo).

def build_model(cfg: Config) -> Diffusion:
    """The model a whole config describes (its ``model`` section on the images of its ``data`` section)."""
    return Diffusion(cfg.model, tuple(cfg.data.shape), cfg.data.num_values)


def decoder_logits(x0_rescaled: Tensor, gamma0: Tensor, values: Tensor) -> Tensor:
    """log p(x = v | x_0) up to a constant, (B, C, H, W, V): -1/2 ((x_0' - values[v]) exp(-gamma_0/2))^2."""
    inv_std = torch.exp(-0.5 * gamma0).expand_as(x0_rescaled).unsqueeze(-1)
    return -0.5 * ((x0_rescaled.unsqueeze(-1) - values) * inv_std).square()


def discrete_recon(x: Tensor, x_tilde: Tensor, g0: GammaOut, values: Tensor, generator: Generator = None) -> Tensor:
    """SPEC 1: -log p(x | x_0) for the discrete decoder over ``values`` = x_tilde(v), v = 0..V-1, with
    x_0' = x_0 / alpha_0 = x_tilde + exp(gamma_0 / 2) eps; (B,) nats."""
    eps = rng.randn(x_tilde.shape, generator, device=x_tilde.device, dtype=x_tilde.dtype)
    x0 = x_tilde + torch.exp(0.5 * g0.gamma) * eps
    logp = F.log_softmax(decoder_logits(x0, g0.gamma, values), dim=-1)
    return -logp.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).flatten(1).sum(1)


def gaussian_recon(x_tilde: Tensor, g0: GammaOut, generator: Generator = None) -> Tensor:
    """-log p(x_tilde | x_0) for continuous data: the Gaussian decoder N(x_tilde; x_0 / alpha_0, exp(gamma_0));
    (B,) nats. With x_0 / alpha_0 = x_tilde + exp(gamma_0 / 2) eps this is 1/2 (eps^2 + gamma_0 + log 2 pi)."""
    eps = rng.randn(x_tilde.shape, generator, device=x_tilde.device, dtype=x_tilde.dtype)
    gamma0 = g0.gamma.expand_as(x_tilde)
    return 0.5 * (eps.square() + gamma0 + math.log(2 * math.pi)).flatten(1).sum(1)


def prior_kl(x_tilde: Tensor, g1: GammaOut) -> Tensor:
    """SPEC 2: KL(N(alpha_1 x_tilde, sigma_1^2) || N(0, 1)) per pixel, summed; (B,) nats."""
    alpha2, sigma2 = g1.alpha2, g1.sigma2
    kl = 0.5 * (alpha2 * x_tilde.square() + sigma2 - F.logsigmoid(g1.gamma) - 1.0)
    return kl.flatten(1).sum(1)


def diffusion_loss(x_tilde: Tensor, t: Tensor, bound: BoundSchedule, predict: Callable[[Tensor, Tensor, GammaOut], Tensor],
                   *, timesteps: int = 0, generator: Generator = None) -> Tensor:
    """SPEC 3: the diffusion loss at times ``t`` (B,) with one noise draw; (B,) nats.

    ``predict(x_t, t, g)`` returns eps_hat given x_t, t and the schedule's output g at t. ``timesteps`` T > 0 gives the
    discrete-time loss (t moved onto the grid {1/T, ..., 1}), 0 the continuous-time one.
    """
    T = timesteps
    if T > 0:  # discrete time: t on the grid {1/T, ..., 1}, s = t - 1/T
        t = (torch.floor(t * T) + 1.0) / T
    g = bound(t)
    eps = rng.randn(x_tilde.shape, generator, device=x_tilde.device, dtype=x_tilde.dtype)
    x_t = g.alpha2.sqrt() * x_tilde + g.sigma2.sqrt() * eps
    err = (eps - predict(x_t, t, g)).square()
    if T > 0:
        # discrete: 1/2 T sum expm1(gamma_t - gamma_s) (eps - eps_hat)^2
        weight = T * torch.expm1(g.gamma - bound(t - 1.0 / T).gamma)
    else:
        # continuous: 1/2 sum gamma'(t) (eps - eps_hat)^2
        weight = g.dgamma_dt
    return 0.5 * (weight * err).flatten(1).sum(1)
