"""Samplers of a trained model: pure functions of the model and a generator, with progress through a callback.

Every sampler takes the :class:`~mulan.diffusion.Diffusion` model, the number of images and keyword options,
and returns integer images (B, C, H, W) in 0..V-1. A MuLAN model's z is drawn from the prior p(z) for each
sample unless ``z`` (num, m) is given; the fixed-step samplers run on a grid of :mod:`mulan.sampling.grids` and
the steps of :mod:`mulan.sampling.solvers`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mulan.diffusion import Conditioned, Diffusion
from mulan.sampling import solvers
from mulan.sampling.grids import Grid, time_grid
from mulan.sampling.solvers import Callback


@torch.no_grad()
def decode(model: Diffusion, x0: Tensor, gamma0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw x ~ p(x | x_0) from the discrete decoder, given x_0 (B, C, H, W) and gamma_0."""
    x0_rescaled = x0 / torch.sigmoid(-gamma0).sqrt()
    logits = model.decoder_logits(x0_rescaled, gamma0)
    probs = torch.softmax(logits.float(), dim=-1).flatten(0, -2)
    return torch.multinomial(probs, 1, generator=generator).reshape(x0.shape)


def _start(model: Diffusion, num: int, z: Tensor | None, generator) -> tuple[Conditioned, Tensor]:
    """z (drawn from the prior when not given), then x_1 ~ N(0, I): the draws every sampler makes first."""
    cond = model.condition(z=z, batch=num, generator=generator)
    x1 = torch.randn((num, *model.shape), generator=generator, device=model.device)
    return cond, x1.to(model.dtype)


def _finish(model: Diffusion, cond: Conditioned, x0: Tensor, generator) -> Tensor:
    zeros = torch.zeros(x0.shape[0], device=model.device, dtype=model.dtype)
    return decode(model, x0, cond.bound(zeros).gamma, generator=generator)


@torch.no_grad()
def ancestral_sample(model: Diffusion, num: int, *, steps: int = 1000, z: Tensor | None = None, grid: Grid = "t",
                     generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """Ancestral sampling with ``steps`` steps, per pixel (SPEC "Sampling"; :func:`mulan.sampling.solvers.ancestral`).

    z: a latent (num, m) for conditional sampling; by default drawn from the prior.
    """
    cond, x1 = _start(model, num, z, generator)
    times = time_grid(cond.bound, steps, num, grid, device=model.device, dtype=model.dtype)
    x0 = solvers.ancestral(cond.eps_fn, cond.bound, x1, times, generator=generator, callback=callback)
    return _finish(model, cond, x0, generator)


@torch.no_grad()
def ddim_sample(model: Diffusion, num: int, *, steps: int = 50, eta: float = 0.0, z: Tensor | None = None,
                grid: Grid = "logsnr", generator: torch.Generator | None = None,
                callback: Callback | None = None) -> Tensor:
    """DDIM(eta) with ``steps`` steps, per pixel (:func:`mulan.sampling.solvers.ddim`); eta = 0 deterministic."""
    cond, x1 = _start(model, num, z, generator)
    times = time_grid(cond.bound, steps, num, grid, device=model.device, dtype=model.dtype)
    x0 = solvers.ddim(cond.eps_fn, cond.bound, x1, times, eta=eta, generator=generator, callback=callback)
    return _finish(model, cond, x0, generator)


@torch.no_grad()
def dpm2m_sample(model: Diffusion, num: int, *, steps: int = 20, eta: float = 0.0, z: Tensor | None = None,
                 grid: Grid = "logsnr", generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> Tensor:
    """The second-order multistep exponential integrator, per pixel (:func:`mulan.sampling.solvers.dpm2m`);
    eta = 0 deterministic, eta > 0 its stochastic form."""
    cond, x1 = _start(model, num, z, generator)
    times = time_grid(cond.bound, steps, num, grid, device=model.device, dtype=model.dtype)
    x0 = solvers.dpm2m(cond.eps_fn, cond.bound, x1, times, eta=eta, generator=generator, callback=callback)
    return _finish(model, cond, x0, generator)


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
    return _finish(model, cond, x0, generator)
