"""Probability-flow ODE likelihood: closed-form Gaussian answers, divergence estimators, round trips, reference.

Gaussian data x_tilde ~ N(mu, Sigma) has the optimal eps_hat(x_t) = E[eps | x_t] = S K_t^{-1} (x_t - A mu) with
A = diag(alpha_t), S = diag(sigma_t), K_t = A Sigma A + S^2. The drift is then affine in x, so the flow maps
N(A_0 mu, K_0) onto N(A_1 mu, K_1). When every K_t is diagonal in one fixed basis (diagonal Sigma, or a scalar
schedule), the flow scales each eigen-direction by sqrt(lambda_1 / lambda_0), so the *model* density (N(0, I) at
t = 1 pulled back, not the true marginal) is exactly

    log p_0(x_0) = log N(x_1; 0, I) + 1/2 sum_j log(lambda_1,j / lambda_0,j),
    x_1 = A_1 mu + U diag(sqrt(lambda_1 / lambda_0)) U^T (x_0 - A_0 mu).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from mulan.likelihood.ode import (
    draw_probes,
    drift_and_divergence,
    no_tf32,
    ode_log_likelihood,
    ode_sample,
    probability_flow_drift,
)
from mulan.likelihood.reference import reference_log_likelihood
from mulan.likelihood.stats import mean_ci
from mulan.schedules.base import GammaOut

F64 = torch.float64
SHAPE = (1, 2, 2)  # (C, H, W), n = 4


def linear_bound(g0: torch.Tensor, g1: torch.Tensor, power: torch.Tensor | None = None):
    """gamma = g0 + (g1 - g0) t^p per pixel (p = 1 when None); g0, g1, p broadcastable to (1, C, H, W)."""
    p = torch.ones_like(g0) if power is None else power

    def bound(t: torch.Tensor) -> GammaOut:
        t = t.to(F64).reshape(-1, 1, 1, 1)
        gamma = g0 + (g1 - g0) * t**p
        dgamma = (g1 - g0) * p * t ** (p - 1)
        return GammaOut(gamma, dgamma.expand_as(gamma))

    return bound


def gaussian_eps_fn(mu: torch.Tensor, cov: torch.Tensor, bound):
    """The optimal eps_hat for x_tilde ~ N(mu, cov); mu (C, H, W), cov (n, n)."""
    n = mu.numel()

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = bound(t)
        a = g.alpha2.sqrt().expand_as(x_t).flatten(1)  # (B, n)
        s = g.sigma2.sqrt().expand_as(x_t).flatten(1)
        k = a[:, :, None] * cov * a[:, None, :] + torch.diag_embed(s**2)
        r = (x_t.flatten(1) - a * mu.flatten()).unsqueeze(-1)
        return (s * torch.linalg.solve(k, r).squeeze(-1)).reshape(x_t.shape)

    assert cov.shape == (n, n)
    return eps_fn


def gaussian_model_logp(x0, mu, cov, bound):
    """Closed-form model log-density (module docstring); needs all K_t diagonal in cov's eigenbasis."""
    b = x0.shape[0]
    lam, u = torch.linalg.eigh(cov)
    g0, g1 = bound(torch.zeros(b, dtype=F64)), bound(torch.ones(b, dtype=F64))

    def per_dim(g):  # alpha, sigma^2 as (n,) (constant over the batch here)
        return g.alpha2.sqrt().expand(b, *x0.shape[1:])[0].flatten(), g.sigma2.expand(b, *x0.shape[1:])[0].flatten()

    (a0, s0), (a1, s1) = per_dim(g0), per_dim(g1)
    if cov.count_nonzero() > cov.diagonal().count_nonzero():  # correlated: scalar schedule only
        assert torch.allclose(a0, a0[0]) and torch.allclose(a1, a1[0])
        lam0, lam1 = a0[0] ** 2 * lam + s0[0], a1[0] ** 2 * lam + s1[0]
    else:
        u = torch.eye(len(lam), dtype=F64)
        lam = cov.diagonal()
        lam0, lam1 = a0**2 * lam + s0, a1**2 * lam + s1
    m = mu.flatten()
    x1 = a1 * m + ((x0.flatten(1) - a0 * m) @ u) * (lam1 / lam0).sqrt() @ u.T
    n = m.numel()
    logp = -0.5 * x1.pow(2).sum(1) - 0.5 * n * math.log(2 * math.pi) + 0.5 * torch.log(lam1 / lam0).sum()
    return logp, x1.reshape(x0.shape)


