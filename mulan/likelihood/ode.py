"""Exact log-likelihood of the continuous x_0 by the probability-flow ODE (SPEC "Likelihood evaluation").

The variance-preserving forward process ``x_t = alpha_t x_tilde + sigma_t eps`` (per pixel) has the
probability-flow ODE

    dx/dt = f(x, t) = 1/2 sigma_t gamma'_t (eps_hat(x, t) - sigma_t x)          (elementwise)

(from dx = -1/2 sigma^2 gamma' x dt + sqrt(sigma^2 gamma') dW, score = -eps_hat / sigma). The model's density of
x_0 is N(0, I) at t = 1 pushed back through this flow, so by the instantaneous change of variables

    log p_0(x_0) = log N(x_1; 0, I) + int_{t0}^{t1} div f(x_t, t) dt.

The estimators take plain callables, so any network can be evaluated:

* ``eps_fn(x_t, t) -> eps_hat``: x_t (B, C, H, W), t (B,); the latent z is already fixed inside.
* ``bound(t) -> GammaOut``: a schedule with z fixed (``Schedule.bind``); (B, 1, 1, 1) or (B, C, H, W).

Both are called with tensors of the solve's ``dtype`` on x_0's device (cast the network accordingly).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

from mulan.schedules.base import BoundSchedule, GammaOut

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t (B, C, H, W), t (B,)) -> eps_hat (B, C, H, W), with z fixed inside."""

Divergence = Literal["hutchinson", "exact"]
ProbeDist = Literal["rademacher", "gaussian"]
ErrorNorm = Literal["per_image", "batch"]


@dataclass
class ODEResult:
    """Output of :func:`ode_log_likelihood`."""

    logp: Tensor  # (B,) log p_0(x_0) in nats, density of the continuous x_0 (no dequantization)
    x1: Tensor  # (B, C, H, W) the end point x_{t1} of the flow
    nfe: int  # evaluations of the drift (each one eps_fn forward + its divergence backward passes)


@dataclass
class DriftAndDivergence:
    """f(x, t) (B, C, H, W) and an estimate of div_x f (B,)."""

    drift: Tensor
    div: Tensor


def _schedule(bound: BoundSchedule, t: Tensor, dtype: torch.dtype) -> GammaOut:
    g = bound(t)
    return GammaOut(g.gamma.to(dtype), g.dgamma_dt.to(dtype))


def _drift_coefficients(g: GammaOut) -> tuple[Tensor, Tensor]:
    """c = 1/2 sigma_t gamma'_t and sigma_t, so that f = c (eps_hat - sigma_t x)."""
    sigma_t = g.sigma2.sqrt()
    return 0.5 * sigma_t * g.dgamma_dt, sigma_t


def probability_flow_drift(x_t: Tensor, t: Tensor, eps_fn: EpsFn, bound: BoundSchedule) -> Tensor:
    """dx/dt = 1/2 sigma_t gamma'_t (eps_hat(x_t, t) - sigma_t x_t), elementwise; t (B,)."""
    c, sigma_t = _drift_coefficients(_schedule(bound, t, x_t.dtype))
    return c * (eps_fn(x_t, t) - sigma_t * x_t)


