"""From the continuous density of x_0 to a lower bound on the discrete log P(x) (derivations: docs/likelihood.md).

The ODE gives a density p_0 over the continuous x_0 = alpha_0 x_tilde + sigma_0 eps (t = 0 of the forward
process). In that variable, the pixel value x_i in {0..V-1} owns the bin

    B_i(x) = alpha_0,i * [x_tilde_i - 1/V, x_tilde_i + 1/V]        (width 2 alpha_0,i / V),

and P(x) = int_{B(x)} p_0(y) dy. For any q(y|x) supported inside B(x) (variational dequantization),

    log P(x) >= E_q[log p_0(y) - log q(y|x)]                                    (Jensen)
    log P(x) >= E[logsumexp_k(log p_0(y_k) - log q(y_k|x)) - log K],  y_k ~ q   (importance weighted, Burda 2016)

Two choices of q (per pixel, independent):

* ``"uniform"``: y = alpha_0 (x_tilde + u), u ~ U[-1/V, 1/V];  -log q = sum_i log(2 alpha_0,i / V).
* ``"truncnorm"`` (i-DODE, Zheng et al. 2023): y = alpha_0 x_tilde + sigma_0 eps, eps ~ N(0, 1) truncated to
  [-tau, tau];  -log q = sum_i [eps_i^2 / 2 + log(2 pi) / 2 + log Z + log sigma_0,i],  Z = erf(tau / sqrt 2).
  Inside the bin iff tau sigma_0,i <= alpha_0,i / V, i.e. gamma_0,i <= 2 log(1 / (tau V)); a pixel with a noisier
  gamma_0 is truncated at the bin's edge instead: tau_i = alpha_0,i / (V sigma_0,i), and Z_i = erf(tau_i / sqrt 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from mulan.schedules.base import BoundSchedule

DequantKind = Literal["truncnorm", "uniform"]
LogDensity = Callable[[Tensor], Tensor]
"""Continuous y (B, C, H, W) at t0 -> log p_0(y) (B,) in nats (e.g. a lambda around ode_log_likelihood)."""


@dataclass
class Dequantized:
    """One draw y ~ q(.|x) and its log-density."""

    y: Tensor  # (B, C, H, W) continuous x_0 inside x's bin, float64
    log_q: Tensor  # (B,) log q(y | x) in nats, float64 (density with respect to y)


def encode(x: Tensor, num_values: int) -> Tensor:
    """x in {0..V-1} -> x_tilde = 2 (x + 0.5) / V - 1 (bin centres, bin width 2 / V), float64."""
    return 2.0 * (x.to(torch.float64) + 0.5) / num_values - 1.0


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def dequantize(
    x: Tensor,
    num_values: int,
    bound: BoundSchedule,
    *,
    kind: DequantKind = "truncnorm",
    generator: torch.Generator | None = None,
    tau: float = 3.0,
    t0: float = 0.0,
) -> Dequantized:
    """Draw y ~ q(y | x) inside x's bin in x_0-space; alpha_0, sigma_0 from ``bound`` at t0 (per pixel).

    ``"truncnorm"`` truncates at +-tau sigma_0, or at the bin's edge for a pixel where that is nearer (a noisy
    gamma(t0)), so q always stays inside the bin and the estimate bounds log P(x).
    """
    x_tilde = encode(x, num_values)
    g = bound(torch.full((x.shape[0],), t0, device=x.device))  # default dtype, as a schedule module expects
    gamma_0 = g.gamma.to(torch.float64).expand_as(x_tilde)
    alpha_0 = torch.sigmoid(-gamma_0).sqrt()
    if kind == "uniform":
        u = (2.0 * _uniform(x.shape, generator, x.device) - 1.0) / num_values
        y = alpha_0 * (x_tilde + u)
        # q = prod_i V / (2 alpha_0,i): uniform over the bin of width 2 alpha_0,i / V
        log_q = -torch.log(2.0 * alpha_0 / num_values).flatten(1).sum(1)
        return Dequantized(y, log_q)
    if kind != "truncnorm":
        raise ValueError(f"kind must be 'truncnorm' or 'uniform', got {kind!r}")
    # Truncated at +-tau sigma_0, or at the bin's edge where that is nearer: tau_i = min(tau, alpha_0,i / (V sigma_0,i)).
    # Any q inside the bin keeps the bound valid; a pixel with gamma_0,i <= 2 log(1 / (tau V)) gets tau itself.
    sigma_0 = torch.sigmoid(gamma_0).sqrt()
    tau_i = (alpha_0 / (num_values * sigma_0)).clamp(max=tau)
    # inverse-CDF sampling of N(0, 1) truncated to [-tau_i, tau_i]
    lo = 0.5 * torch.special.erfc(tau_i / math.sqrt(2.0))  # Phi(-tau_i)
    u = _uniform(x.shape, generator, x.device)
    eps = torch.maximum(torch.minimum(torch.special.ndtri(lo + (1.0 - 2.0 * lo) * u), tau_i), -tau_i)
    y = alpha_0 * x_tilde + sigma_0 * eps
    log_z = torch.log(torch.special.erf(tau_i / math.sqrt(2.0)))
    log_q = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - log_z - torch.log(sigma_0)).flatten(1).sum(1)
    return Dequantized(y, log_q)


@torch.no_grad()
def dequantized_nll(
    x: Tensor,
    num_values: int,
    log_density: LogDensity,
    bound: BoundSchedule,
    *,
    kind: DequantKind = "truncnorm",
    samples: int = 1,
    generator: torch.Generator | None = None,
    tau: float = 3.0,
    t0: float = 0.0,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Upper bound on -log P(x) in nats, (B,) float64, for integer images x (B, C, H, W) in {0..V-1}.

    ``-logsumexp_k(log p_0(y_k) - log q(y_k|x)) + log K`` with K = ``samples`` draws y_k ~ q (``kind``); the
    bound's expectation tightens as K grows. ``log_density`` is called K times with y_k cast to ``dtype``;
    ``bound`` is the schedule (z fixed) that produced p_0. bits/dim = nats / (n ln 2), n = C H W.
    ``callback(k, K)`` after each draw. With a Hutchinson (noisy but unbiased) log p_0, K = 1 is an unbiased
    estimate of the bound; for K > 1 the noise makes it slightly optimistic (Jensen), exact divergence avoids this.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    log_w = []
    for k in range(samples):
        d = dequantize(x, num_values, bound, kind=kind, generator=generator, tau=tau, t0=t0)
        log_p = log_density(d.y.to(dtype)).to(torch.float64)
        log_w.append(log_p - d.log_q)
        if callback is not None:
            callback(k + 1, samples)
    log_p_hat = torch.logsumexp(torch.stack(log_w), 0) - math.log(samples)
    return -log_p_hat