def sample_x0(mu, cov, bound, batch, gen):
    """x_0 = alpha_0 x_tilde + sigma_0 eps with x_tilde ~ N(mu, cov)."""
    n = mu.numel()
    x_tilde = mu.flatten() + torch.randn(batch, n, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T
    g = bound(torch.zeros(batch, dtype=F64))
    x_tilde = x_tilde.reshape(batch, *mu.shape)
    return g.alpha2.sqrt() * x_tilde + g.sigma2.sqrt() * torch.randn(x_tilde.shape, generator=gen, dtype=F64)


def mixing_eps_fn(seed: int = 0, n: int = 4, scale: float = 0.8):
    """A smooth nonlinear eps_hat with a dense Jacobian: tanh(W x + b t) per image."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=F64) * scale / math.sqrt(n)
    bias = torch.randn(n, generator=g, dtype=F64)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x_t.flatten(1) @ w.T.to(x_t.dtype) + t[:, None] * bias.to(x_t.dtype)
        return torch.tanh(h).reshape(x_t.shape) + 0.3 * x_t

    return eps_fn


@pytest.fixture
def per_pixel():
    """Per-pixel schedule: different end points and shapes per pixel (diagonal Gaussian data)."""
    g = torch.Generator().manual_seed(1)
    g0 = -13.3 - torch.rand(1, *SHAPE, generator=g, dtype=F64)
    g1 = 5.0 + torch.rand(1, *SHAPE, generator=g, dtype=F64)
    power = 1.0 + 1.5 * torch.rand(1, *SHAPE, generator=g, dtype=F64)
    mu = 0.5 * torch.randn(SHAPE, generator=g, dtype=F64)
    var = (0.2 + torch.rand(4, generator=g, dtype=F64)) ** 2
    return linear_bound(g0, g1, power), mu, torch.diag(var)


@pytest.fixture
def scalar_correlated():
    """Scalar (VDM linear) schedule with correlated Gaussian data."""
    g = torch.Generator().manual_seed(2)
    bound = linear_bound(torch.tensor(-13.3, dtype=F64), torch.tensor(5.0, dtype=F64))
    mu = 0.5 * torch.randn(SHAPE, generator=g, dtype=F64)
    l = torch.randn(4, 4, generator=g, dtype=F64) * 0.4
    return bound, mu, l @ l.T + 0.05 * torch.eye(4, dtype=F64)


@pytest.mark.parametrize("case", ["per_pixel", "scalar_correlated"])
def test_gaussian_ode_logp_matches_closed_form(case, request):
    bound, mu, cov = request.getfixturevalue(case)
    x0 = sample_x0(mu, cov, bound, 6, torch.Generator().manual_seed(3))
    expected, x1 = gaussian_model_logp(x0, mu, cov, bound)
    eps_fn = gaussian_eps_fn(mu, cov, bound)
    # rtol = atol = 1e-5 bounds the local (per step) error; the global logp error observed here is <= 2e-4
    # nats (up to 1e-3 for an image 3 std out), hence 2e-3
    res = ode_log_likelihood(x0, eps_fn, bound, divergence="exact", dtype=F64)
    assert res.nfe > 0
    torch.testing.assert_close(res.logp, expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(res.x1, x1, atol=2e-3, rtol=0)
    # and it converges: at tight tolerance only round-off remains
    tight = ode_log_likelihood(x0, eps_fn, bound, divergence="exact", dtype=F64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tight.logp, expected, atol=1e-6, rtol=0)


def test_exact_divergence_is_jacobian_trace(per_pixel):
    bound = per_pixel[0]
    eps_fn = mixing_eps_fn()
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    out = drift_and_divergence(x, t, eps_fn, bound)
    torch.testing.assert_close(out.drift, probability_flow_drift(x, t, eps_fn, bound))
    for b in range(3):
        f = lambda xb: probability_flow_drift(xb[None], t[b : b + 1], eps_fn, bound)[0].flatten()
        jac = torch.autograd.functional.jacobian(f, x[b]).reshape(4, 4)
        torch.testing.assert_close(out.div[b], jac.trace())


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_trace(per_pixel, dist):
    bound = per_pixel[0]
    eps_fn = mixing_eps_fn()
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64)
    t = torch.tensor([0.7], dtype=F64)
    exact = drift_and_divergence(x, t, eps_fn, bound).div
    # one probe per replicate of the image: 20000 independent single-probe estimates in one call
    reps = 20000
    v = draw_probes((reps, *SHAPE), 1, dist, generator=torch.Generator().manual_seed(6), dtype=F64)
    est = drift_and_divergence(x.expand(reps, *SHAPE), t.expand(reps), eps_fn, bound, probes=v).div
    assert est.std() > 1e-3  # a real estimator (dense Jacobian), not the exact trace in disguise
    mean, half = mean_ci(est, level=0.999)
    assert abs(mean - exact.item()) < half, (mean, half, exact.item())
    # averaging P probes in one call is the mean of the single-probe estimates
    multi = drift_and_divergence(x, t, eps_fn, bound, probes=v[0, :50].unsqueeze(1)).div
    torch.testing.assert_close(multi, est[:50].mean().reshape(1))


def test_probes_are_fixed_within_a_solve():
    """Linear eps_hat = M x, scalar schedule: with a fixed probe v the estimate is known in closed form,
    log N(x_1) + (v^T M v) int c dt - n int c sigma dt, c = sigma gamma' / 2; redrawn probes would average it."""
    g0, g1 = -6.0, 4.0
    bound = linear_bound(torch.tensor(g0, dtype=F64), torch.tensor(g1, dtype=F64))
    m = torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    eps_fn = lambda x, t: (x.flatten(1) @ m.T).reshape(x.shape)
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(8), dtype=F64)
    res = ode_log_likelihood(x0, eps_fn, bound, probes=1, dtype=F64, generator=torch.Generator().manual_seed(9),
                             rtol=1e-9, atol=1e-9)
    v = draw_probes(x0.shape, 1, generator=torch.Generator().manual_seed(9), dtype=F64)[0].flatten(1)
    sig = lambda g: 1.0 / (1.0 + math.exp(-g))
    int_c = quad(lambda g: 0.5 * math.sqrt(sig(g)), g0, g1)[0]  # int c dt = int sigma/2 dgamma
    int_c_sigma = 0.5 * (math.log1p(math.exp(g1)) - math.log1p(math.exp(g0)))  # int sigma^2/2 dgamma
    vmv = ((v @ m.T) * v).sum(1)
    log_n = -0.5 * res.x1.flatten(1).pow(2).sum(1) - 2 * math.log(2 * math.pi)
    torch.testing.assert_close(res.logp, log_n + vmv * int_c - 4 * int_c_sigma, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_ode_logp_agrees_with_exact(per_pixel, dist):
    bound = per_pixel[0]
    eps_fn = mixing_eps_fn()
    x0 = 0.5 * torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(10), dtype=F64)
    exact = ode_log_likelihood(x0, eps_fn, bound, divergence="exact", dtype=F64).logp
    # 200 copies of the image in one batch: each copy gets its own probe, i.e. 200 independent estimates
    reps = x0.expand(200, *SHAPE)
    gen = torch.Generator().manual_seed(11)
    est = ode_log_likelihood(reps, eps_fn, bound, probe_dist=dist, dtype=F64, generator=gen).logp
    assert est.std() > 1e-3
    mean, half = mean_ci(est, level=0.999)
    assert abs(mean - exact.item()) < half + 1e-3, (mean, half, exact.item())


