"""A deliberately simple host-side ODE likelihood, image by image, for benchmarks and cross-checks.

This is how the JAX reference evaluates (``scipy.integrate.solve_ivp(method="RK45")``): flatten x_t and the
running log-det into one float64 numpy vector per image, call the network once per evaluation with a
device round trip, and let scipy control the error of that one vector.

It shares no code with :mod:`mulan.likelihood.ode`: the drift, its divergence, the Hutchinson probes and the
Gaussian log-density are written here again from SPEC "Exact NLL",

    dx/dt = 1/2 sigma_t gamma'_t (eps_hat(x, t) - sigma_t x),   sigma_t^2 = sigmoid(gamma_t)   (elementwise)
    log p_0(x_0) = log N(x_1; 0, I) + int_0^1 div(dx/dt) dt,

so agreement with the batched solver checks its whole path (drift, divergence, probes, error control), not
only its integrator. The probes are drawn as :func:`~mulan.likelihood.ode.ode_log_likelihood` documents
(once per solve, for the whole batch, from ``generator``), so with the same seed both estimate with the same
probes and agree to solver tolerance; the batched solver should be much faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats
from scipy.integrate import solve_ivp
from torch import Tensor

from mulan.schedules.base import BoundSchedule


@dataclass
class ReferenceResult:
    """Output of :func:`reference_log_likelihood`."""

    logp: Tensor  # (B,) nats, float64, on the CPU
    x1: Tensor  # (B, C, H, W) float64 end points
    nfe: list[int]  # drift evaluations per image


def _probes(shape: torch.Size, probes: int, dist: str, generator, device, dtype) -> Tensor:
    """(probes, B, C, H, W) with E[v v^T] = I: Rademacher (+-1 with probability 1/2) or standard Gaussian,
    drawn on the generator's device in one call for the whole batch."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    where = generator.device if generator is not None else device
    if dist == "rademacher":
        v = 2.0 * torch.randint(0, 2, (probes, *shape), generator=generator, device=where).to(dtype) - 1.0
    elif dist == "gaussian":
        v = torch.randn((probes, *shape), generator=generator, device=where, dtype=dtype)
    else:
        raise ValueError(f"probe_dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return v.to(device)


def _drift_and_divergence(x: Tensor, t: Tensor, eps_fn: Callable, bound: BoundSchedule,
                          probes: Tensor | None) -> tuple[Tensor, Tensor]:
    """f = 1/2 sigma gamma' (eps_hat - sigma x) of one image (1, C, H, W), and div f = sum_i df_i/dx_i =
    sum_i c_i (d eps_hat_i / dx_i - sigma_i) with c = 1/2 sigma gamma': the Jacobian's diagonal exactly, or
    v^T diag(c) J v averaged over the probes v."""
    g = bound(t)
    gamma, dgamma = g.gamma.to(x.dtype).expand_as(x), g.dgamma_dt.to(x.dtype).expand_as(x)
    sigma = torch.sigmoid(gamma).sqrt()
    c = 0.5 * sigma * dgamma
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        eps_hat = eps_fn(x, t)
        if probes is None:
            jac = torch.autograd.functional.jacobian(lambda y: eps_fn(y, t), x)  # (1, C, H, W, 1, C, H, W)
            trace = (c.flatten() * jac.reshape(x.numel(), x.numel()).diagonal()).sum()
        else:
            trace = sum((torch.autograd.grad(eps_hat, x, c * v, retain_graph=True)[0] * v).sum() for v in probes)
            trace = trace / len(probes)
    drift = c * (eps_hat.detach() - sigma * x.detach())
    return drift, trace - (c * sigma).sum()


@torch.no_grad()
def reference_log_likelihood(
    x0: Tensor,
    eps_fn: Callable[[Tensor, Tensor], Tensor],
    bound: BoundSchedule,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "hutchinson",
    probes: int = 1,
    probe_dist: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
) -> ReferenceResult:
    """log p_0(x0) per image by scipy RK45 on a numpy state; eps_fn is called in ``dtype`` on x0's device.

    Probes are drawn for the whole batch exactly as ``ode_log_likelihood`` draws them, then image b uses
    its slice.
    """
    device = x0.device
    shape = x0.shape[1:]
    n = x0[0].numel()
    v = None
    if divergence == "hutchinson":
        v = _probes(x0.shape, probes, probe_dist, generator, device, dtype)
    elif divergence != "exact":
        raise ValueError(f"divergence must be 'hutchinson' or 'exact', got {divergence!r}")

    logps, x1s, nfes = [], [], []
    for b in range(x0.shape[0]):
        v_b = None if v is None else v[:, b : b + 1]

        def fun(t: float, y: np.ndarray, v_b: Tensor | None = v_b) -> np.ndarray:
            x_t = torch.from_numpy(y[:n]).to(device=device, dtype=dtype).reshape(1, *shape)
            drift, div = _drift_and_divergence(x_t, torch.full((1,), t, device=device, dtype=dtype), eps_fn,
                                               bound, v_b)
            return np.concatenate([drift.double().cpu().numpy().ravel(), [float(div)]])

        y0 = np.concatenate([x0[b].double().cpu().numpy().ravel(), [0.0]])
        sol = solve_ivp(fun, (t0, t1), y0, method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed on image {b}: {sol.message}")
        x1 = sol.y[:n, -1]
        logps.append(float(stats.norm.logpdf(x1).sum()) + float(sol.y[n, -1]))
        x1s.append(torch.from_numpy(x1).reshape(1, *shape))
        nfes.append(int(sol.nfev))
    return ReferenceResult(logp=torch.tensor(logps, dtype=torch.float64), x1=torch.cat(x1s), nfe=nfes)
