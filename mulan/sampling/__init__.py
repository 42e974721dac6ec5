"""Samplers: the 1,000-step ancestral sampler, the adaptive probability-flow ODE, and fast fixed-step samplers
written for per-pixel, z-dependent schedules (DDIM(eta) and a second-order exponential integrator).

``sample(model, num, sampler=NAME, ...)`` dispatches by name (:data:`SAMPLERS`); the step rules are pure
functions of plain callables in :mod:`mulan.sampling.solvers`, the step grids in :mod:`mulan.sampling.grids`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mulan.diffusion import Diffusion
from mulan.sampling.grids import GRIDS, Grid, time_grid
from mulan.sampling.models import ancestral_sample, ddim_sample, decode, dpm2m_sample, ode_sampler
from mulan.sampling.solvers import Callback

SAMPLERS: dict[str, str] = {
    "ancestral": "ancestral, stochastic: x_s ~ p(x_s | x_t) at each of --steps steps (1000 by default)",
    "ode": "probability-flow ODE, deterministic, adaptive dopri5 (eval.ode_rtol/atol; --steps does not apply)",
    "ddim": "DDIM: deterministic first-order exponential integrator (--eta 0), or stochastic with --eta > 0 "
            "(1 = ancestral)",
    "dpm2m": "second-order multistep exponential integrator in data prediction (DPM-Solver++(2M) style), "
             "per-pixel log-SNR steps; deterministic (--eta 0), or its SDE form with --eta > 0",
}
DEFAULT_GRID: Grid = "logsnr"  # measured better than "t" for MuLAN at few steps (docs/sampling.md)


@torch.no_grad()
def sample(model: Diffusion, num: int, *, sampler: str = "ancestral", steps: int = 1000, eta: float = 0.0,
           grid: Grid = "t", z: Tensor | None = None, rtol: float = 1e-5, atol: float = 1e-5,
           method: str = "dopri5", generator: torch.Generator | None = None,
           callback: Callback | None = None) -> Tensor:
    """``num`` images (num, C, H, W) in 0..V-1 from the sampler named ``sampler`` (a key of :data:`SAMPLERS`).

    ``steps`` and ``grid`` apply to the fixed-step samplers, ``eta`` to ddim and dpm2m, ``rtol``/``atol``/
    ``method`` to ode.
    """
    if sampler == "ancestral":
        return ancestral_sample(model, num, steps=steps, z=z, grid=grid, generator=generator, callback=callback)
    if sampler == "ddim":
        return ddim_sample(model, num, steps=steps, eta=eta, z=z, grid=grid, generator=generator, callback=callback)
    if sampler == "dpm2m":
        return dpm2m_sample(model, num, steps=steps, eta=eta, z=z, grid=grid, generator=generator, callback=callback)
    if sampler == "ode":
        return ode_sampler(model, num, z=z, rtol=rtol, atol=atol, method=method, generator=generator,
                           callback=callback)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


__all__ = ["GRIDS", "SAMPLERS", "Callback", "Grid", "ancestral_sample", "ddim_sample", "decode", "dpm2m_sample",
           "ode_sampler", "sample", "time_grid"]