def test_sample_then_likelihood_round_trip(per_pixel):
    bound = per_pixel[0]
    eps_fn = mixing_eps_fn(seed=3)
    x1 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(12), dtype=F64)
    x0 = ode_sample(eps_fn, bound, x1.shape, x1=x1, dtype=F64, rtol=1e-8, atol=1e-8)
    assert not torch.allclose(x0, x1, atol=0.1)
    back = ode_log_likelihood(x0, eps_fn, bound, divergence="exact", dtype=F64, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back.x1, x1, atol=1e-5, rtol=0)
    # sampling draws its noise from the generator, reproducibly
    a = ode_sample(eps_fn, bound, (2, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=F64)
    b = ode_sample(eps_fn, bound, (2, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(a, b)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_reference_solver_agrees(per_pixel, divergence):
    bound = per_pixel[0]
    eps_fn = mixing_eps_fn(seed=4)
    x0 = 0.5 * torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(13), dtype=F64)
    kw = dict(divergence=divergence, probes=2, probe_dist="gaussian", dtype=F64, rtol=1e-8, atol=1e-8)
    ours = ode_log_likelihood(x0, eps_fn, bound, generator=torch.Generator().manual_seed(14), **kw)
    ref = reference_log_likelihood(x0, eps_fn, bound, generator=torch.Generator().manual_seed(14), **kw)
    torch.testing.assert_close(ours.logp, ref.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.x1, ref.x1, atol=1e-5, rtol=0)
    assert len(ref.nfe) == 3 and min(ref.nfe) > 0


def test_reference_solver_matches_the_closed_form(per_pixel):
    """The reference on its own (no code of ode.py) against the Gaussian model's closed-form density."""
    bound, mu, cov = per_pixel
    x0 = sample_x0(mu, cov, bound, 2, torch.Generator().manual_seed(15))
    expected, x1 = gaussian_model_logp(x0, mu, cov, bound)
    ref = reference_log_likelihood(x0, gaussian_eps_fn(mu, cov, bound), bound, divergence="exact", dtype=F64,
                                   rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ref.logp, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.x1, x1, atol=1e-5, rtol=0)


def test_per_image_error_norm_makes_batch_mates_irrelevant(per_pixel):
    """With the per-image norm, a hard image solved among easy ones takes exactly the steps it takes alone
    (the easy ones, at the mean trajectory, have ~zero error); the whole-batch RMS norm would dilute its error
    by ~1/sqrt(B) and change its result (by ~5e-4 nats here)."""
    bound, mu, cov = per_pixel
    eps_fn = gaussian_eps_fn(mu, cov, bound)
    alpha_0 = bound(torch.zeros(1, dtype=F64)).alpha2.sqrt()
    hard = alpha_0 * (mu + 3 * cov.diagonal().sqrt().reshape(SHAPE))
    x0 = torch.cat([hard, (alpha_0 * mu).expand(15, *SHAPE)])
    kw = dict(divergence="exact", dtype=F64, rtol=1e-4, atol=1e-4)
    alone = ode_log_likelihood(x0[:1], eps_fn, bound, **kw)
    batched = ode_log_likelihood(x0, eps_fn, bound, **kw)
    assert batched.nfe == alone.nfe
    torch.testing.assert_close(batched.logp[:1], alone.logp, atol=1e-10, rtol=0)
    expected, _ = gaussian_model_logp(x0, mu, cov, bound)
    torch.testing.assert_close(batched.logp, expected, atol=2e-2, rtol=0)  # loose tolerance, loose answer


def test_callback_counts_evaluations_and_bad_arguments():
    bound = linear_bound(torch.tensor(-6.0, dtype=F64), torch.tensor(4.0, dtype=F64))
    eps_fn = mixing_eps_fn()
    x0 = torch.zeros(1, *SHAPE, dtype=F64)
    seen = []
    res = ode_log_likelihood(x0, eps_fn, bound, dtype=F64, callback=lambda nfe, t: seen.append((nfe, t)))
    assert [s[0] for s in seen] == list(range(1, res.nfe + 1))
    assert all(0.0 <= t <= 1.0 for _, t in seen)
    for bad in (dict(divergence="trace"), dict(probe_dist="uniform"), dict(error_norm="max"), dict(probes=0)):
        with pytest.raises(ValueError):
            ode_log_likelihood(x0, eps_fn, bound, **bad)


def test_no_tf32_restores_settings():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("legacy TF32 flags only")
    before = (matmul.fp32_precision, torch.backends.cudnn.fp32_precision)
    with no_tf32(torch.device("cuda")):
        assert matmul.fp32_precision == "ieee" and torch.backends.cudnn.fp32_precision == "ieee"
    assert (matmul.fp32_precision, torch.backends.cudnn.fp32_precision) == before


def quadratic_control_variate(y, x_t, t, bound, cov):
    """The part of the diffusion term's sample 1/2 sum gamma' (eps - eps_hat)^2 that is quadratic in eps, minus its
    mean given t. With the optimal denoiser eps - eps_hat = M eps + b, M = I - S K^-1 S (module docstring), so
    this is 1/2 (eps^T M^T G M eps - tr(M^T G M)), G = diag(gamma'): zero mean for any t (eps ~ N(0, I) is drawn
    independently of t), so subtracting it leaves the ELBO estimate unbiased and removes most of its variance.
    eps is read back from the x_t the estimator gave the denoiser."""
    g = bound(t)
    a, s = g.alpha2.sqrt().expand_as(y).flatten(1), g.sigma2.sqrt().expand_as(y).flatten(1)
    slope = g.dgamma_dt.expand_as(y).flatten(1)
    eps = (x_t.flatten(1) - a * y.flatten(1)) / s
    k = a[:, :, None] * cov * a[:, None, :] + torch.diag_embed(s**2)
    m = torch.eye(len(cov), dtype=F64) - s[:, :, None] * torch.linalg.solve(k, torch.diag_embed(s))
    m_eps = (m @ eps.unsqueeze(-1)).squeeze(-1)
    return 0.5 * ((slope * m_eps**2).sum(1) - torch.einsum("bji,bj,bji->b", m, slope, m))


@pytest.mark.parametrize("case", ["per_pixel", "scalar_correlated"])
def test_gaussian_elbo_bounds_the_ode_nll_and_both_match_the_data_density(case, request):
    """Continuous Gaussian data x_tilde ~ N(mu, Sigma) with its optimal denoiser: the ELBO (Gaussian decoder) is
    >= the ODE NLL of x_tilde (x_0 ~ q(x_0 | x_tilde), -log p_0(x_0) - sum log alpha_0), and with the exact
    denoiser both are tight: the ODE NLL within 0.01 nats of the analytic -log N(x_tilde; mu, Sigma) on
    average, the ELBO within its Monte-Carlo interval + 0.05 nats.

    The ELBO is estimated with R = 8192 stratified times per image and a zero-mean control variate, so the 99%
    interval of the mean gap over 32 images is < 0.06 nats wide (half-width): an ELBO that fell 0.1 nats below the
    NLL could not pass (with plain sampling the interval was +-0.2 nats)."""
    from mulan.likelihood.elbo import negative_elbo

    bound, mu, cov = request.getfixturevalue(case)
    gen = torch.Generator().manual_seed(7)
    num, n, R = 32, mu.numel(), 8192
    y = (mu.flatten() + torch.randn(num, n, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T).reshape(num, *SHAPE)
    seen = {}

    def eps_fn(x_t, t):
        seen["x_t"] = x_t
        return gaussian_eps_fn(mu, cov, bound)(x_t, t)

    u = torch.rand(num, generator=gen, dtype=F64)
    t = torch.remainder(u.repeat_interleave(R) + torch.arange(R, dtype=F64).repeat(num) / R, 1.0)  # stratified
    copies = y.repeat_interleave(R, 0)
    samples = negative_elbo(copies, eps_fn, bound, t, generator=gen).total
    elbo = (samples - quadratic_control_variate(copies, seen["x_t"], t, bound, cov)).reshape(num, R).mean(1)
    g0 = bound(torch.zeros(num, dtype=F64))
    x0 = g0.alpha2.sqrt() * y + g0.sigma2.sqrt() * torch.randn(y.shape, generator=gen, dtype=F64)
    ode = ode_log_likelihood(x0, gaussian_eps_fn(mu, cov, bound), bound, divergence="exact", dtype=F64)
    nll = -ode.logp - 0.5 * torch.log(g0.alpha2).expand_as(y).flatten(1).sum(1)
    true = -torch.distributions.MultivariateNormal(mu.flatten(), cov).log_prob(y.flatten(1))
    gap, half = mean_ci(elbo - nll, level=0.99)
    assert half < 0.06, half  # the interval is narrow enough to see a 0.1-nat bias
    assert gap + half >= 0, (gap, half)  # ELBO >= NLL, within the 99% interval of the mean over images
    err, err_half = mean_ci(nll - true)  # the ODE is deterministic given x_0: tight per image
    assert abs(err) < 0.01 and err_half < 0.05, (err, err_half)
    err, err_half = mean_ci(elbo - true)  # the ELBO carries its Monte-Carlo noise over t and eps
    assert abs(err) < err_half + 0.05 and err_half < 0.05, (err, err_half)
