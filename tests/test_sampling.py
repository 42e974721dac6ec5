"""Fixed-step samplers for per-pixel schedules: known answers on Gaussian data, convergence orders, properties.

Gaussian data x_tilde ~ N(mu, Sigma) has the optimal eps_hat in closed form (``test_ode.gaussian_eps_fn``). Two
independent sides:

* the marginal at t = 1, N(A_1 mu, K_1), must be carried to the marginal at t = 0, N(A_0 mu, K_0)
  (A = diag(alpha_t), K_t = A Sigma A + diag(sigma_t^2)), so the samples' mean and covariance must match it
  within their Monte-Carlo error, for every sampler, scalar and per-pixel schedules;
* the deterministic samplers must converge to the probability-flow ODE's solution, here from scipy's DOP853 at
  rtol = atol = 1e-12 (not from this package), at the order each one claims: the error halves (first order,
  DDIM) or quarters (second order, dpm2m) when the number of steps doubles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from conftest import model_that_matters
from mulan.sampling import SAMPLERS, sample, solvers
from mulan.sampling.grids import time_grid
from mulan.schedules.base import GammaOut
from test_ode import gaussian_eps_fn, linear_bound

F64 = torch.float64
SHAPE = (1, 2, 2)
N_DIM = 4


def _problem():
    """mu (C, H, W), a correlated Sigma (n, n), and a scalar and a random per-pixel schedule."""
    gen = torch.Generator().manual_seed(0)
    mu = (0.5 * torch.randn(N_DIM, generator=gen, dtype=F64)).reshape(SHAPE)
    a = 0.4 * torch.randn(N_DIM, N_DIM, generator=gen, dtype=F64)
    cov = a @ a.T + 0.05 * torch.eye(N_DIM, dtype=F64)
    col = (1, 1, 1, 1)
    scalar = linear_bound(torch.full(col, -13.3, dtype=F64), torch.full(col, 5.0, dtype=F64))
    pix = (1, *SHAPE)
    per_pixel = linear_bound(-13.3 + 3 * torch.rand(pix, generator=gen, dtype=F64),
                             3 + 3 * torch.rand(pix, generator=gen, dtype=F64),
                             1 + torch.rand(pix, generator=gen, dtype=F64))
    return mu, cov, {"scalar": scalar, "per_pixel": per_pixel}


MU, COV, BOUNDS = _problem()


def marginal(bound, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean A_t mu (n,) and covariance K_t (n, n) of x_t = alpha_t x_tilde + sigma_t eps."""
    g = bound(torch.full((1,), t, dtype=F64))
    a = g.alpha2.sqrt().expand(1, *SHAPE).flatten()
    s2 = g.sigma2.expand(1, *SHAPE).flatten()
    return a * MU.flatten(), a[:, None] * COV * a[None, :] + torch.diag(s2)


def exact_flow(bound, eps_fn, x1: torch.Tensor) -> torch.Tensor:
    """x_0 of the probability-flow ODE dx/dt = 1/2 sigma gamma' (eps_hat - sigma x) from x1, by scipy (DOP853)."""
    batch = x1.shape[0]

    def drift(t, y):
        x = torch.from_numpy(y).reshape(x1.shape)
        tt = torch.full((batch,), t, dtype=F64)
        g = bound(tt)
        sigma = g.sigma2.sqrt()
        return (0.5 * sigma * g.dgamma_dt * (eps_fn(x, tt) - sigma * x)).flatten().numpy()

    sol = solve_ivp(drift, (1.0, 0.0), x1.flatten().numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).reshape(x1.shape)


# sampler, options, steps: enough steps that the discretisation bias is below the Monte-Carlo error of 4000 samples
MOMENT_CASES = [("ancestral", {}, 500), ("ddim", {"eta": 0.0}, 200), ("ddim", {"eta": 0.5}, 400), ("dpm2m", {}, 50),
                ("dpm2m", {"eta": 1.0}, 100)]


@pytest.mark.parametrize("schedule", ["scalar", "per_pixel"])
@pytest.mark.parametrize("name,options,steps", MOMENT_CASES, ids=[f"{c[0]}{c[1].get('eta', '')}" for c in MOMENT_CASES])
def test_samplers_carry_the_gaussian_marginal_at_1_to_the_one_at_0(schedule, name, options, steps):
    bound = BOUNDS[schedule]
    eps_fn = gaussian_eps_fn(MU, COV, bound)
    m0, k0 = marginal(bound, 0.0)
    m1, k1 = marginal(bound, 1.0)
    num = 4000
    gen = torch.Generator().manual_seed(1)
    x1 = (m1 + torch.randn(num, N_DIM, generator=gen, dtype=F64) @ torch.linalg.cholesky(k1).T).reshape(num, *SHAPE)
    times = time_grid(bound, steps, num, "logsnr", dtype=F64)
    x0 = getattr(solvers, name)(eps_fn, bound, x1, times, generator=gen, **options)
    x0 = x0.flatten(1)
    var = k0.diagonal()
    z_mean = (x0.mean(0) - m0).abs() / (var / num).sqrt()
    z_cov = (torch.cov(x0.T) - k0).abs() / ((var[:, None] * var[None, :] + k0**2) / num).sqrt()
    assert z_mean.max() < 4.5 and z_cov.max() < 4.5, (z_mean.max().item(), z_cov.max().item())


