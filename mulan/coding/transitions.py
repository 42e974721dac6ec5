"""The discrete-time chain's transitions, as Gaussians on per-step grids (SPEC "Lossless compression").

The chain is the one ``diffusion.py`` bounds at T steps: latents x_i = x_{i/T}, i = 0..T, with
q(x_0 | x) = N(alpha_0 x_tilde, sigma_0^2), q(x_i | x_{i-1}) = N(alpha_{i|i-1} x_{i-1}, sigma_i^2 c_i),
c_i = -expm1(gamma_{i-1} - gamma_i), and the model's reverse steps
p(x_{i-1} | x_i) = N(sqrt(a/b) (x_i - sigma_i c_i eps_hat), (1 - a) c_i), a = alpha_{i-1}^2, b = alpha_i^2
(the sampler's step, ``mulan.sampling``), the discrete decoder p(x | x_0) and the prior N(0, I) for x_T.
Its expected code length is recon + sum_i KL(q(x_{i-1} | x_i, x) || p(x_{i-1} | x_i)) + prior, the
discrete-time negative ELBO (``diffusion_loss`` with ``timesteps=T``: step i's KL is
1/2 expm1(gamma_i - gamma_{i-1}) |eps - eps_hat|^2).

Each latent x_i lives on its own grid x_i = j * delta_i (j an integer), per pixel. x_i is popped once
(from q(x_i | x_{i-1})) and pushed once (under p(x_i | x_{i+1}), or the prior), both on this grid, so the
bin width cancels in the net length. It is a fraction 2^-k of the smaller of the two standard deviations
it is coded with, so every coded distribution spans at least 2^k bins: fine enough that the binned chain
costs what the continuous one does, coarse enough that a chain in flight borrows only about
n (k + 2.05) bits per latent (the entropy of a Gaussian on bins 2^-k of its width).

Every gamma comes from the model's ``bound(t)``; nothing here knows the schedule's form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# A step where gamma hardly moves would give a zero-width grid; no grid is finer than this fraction of
# sigma_i (such steps then cost a little more than their bound, and still decode exactly).
MIN_WIDTH = 2.0 ** -20


def sigma(gamma: Tensor) -> Tensor:
    """sigma = sqrt(sigmoid(gamma))."""
    return torch.sigmoid(gamma).sqrt()


def alpha(gamma: Tensor) -> Tensor:
    """alpha = sqrt(sigmoid(-gamma))."""
    return torch.sigmoid(-gamma).sqrt()


def step_fraction(gamma_prev: Tensor, gamma: Tensor) -> Tensor:
    """c = -expm1(gamma_prev - gamma) = 1 - SNR_t / SNR_s: the fraction of sigma_t^2 a step adds."""
    return -torch.expm1(gamma_prev - gamma)


def forward_std(gamma_prev: Tensor, gamma: Tensor, first: Tensor | bool = False) -> Tensor:
    """Std of q(x_i | x_{i-1}) = sigma_i sqrt(c_i); of q(x_0 | x) = sigma_0 where ``first`` (rows of i = 0)."""
    step = sigma(gamma) * step_fraction(gamma_prev, gamma).clamp_min(0.0).sqrt()
    return torch.where(torch.as_tensor(first), sigma(gamma), step)


def reverse_std(gamma: Tensor, gamma_next: Tensor, last: Tensor | bool = False) -> Tensor:
    """Std of p(x_i | x_{i+1}) = sigma_i sqrt(c_{i+1}) (the posterior's); 1, the prior's, where ``last`` (i = T)."""
    step = sigma(gamma) * step_fraction(gamma, gamma_next).clamp_min(0.0).sqrt()
    return torch.where(torch.as_tensor(last), torch.ones_like(step), step)


def grid_width(gamma_prev: Tensor, gamma: Tensor, gamma_next: Tensor, k: int, *, first: Tensor | bool = False,
               last: Tensor | bool = False) -> Tensor:
    """delta_i = 2^-k min(std of q(x_i | .), std of p(x_i | .)), at least 2^-k MIN_WIDTH sigma_i.

    ``first``/``last`` mark rows with i = 0 (q(x_0 | x)) or i = T (the prior); their ``gamma_prev`` or
    ``gamma_next`` is ignored.
    """
    narrow = torch.minimum(forward_std(gamma_prev, gamma, first), reverse_std(gamma, gamma_next, last))
    return torch.maximum(narrow, MIN_WIDTH * sigma(gamma)) * 2.0 ** -k


@dataclass
class Gaussian:
    """Gaussians for a set of grid indices, in grid units: N(mean, std^2) over j (float64, any shape)."""

    mean: Tensor
    std: Tensor

    def flat(self) -> "Gaussian":
        return Gaussian(self.mean.reshape(-1), self.std.reshape(-1))


def on_grid(mean: Tensor, std: Tensor, width: Tensor) -> Gaussian:
    """N(mean, std^2) of a latent whose grid has bins of ``width``, in grid units."""
    return Gaussian(mean / width, std / width)


def q_first(x_tilde: Tensor, gamma0: Tensor, width0: Tensor) -> Gaussian:
    """q(x_0 | x) = N(alpha_0 x_tilde, sigma_0^2) on x_0's grid."""
    return on_grid(alpha(gamma0) * x_tilde, sigma(gamma0).expand_as(x_tilde), width0)


def q_step(x_prev: Tensor, gamma_prev: Tensor, gamma: Tensor, width: Tensor) -> Gaussian:
    """q(x_i | x_{i-1}) = N(alpha_i / alpha_{i-1} x_{i-1}, sigma_i^2 c_i) on x_i's grid."""
    mean = alpha(gamma) / alpha(gamma_prev) * x_prev
    return on_grid(mean, forward_std(gamma_prev, gamma).expand_as(mean), width)


def p_step(x: Tensor, eps_hat: Tensor, gamma_prev: Tensor, gamma: Tensor, width_prev: Tensor) -> Gaussian:
    """p(x_{i-1} | x_i) = N(sqrt(a/b) (x_i - sigma_i c eps_hat), (1 - a) c) on x_{i-1}'s grid (SPEC "Sampling")."""
    a, b = torch.sigmoid(-gamma_prev), torch.sigmoid(-gamma)
    c = step_fraction(gamma_prev, gamma)
    mean = (a / b).sqrt() * (x - sigma(gamma) * c * eps_hat)
    std = ((1.0 - a) * c).clamp_min(0.0).sqrt().expand_as(mean)
    return on_grid(mean, std, width_prev)


def prior(width_last: Tensor) -> Gaussian:
    """p(x_T) = N(0, 1) on x_T's grid."""
    return on_grid(torch.zeros_like(width_last), torch.ones_like(width_last), width_last)


def step_kl(x: Tensor, x_tilde: Tensor, eps_hat: Tensor, gamma_prev: Tensor, gamma: Tensor) -> Tensor:
    """KL(q(x_{i-1} | x_i, x) || p(x_{i-1} | x_i)) per pixel, nats, at the point x_i:
    1/2 expm1(gamma_i - gamma_{i-1}) (eps - eps_hat)^2 with eps = (x_i - alpha_i x_tilde) / sigma_i."""
    eps = (x - alpha(gamma) * x_tilde) / sigma(gamma)
    return 0.5 * torch.expm1(gamma - gamma_prev) * (eps - eps_hat).square()


def gaussian_entropy_bits(std_in_bins: Tensor) -> Tensor:
    """Entropy in bits of a Gaussian on unit bins (per element), log2(std sqrt(2 pi e)) for std >= 1/2."""
    return torch.log2(std_in_bins.clamp_min(0.5) * math.sqrt(2.0 * math.pi * math.e))
