"""A deliberately simple host-side ODE likelihood, image by image, for benchmarks and cross-checks.

This is how the JAX reference evaluates (``scipy.integrate.solve_ivp(method="RK45")``): flatten x_t and the
running log-det into one float64 numpy vector per image, call the network once per evaluation with a
device round trip, and let scipy control the error of that one vector. It solves the same ODE with the same
Hutchinson probes as :func:`mulan.likelihood.ode.ode_log_likelihood` (same generator seed, same draw), so the
two agree to solver tolerance; the batched torch solver should be much faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from mulan.likelihood.ode import (
    Divergence,
    EpsFn,
    ProbeDist,
    draw_probes,
    drift_and_divergence,
    log_standard_normal,
)
from mulan.schedules.base import BoundSchedule


@dataclass
class ReferenceResult:
    """Output of :func:`reference_log_likelihood`."""

    logp: Tensor  # (B,) nats, float64, on the CPU
    x1: Tensor  # (B, C, H, W) float64 end points
    nfe: list[int]  # drift evaluations per image


@torch.no_grad()
def reference_log_likelihood(
    x0: Tensor,
    eps_fn: EpsFn,
    bound: BoundSchedule,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: Divergence = "hutchinson",
    probes: int = 1,
    probe_dist: ProbeDist = "rademacher",
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
        v = draw_probes(x0.shape, probes, probe_dist, generator=generator, device=device, dtype=dtype)
    elif divergence != "exact":
        raise ValueError(f"divergence must be 'hutchinson' or 'exact', got {divergence!r}")

    logps, x1s, nfes = [], [], []
    for b in range(x0.shape[0]):
        v_b = None if v is None else v[:, b : b + 1]

        def fun(t: float, y: np.ndarray, v_b: Tensor | None = v_b) -> np.ndarray:
            x_t = torch.from_numpy(y[:n]).to(device=device, dtype=dtype).reshape(1, *shape)
            t_b = torch.full((1,), t, device=device, dtype=dtype)
            out = drift_and_divergence(x_t, t_b, eps_fn, bound, probes=v_b)
            return np.concatenate([out.drift.double().cpu().numpy().ravel(), out.div.double().cpu().numpy()])

        y0 = np.concatenate([x0[b].double().cpu().numpy().ravel(), [0.0]])
        sol = solve_ivp(fun, (t0, t1), y0, method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed on image {b}: {sol.message}")
        x1 = torch.from_numpy(sol.y[:n, -1]).reshape(1, *shape)
        logps.append(log_standard_normal(x1) + float(sol.y[n, -1]))
        x1s.append(x1)
        nfes.append(int(sol.nfev))
    return ReferenceResult(logp=torch.cat(logps), x1=torch.cat(x1s), nfe=nfes)