@pytest.mark.parametrize("schedule", ["scalar", "per_pixel"])
@pytest.mark.parametrize("grid", ["t", "logsnr"])
@pytest.mark.parametrize("name,order", [("ddim", 1), ("dpm2m", 2)])
def test_deterministic_samplers_converge_to_the_exact_flow_at_their_order(schedule, grid, name, order):
    bound = BOUNDS[schedule]
    eps_fn = gaussian_eps_fn(MU, COV, bound)
    x1 = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    reference = exact_flow(bound, eps_fn, x1)
    errors = []
    for steps in (64, 128, 256):
        x0 = getattr(solvers, name)(eps_fn, bound, x1, time_grid(bound, steps, 8, grid, dtype=F64))
        errors.append((x0 - reference).abs().max().item())
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all(np.abs(np.log2(ratios) - order) < 0.25), (errors, ratios)
    assert errors[-1] < (0.03 if order == 1 else 5e-4)


def test_ddim_with_eta_one_is_the_ancestral_step():
    """Two formulas of one distribution (SPEC): DDIM(eta = 1) and the ancestral step, with the same noise."""
    bound = BOUNDS["per_pixel"]
    eps_fn = gaussian_eps_fn(MU, COV, bound)
    x1 = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    times = time_grid(bound, 25, 16, "logsnr", dtype=F64)
    a = solvers.ancestral(eps_fn, bound, x1, times, generator=torch.Generator().manual_seed(4))
    b = solvers.ddim(eps_fn, bound, x1, times, eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_the_first_step_of_stochastic_dpm2m_is_the_ancestral_step():
    """With eta = 1 and no previous prediction (D = x0_hat) the SDE step's mean and variance are the posterior's."""
    bound = BOUNDS["per_pixel"]
    eps_fn = gaussian_eps_fn(MU, COV, bound)
    x1 = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    times = torch.stack([torch.ones(16, dtype=F64), torch.full((16,), 0.6, dtype=F64)])  # one step, from t = 1 to t = 0.6
    a = solvers.ancestral(eps_fn, bound, x1, times, generator=torch.Generator().manual_seed(4))
    b = solvers.dpm2m(eps_fn, bound, x1, times, eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    c = solvers.dpm2m(eps_fn, bound, x1, times, eta=0.5, generator=torch.Generator().manual_seed(4))
    assert (a - c).abs().max() > 1e-3  # eta sets the noise: a half-stochastic step is another step


@pytest.mark.parametrize("name", ["ddim", "dpm2m"])
def test_a_scalar_schedule_is_the_per_pixel_code_with_equal_pixels(name):
    """gamma (B, 1, 1, 1) and the same gamma expanded to every pixel (B, C, H, W) give the same samples."""
    scalar = BOUNDS["scalar"]

    def expanded(t):
        g = scalar(t)
        return GammaOut(g.gamma.expand(-1, *SHAPE).clone(), g.dgamma_dt.expand(-1, *SHAPE).clone())

    eps_fn = gaussian_eps_fn(MU, COV, scalar)
    x1 = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64)
    times = time_grid(scalar, 10, 8, "t", dtype=F64)
    torch.testing.assert_close(getattr(solvers, name)(eps_fn, scalar, x1, times),
                               getattr(solvers, name)(eps_fn, expanded, x1, times), rtol=1e-12, atol=1e-12)


def test_grids_run_from_one_to_zero_and_the_logsnr_grid_has_equal_pixel_mean_steps():
    bound = BOUNDS["per_pixel"]
    for grid in ("t", "logsnr"):
        t = time_grid(bound, 12, 3, grid, dtype=F64)
        assert t.shape == (13, 3) and torch.all(t[0] == 1) and torch.all(t[-1] == 0)
        assert torch.all(t[1:] < t[:-1])
    t = time_grid(bound, 12, 3, "logsnr", dtype=F64)
    mean_gamma = torch.stack([bound(row).gamma.flatten(1).mean(1) for row in t])  # (13, 3)
    steps = mean_gamma[:-1] - mean_gamma[1:]
    torch.testing.assert_close(steps, steps.mean(0).expand_as(steps), rtol=2e-3, atol=0)
    linear = BOUNDS["scalar"]  # gamma linear in t: the logsnr grid is the t grid
    torch.testing.assert_close(time_grid(linear, 9, 2, "logsnr", dtype=F64), time_grid(linear, 9, 2, "t", dtype=F64))


@pytest.mark.parametrize("preset,prediction", [("digits-mulan", "eps"), ("digits-vdm", "v")])
def test_every_sampler_draws_valid_reproducible_images_from_a_model(preset, prediction):
    model = model_that_matters(preset, f"model.prediction={prediction}")
    for name, options in [*((n, {"steps": 4}) for n in SAMPLERS if n != "ode"), ("dpm2m", {"steps": 4, "eta": 1.0}),
                          ("ode", {"rtol": 1e-3, "atol": 1e-3})]:
        a = sample(model, 3, sampler=name, generator=torch.Generator().manual_seed(0), **options)
        b = sample(model, 3, sampler=name, generator=torch.Generator().manual_seed(0), **options)
        assert a.shape == (3, *model.shape) and a.min() >= 0 and a.max() < model.num_values
        assert torch.equal(a, b), name


def test_a_fixed_z_is_used_and_the_prior_draw_differs_per_sample():
    """MuLAN: z from the prior per sample by default; the same z for every sample when given (and it matters)."""
    model = model_that_matters("digits-mulan", scale=0.3)
    z = model.latent.sample_prior(1, generator=torch.Generator().manual_seed(7)).expand(4, -1)
    runs = [sample(model, 4, sampler="dpm2m", steps=5, z=zz, generator=torch.Generator().manual_seed(0))
            for zz in (z, z.roll(1, dims=1))]
    assert not torch.equal(runs[0], runs[1])
    cond = model.condition(z=None, batch=64, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in cond.z}) > 1