def draw_probes(
    shape: torch.Size | tuple[int, ...],
    probes: int,
    dist: ProbeDist = "rademacher",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Hutchinson probes v with E[v v^T] = I, shape (probes, *shape).

    Drawn on the generator's device (so a seed gives the same probes on CPU and GPU), then moved to ``device``.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    gen_device = generator.device if generator is not None else device
    size = (probes, *shape)
    if dist == "rademacher":
        v = torch.randint(0, 2, size, generator=generator, device=gen_device).to(dtype) * 2 - 1
    elif dist == "gaussian":
        v = torch.randn(size, generator=generator, device=gen_device, dtype=dtype)
    else:
        raise ValueError(f"probe_dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return v.to(device)


def _vjp(out: Tensor, x: Tensor, cotangent: Tensor, retain: bool) -> Tensor:
    """cotangent^T d out / d x; zero when out does not depend on x."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(out, x, cotangent, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def drift_and_divergence(
    x_t: Tensor,
    t: Tensor,
    eps_fn: EpsFn,
    bound: BoundSchedule,
    *,
    probes: Tensor | None = None,
) -> DriftAndDivergence:
    """The drift and its divergence, exactly (``probes=None``) or by Hutchinson with fixed ``probes``.

    div f = sum_i c_i d eps_hat_i / d x_i - sum_i c_i sigma_i with c = 1/2 sigma gamma'. The second (linear)
    sum is computed exactly; only the network's Jacobian trace is estimated, so Gaussian probes carry no extra
    variance from the linear part. The exact trace loops over the n = C*H*W dimensions (one backward pass each,
    batched over images): use it only for small n. ``probes``: (P, B, C, H, W); the estimate is the mean of
    v^T diag(c) J v over the P probes.

    The autograd graph is local: x_t is detached and re-marked ``requires_grad`` here, so this works inside
    ``torch.no_grad()`` and leaves no graph behind. Assumes eps_fn treats images independently (eval mode).
    """
    c, sigma_t = _drift_coefficients(_schedule(bound, t, x_t.dtype))
    c = c.expand_as(x_t)
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        eps_hat = eps_fn(x, t)
        if probes is None:
            flat_jac_diag = torch.zeros_like(x).flatten(1)
            n = flat_jac_diag.shape[1]
            for i in range(n):
                e_i = torch.zeros_like(flat_jac_diag)
                e_i[:, i] = 1.0
                row = _vjp(eps_hat, x, e_i.view_as(x), retain=i < n - 1).flatten(1)
                flat_jac_diag[:, i] = row[:, i]
            trace = (c.flatten(1) * flat_jac_diag).sum(1)
        else:
            trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for p, v in enumerate(probes):
                vjp = _vjp(eps_hat, x, c * v, retain=p < len(probes) - 1)
                trace = trace + (vjp * v).flatten(1).sum(1)
            trace = trace / len(probes)
    eps_hat = eps_hat.detach()
    drift = c * (eps_hat - sigma_t * x_t)
    div = trace - (c * sigma_t).flatten(1).sum(1)
    return DriftAndDivergence(drift, div)


@contextlib.contextmanager
def no_tf32(device: torch.device) -> Iterator[None]:
    """Full fp32 matmuls/convolutions on CUDA for the duration (TF32's 10-bit mantissa would swamp rtol=1e-5)."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 API; do not mix with the legacy flags
        saved = (matmul.fp32_precision, cudnn.fp32_precision)
        matmul.fp32_precision, cudnn.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.fp32_precision = saved
    else:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32, cudnn.allow_tf32 = False, False
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved


def _per_image_rms(batch: int) -> Callable[[Tensor], Tensor]:
    """max over images of the RMS of that image's scaled error (the norm a one-image solve would use)."""

    def norm(scaled: Tensor) -> Tensor:
        return scaled.reshape(batch, -1).pow(2).mean(1).sqrt().max()

    return norm


_ADAPTIVE = {"dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun"}  # torchdiffeq's embedded RK solvers


def _solver_options(options: dict | None, method: str, error_norm: ErrorNorm, batch: int, t_end: float) -> dict:
    """odeint options: the error norm, and a forced step end at t_end.

    torchdiffeq's adaptive solvers otherwise step past the end and interpolate back, evaluating eps_fn and the
    schedule outside [t0, t1] (where gamma may be undefined or not monotone); scipy's RK45 clips its last step
    the same way, so both solvers see the same times.
    """
    opts = dict(options or {})
    if error_norm == "per_image":
        opts.setdefault("norm", _per_image_rms(batch))
    elif error_norm != "batch":
        raise ValueError(f"error_norm must be 'per_image' or 'batch', got {error_norm!r}")
    if method in _ADAPTIVE:
        opts.setdefault("step_t", torch.tensor([t_end], dtype=torch.float64))
    return opts


def _clip(t: Tensor, t0: float, t1: float) -> Tensor:
    """Keep a stage time inside [t0, t1] against round-off at the forced last step."""
    return t.clamp(min(t0, t1), max(t0, t1))


def log_standard_normal(x: Tensor) -> Tensor:
    """log N(x; 0, I) summed over all but the batch dimension, (B,) nats."""
    n = x[0].numel()
    return -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * n * math.log(2 * math.pi)


@torch.no_grad()
def ode_log_likelihood(
    x0: Tensor,
    eps_fn: EpsFn,
    bound: BoundSchedule,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    divergence: Divergence = "hutchinson",
    probes: int = 1,
    probe_dist: ProbeDist = "rademacher",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    error_norm: ErrorNorm = "per_image",
    options: dict | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> ODEResult:
    """log p_0(x0) of the continuous x0 (B, C, H, W) under the probability-flow ODE, in nats per image.

    Integrates the augmented state (x_t, int div f dt) from t0 to t1 for the whole batch at once with
    ``torchdiffeq.odeint`` on x0's device, then ``logp = log N(x_{t1}; 0, I) + int div f dt``.

    Tolerances: the state is packed as (B, n + 1) (the image and its running log-det, as a one-image reference
    solver packs one vector). With ``error_norm="per_image"`` (default) a step is accepted only when every
    image's RMS scaled error is <= 1, i.e. each image meets rtol/atol as in a solve on its own, whatever the
    batch size (the shared steps are those of the hardest image). ``"batch"`` is torchdiffeq's default RMS over
    the whole batched state: an error in one image is diluted by ~1/sqrt(B), so the effective per-image
    tolerance loosens as the batch grows.

    Divergence: ``"exact"`` (n backward passes per evaluation; small n only) or ``"hutchinson"`` with
    ``probes`` probes of ``probe_dist``, drawn once per solve from ``generator`` and fixed within it (the
    estimate is then unbiased for logp). The solve runs in ``dtype``; TF32 is disabled on CUDA meanwhile.
    ``options`` pass through to odeint (e.g. ``step_size`` for fixed-step methods). ``callback(nfe, t)`` is
    called after each drift evaluation.
    """
    device = x0.device
    x0 = x0.to(dtype)
    batch, shape = x0.shape[0], x0.shape
    if divergence == "exact":
        v = None
    elif divergence == "hutchinson":
        v = draw_probes(shape, probes, probe_dist, generator=generator, device=device, dtype=dtype)
    else:
        raise ValueError(f"divergence must be 'hutchinson' or 'exact', got {divergence!r}")

    nfe = 0

    def func(t: Tensor, state: Tensor) -> Tensor:
        nonlocal nfe
        x_t = state[:, :-1].reshape(shape)
        out = drift_and_divergence(x_t, _clip(t, t0, t1).expand(batch), eps_fn, bound, probes=v)
        nfe += 1
        if callback is not None:
            callback(nfe, float(t))
        return torch.cat([out.drift.flatten(1), out.div[:, None]], 1)

    opts = _solver_options(options, method, error_norm, batch, t1)

    state0 = torch.cat([x0.flatten(1), x0.new_zeros(batch, 1)], 1)
    times = torch.tensor([t0, t1], dtype=dtype, device=device)
    with no_tf32(device):
        state1 = odeint(func, state0, times, rtol=rtol, atol=atol, method=method, options=opts)[-1]
    x1 = state1[:, :-1].reshape(shape)
    return ODEResult(logp=log_standard_normal(x1) + state1[:, -1], x1=x1, nfe=nfe)


@torch.no_grad()
def ode_sample(
    eps_fn: EpsFn,
    bound: BoundSchedule,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    x1: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    t0: float = 0.0,
    t1: float = 1.0,
    error_norm: ErrorNorm = "per_image",
    options: dict | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> Tensor:
    """Integrate the probability-flow ODE backwards from x_{t1} ~ N(0, I) to t0; returns continuous x_{t0}.

    ``shape`` is (B, C, H, W). Pass ``x1`` to start from given noise (then ``shape``/``device`` follow it).
    The caller decodes/quantizes the result (x_0 is approximately alpha_0 x_tilde).
    """
    if x1 is None:
        gen_device = generator.device if generator is not None else device
        x1 = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    x1 = x1.to(dtype)
    batch, shape = x1.shape[0], x1.shape
    nfe = 0

    def func(t: Tensor, x_t: Tensor) -> Tensor:
        nonlocal nfe
        drift = probability_flow_drift(x_t, _clip(t, t0, t1).expand(batch), eps_fn, bound)
        nfe += 1
        if callback is not None:
            callback(nfe, float(t))
        return drift

    opts = _solver_options(options, method, error_norm, batch, t0)
    times = torch.tensor([t1, t0], dtype=dtype, device=x1.device)
    with no_tf32(x1.device):
        return odeint(func, x1, times, rtol=rtol, atol=atol, method=method, options=opts)[-1].reshape(shape)
