"""Fixed-step samplers for per-pixel schedules, on plain callables (SPEC "Sampling with a per-pixel schedule").

Everything is elementwise: with gamma = gamma(z, t) per pixel, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma),
the log-SNR lambda = log(alpha / sigma) = -gamma / 2 and, from t to the next (smaller) time s,
h = lambda_s - lambda_t >= 0, each pixel advances by its own log-SNR step. A scalar schedule (gamma of shape
(B, 1, 1, 1)) is the special case where every pixel's step is the same. The predictions are
eps_hat = eps_fn(x_t, t) and x0_hat = (x_t - sigma_t eps_hat) / alpha_t (a v-prediction network is converted to
eps_hat by the model, ``Diffusion.eps_hat``). With c = -expm1(gamma_s - gamma_t) = 1 - SNR_t / SNR_s:

- ``ancestral``: x_s = sqrt(a / b) (x_t - sigma_t c eps_hat) + sqrt((1 - a) c) xi, a = alpha_s^2, b = alpha_t^2
  (SPEC "Sampling"); the same distribution as ``ddim`` with eta = 1.
- ``ddim`` (eta): x_s = alpha_s x0_hat + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(c) xi; eta = 0 is
  the first-order exponential integrator of the probability-flow ODE,
  x_s = (alpha_s / alpha_t) x_t - sigma_s expm1(h) eps_hat.
- ``dpm2m``: the second-order multistep exponential integrator in data prediction (DPM-Solver++(2M) style),
  x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D with D = x0_hat + (h / (2 h_prev)) (x0_hat - x0_hat_prev)
  per pixel (= (1 + 1/(2r)) x0_hat - x0_hat_prev / (2r), r = h_prev / h); the first step uses D = x0_hat.
  With eta > 0 it is the stochastic (SDE) member of the same family: with g = eta h,
  x_s = (sigma_s / sigma_t) exp(-g) x_t - alpha_s expm1(-h - g) D + sigma_s sqrt(-expm1(-2 g)) xi, and the same
  second-order D (its weight scaled by expm1(-h - g) in place of expm1(-h)). At eta = 1 and D = x0_hat this is the
  ancestral step: exp(-2h) = SNR_t / SNR_s, so x0's weight alpha_s c and the variance sigma_s^2 c are the
  posterior's (c = 1 - SNR_t / SNR_s).

Each function takes x at t = 1 and a grid ``times`` (N + 1, B) from :func:`mulan.sampling.grids.time_grid` and
returns the continuous x at the grid's last time (t = 0), which the caller decodes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mulan.schedules.base import BoundSchedule, GammaOut

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t (B, C, H, W), t (B,)) -> eps_hat (B, C, H, W), with z fixed inside."""
Callback = Callable[[int, int], None]
"""callback(step_done, steps_total)."""


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _steps(eps_fn: EpsFn, bound: BoundSchedule, x: Tensor, times: Tensor, step, callback: Callback | None) -> Tensor:
    """Run ``step(x_t, g_t, g_s, eps_hat, k) -> x_s`` over consecutive grid times; eps_hat evaluated at each t."""
    n = times.shape[0] - 1
    g_t = bound(times[0])
    for k in range(n):
        t, s = times[k], times[k + 1]
        g_s = bound(s)
        x = step(x, g_t, g_s, eps_fn(x, t), k)
        g_t = g_s
        if callback is not None:
            callback(k + 1, n)
    return x


def ancestral(eps_fn: EpsFn, bound: BoundSchedule, x1: Tensor, times: Tensor, *,
              generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """Ancestral sampling over ``times``: x_s ~ p(x_s | x_t) (module docstring); returns x at the last time."""

    def step(x_t: Tensor, g_t: GammaOut, g_s: GammaOut, eps_hat: Tensor, k: int) -> Tensor:
        a, b = g_s.alpha2, g_t.alpha2
        c = -torch.expm1(g_s.gamma - g_t.gamma)
        return (a / b).sqrt() * (x_t - g_t.sigma2.sqrt() * c * eps_hat) + ((1.0 - a) * c).sqrt() * _noise(x_t, generator)

    return _steps(eps_fn, bound, x1, times, step, callback)


def ddim(eps_fn: EpsFn, bound: BoundSchedule, x1: Tensor, times: Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """DDIM(eta) over ``times`` (module docstring); eta = 0 is deterministic and draws nothing."""

    def step(x_t: Tensor, g_t: GammaOut, g_s: GammaOut, eps_hat: Tensor, k: int) -> Tensor:
        alpha_t, sigma_t = g_t.alpha2.sqrt(), g_t.sigma2.sqrt()
        alpha_s, sigma_s = g_s.alpha2.sqrt(), g_s.sigma2.sqrt()
        if eta == 0.0:  # first-order exponential integrator: (alpha_s / alpha_t) x_t - sigma_s expm1(h) eps_hat
            h = 0.5 * (g_t.gamma - g_s.gamma)
            return (alpha_s / alpha_t) * x_t - sigma_s * torch.expm1(h) * eps_hat
        x0_hat = (x_t - sigma_t * eps_hat) / alpha_t
        c = -torch.expm1(g_s.gamma - g_t.gamma)
        return (alpha_s * x0_hat + sigma_s * (1.0 - eta**2 * c).clamp_min(0.0).sqrt() * eps_hat
                + eta * sigma_s * c.sqrt() * _noise(x_t, generator))

    return _steps(eps_fn, bound, x1, times, step, callback)


def dpm2m(eps_fn: EpsFn, bound: BoundSchedule, x1: Tensor, times: Tensor, *, eta: float = 0.0,
          generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """The second-order multistep exponential integrator in data prediction, per pixel (module docstring);
    eta = 0 (default) is deterministic and draws nothing, eta > 0 its stochastic (SDE) form."""
    prev: dict[str, Tensor] = {}

    def step(x_t: Tensor, g_t: GammaOut, g_s: GammaOut, eps_hat: Tensor, k: int) -> Tensor:
        alpha_t, sigma_t = g_t.alpha2.sqrt(), g_t.sigma2.sqrt()
        alpha_s, sigma_s = g_s.alpha2.sqrt(), g_s.sigma2.sqrt()
        x0_hat = (x_t - sigma_t * eps_hat) / alpha_t
        h = 0.5 * (g_t.gamma - g_s.gamma)  # lambda_s - lambda_t, per pixel
        d = x0_hat
        if prev:
            h_prev = prev["h"]
            ratio = torch.where(h_prev > 0, h / h_prev.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))
            d = x0_hat + 0.5 * ratio * (x0_hat - prev["x0_hat"])
        prev["h"], prev["x0_hat"] = h, x0_hat
        if eta == 0.0:
            return (sigma_s / sigma_t) * x_t - alpha_s * torch.expm1(-h) * d
        g = eta * h
        return ((sigma_s / sigma_t) * torch.exp(-g) * x_t - alpha_s * torch.expm1(-h - g) * d
                + sigma_s * (-torch.expm1(-2.0 * g)).clamp_min(0.0).sqrt() * _noise(x_t, generator))

    return _steps(eps_fn, bound, x1, times, step, callback)
