"""Samplers: pure functions of a model and a generator, with progress through a callback.

Every sampler takes the :class:`~mulan.diffusion.Diffusion` model, the number of images and keyword options,
and returns integer images (B, C, H, W) in 0..V-1.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mulan.diffusion import Diffusion

Callback = Callable[[int, int], None]
"""callback(step_done, steps_total)."""


@torch.no_grad()
def decode(model: Diffusion, x0: Tensor, gamma0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw x ~ p(x | x_0) from the discrete decoder, given x_0 (B, C, H, W) and gamma_0."""
    x0_rescaled = x0 / torch.sigmoid(-gamma0).sqrt()
    logits = model.decoder_logits(x0_rescaled, gamma0)
    probs = torch.softmax(logits.float(), dim=-1).flatten(0, -2)
    return torch.multinomial(probs, 1, generator=generator).reshape(x0.shape)


@torch.no_grad()
def ancestral_sample(model: Diffusion, num: int, *, steps: int = 1000, z: Tensor | None = None,
                     generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """Ancestral sampling with ``steps`` steps, per pixel (SPEC "Sampling").

    z: a latent (num, m) for conditional sampling; by default drawn from the prior.
    With a = sigmoid(-gamma_s), b = sigmoid(-gamma_t), c = -expm1(gamma_s - gamma_t):
    x_s = sqrt(a / b) (x_t - sigma_t c eps_hat) + sqrt((1 - a) c) eps.
    """
    device = model.device
    cond = model.condition(z=z, batch=num, generator=generator)
    x_t = torch.randn((num, *model.shape), generator=generator, device=device)
    ones = torch.ones(num, device=device)
    for i in range(steps, 0, -1):
        t, s = ones * (i / steps), ones * ((i - 1) / steps)
        g_t, g_s = cond.bound(t), cond.bound(s)
        eps_hat = model.eps_hat(x_t, g_t, cond.z)
        a, b = g_s.alpha2, g_t.alpha2
        c = -torch.expm1(g_s.gamma - g_t.gamma)
        noise = torch.randn(x_t.shape, generator=generator, device=device)
        x_t = (a / b).sqrt() * (x_t - g_t.sigma2.sqrt() * c * eps_hat) + ((1.0 - a) * c).sqrt() * noise
        if callback is not None:
            callback(steps - i + 1, steps)
    return decode(model, x_t, cond.bound(torch.zeros(num, device=device)).gamma, generator=generator)


@torch.no_grad()
def ode_sampler(model: Diffusion, num: int, *, z: Tensor | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                method: str = "dopri5", generator: torch.Generator | None = None,
                callback: Callback | None = None) -> Tensor:
    """Deterministic sampling: the probability-flow ODE from x_1 ~ N(0, I) back to t = 0, then the decoder.

    The same ODE as the exact likelihood (``mulan.likelihood.ode``); ``callback(nfe, 0)`` after each drift
    evaluation (the number of steps is chosen by the adaptive solver).
    """
    from mulan.likelihood.ode import ode_sample

    cond = model.condition(z=z, batch=num, generator=generator)
    x0 = ode_sample(cond.eps_fn, cond.bound, (num, *model.shape), generator=generator, rtol=rtol, atol=atol,
                    method=method, device=model.device, dtype=model.dtype,
                    callback=None if callback is None else (lambda nfe, t: callback(nfe, 0)))
    return decode(model, x0, cond.bound(torch.zeros(num, device=model.device, dtype=model.dtype)).gamma,
                  generator=generator)
