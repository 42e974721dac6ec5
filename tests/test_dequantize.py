"""Dequantization bounds on a toy model whose continuous density p_0 is a factorised Gaussian, so the true
P(x) = prod_i [Phi(hi_i) - Phi(lo_i)] over the bins alpha_0,i [x_tilde_i -+ 1/V] is known, and each bound's
expectation E_q[log p_0 - log q] is a 1-D integral per pixel (scipy quad)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import quad

from mulan.likelihood.dequantize import dequantize, dequantized_nll, encode
from mulan.likelihood.ode import ode_log_likelihood
from mulan.likelihood.stats import mean_ci
from mulan.schedules.base import GammaOut

F64 = torch.float64
SHAPE = (1, 2, 2)
V = 4
TAU = 3.0


def constant_bound(gamma_0: torch.Tensor):
    """gamma(t) = gamma_0 per pixel (only t = 0 matters to dequantization)."""

    def bound(t: torch.Tensor) -> GammaOut:
        gamma = gamma_0.expand(t.shape[0], *gamma_0.shape[1:])
        return GammaOut(gamma, torch.zeros_like(gamma))

    return bound


class Toy:
    """p_0 = N(m, s^2) per pixel in x_0-space, a schedule's gamma_0, and one image x."""

    def __init__(self, kind: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        if kind == "truncnorm":  # tau sigma_0 <= alpha_0 / V needs gamma_0 <= 2 log(1/12) = -4.97
            self.gamma_0 = -7.0 + 1.8 * torch.rand(1, *SHAPE, generator=g, dtype=F64)
        else:  # alpha_0 well below 1, so a missing log alpha_0 Jacobian would show
            self.gamma_0 = -1.0 + 1.5 * torch.rand(1, *SHAPE, generator=g, dtype=F64)
        self.alpha_0 = torch.sigmoid(-self.gamma_0).sqrt()
        self.sigma_0 = torch.sigmoid(self.gamma_0).sqrt()
        self.m = torch.rand(1, *SHAPE, generator=g, dtype=F64) * 1.6 - 0.8
        self.s = 0.15 + 0.3 * torch.rand(1, *SHAPE, generator=g, dtype=F64)
        self.x = torch.randint(0, V, (1, *SHAPE), generator=g).to(torch.uint8)
        self.bound = constant_bound(self.gamma_0)

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(self.m, self.s).log_prob(y.to(F64)).flatten(1).sum(1)

    def pixels(self):
        xt = encode(self.x, V).flatten().tolist()
        cols = (self.alpha_0, self.sigma_0, self.m, self.s)
        return [(xt[i], *(float(c.flatten()[i]) for c in cols)) for i in range(len(xt))]

    def true_log_p(self) -> float:
        return sum(log_bin_mass(xt, V, a, m, s) for xt, a, _, m, s in self.pixels())

    def expected_bound(self, kind: str) -> float:
        return sum(expected_bound_1d(kind, xt, V, a, sig, m, s) for xt, a, sig, m, s in self.pixels())


def log_bin_mass(xt: float, v: int, a: float, m: float, s: float) -> float:
    """log of N(m, s^2)'s mass on the bin a [xt - 1/v, xt + 1/v]."""
    return math.log(stats.norm.cdf((a * (xt + 1 / v) - m) / s) - stats.norm.cdf((a * (xt - 1 / v) - m) / s))


def expected_bound_1d(kind: str, xt: float, v: int, a: float, sig: float, m: float, s: float) -> float:
    """E_q[log N(y; m, s^2) - log q(y|x)] for one pixel, by quadrature over q's support."""
    if kind == "uniform":
        lo, hi = a * (xt - 1 / v), a * (xt + 1 / v)
        log_q = -math.log(hi - lo)
        f = lambda y: math.exp(log_q) * (stats.norm.logpdf(y, m, s) - log_q)
    else:
        lo, hi = a * xt - TAU * sig, a * xt + TAU * sig
        q = stats.truncnorm(-TAU, TAU, loc=a * xt, scale=sig)
        f = lambda y: q.pdf(y) * (stats.norm.logpdf(y, m, s) - q.logpdf(y))
    return quad(f, lo, hi, epsabs=1e-12, epsrel=1e-10, points=[a * xt])[0]


KINDS = ["uniform", "truncnorm"]


@pytest.mark.parametrize("kind", KINDS)
def test_samples_stay_in_the_bin_and_log_q_is_the_density(kind):
    toy = Toy(kind)
    reps = 500
    x = toy.x.expand(reps, *SHAPE)
    d = dequantize(x, V, toy.bound, kind=kind, generator=torch.Generator().manual_seed(0))
    xt = encode(x, V)
    assert ((d.y >= toy.alpha_0 * (xt - 1 / V)) & (d.y <= toy.alpha_0 * (xt + 1 / V))).all()
    loc = (toy.alpha_0 * xt).numpy()
    if kind == "uniform":
        width = (2 * toy.alpha_0 / V).expand_as(xt).numpy()
        ref = stats.uniform.logpdf(d.y.numpy(), loc - width / 2, width)
    else:
        scale = toy.sigma_0.expand_as(xt).numpy()
        ref = stats.truncnorm.logpdf(d.y.numpy(), -TAU, TAU, loc=loc, scale=scale)
    np.testing.assert_allclose(d.log_q.numpy(), ref.reshape(reps, -1).sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_single_sample_bound_matches_quadrature_and_is_below_log_p(kind):
    toy = Toy(kind)
    expected, true = toy.expected_bound(kind), toy.true_log_p()
    assert expected < true - 0.01  # a real gap in this toy: the test could see a bound that is too high
    reps = 20000
    nll = dequantized_nll(toy.x.expand(reps, *SHAPE), V, toy.log_density, toy.bound, kind=kind,
                          samples=1, generator=torch.Generator().manual_seed(1), dtype=F64)
    mean, half = mean_ci(-nll, level=0.999)
    assert abs(mean - expected) < half, (mean, half, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_importance_weighting_tightens_towards_log_p(kind):
    toy = Toy(kind)
    true = toy.true_log_p()
    means = []
    for k in (1, 4, 16):
        nll = dequantized_nll(toy.x.expand(3000, *SHAPE), V, toy.log_density, toy.bound, kind=kind,
                              samples=k, generator=torch.Generator().manual_seed(k), dtype=F64)
        means.append(mean_ci(-nll, level=0.999))
    (m1, h1), (m4, h4), (m16, h16) = means
    assert m1 <= m4 + h1 + h4 and m4 <= m16 + h4 + h16
    assert m16 <= true + h16
    assert m16 - m1 > 3 * (h1 + h16)  # strictly tighter, not just equal
    if kind == "uniform":
        # q covers the whole bin, so as K grows the estimate converges to log P(x) itself (this checks every
        # offset in -log q). Truncated-normal q covers only alpha_0 x_tilde +- tau sigma_0, so its limit is the
        # mass of that sub-interval, and its weights are too heavy-tailed here to show convergence cheaply.
        nll = dequantized_nll(toy.x.expand(256, *SHAPE), V, toy.log_density, toy.bound, kind=kind, samples=256,
                              generator=torch.Generator().manual_seed(99), dtype=F64)
        mean, half = mean_ci(-nll, level=0.999)
        assert true - 0.02 < mean <= true + half, (mean, half, true)  # K=1 gap is 0.84 nats


def test_truncnorm_with_a_noisy_gamma_0_is_cut_at_the_bin_edge_and_log_q_is_its_density():
    toy = Toy("uniform")  # gamma_0 around -1: 3 sigma_0 is far wider than a bin
    reps = 500
    x = toy.x.expand(reps, *SHAPE)
    d = dequantize(x, V, toy.bound, kind="truncnorm", generator=torch.Generator().manual_seed(0))
    xt = encode(x, V)
    lo, hi = toy.alpha_0 * (xt - 1 / V), toy.alpha_0 * (xt + 1 / V)
    assert ((d.y >= lo) & (d.y <= hi)).all()
    edge = (toy.alpha_0 / (V * toy.sigma_0)).expand_as(xt)  # the bin's half-width in units of sigma_0
    assert (edge < TAU).all()  # every pixel is cut at its bin's edge here, not at tau
    loc, scale = (toy.alpha_0 * xt).numpy(), toy.sigma_0.expand_as(xt).numpy()
    ref = stats.truncnorm.logpdf(d.y.numpy(), -edge.numpy(), edge.numpy(), loc=loc, scale=scale)
    np.testing.assert_allclose(d.log_q.numpy(), ref.reshape(reps, -1).sum(1), rtol=1e-9, atol=1e-9)
    # the draws fill the bin: some land within 10% of its edges
    near = (torch.minimum(d.y - lo, hi - d.y) < 0.1 * (hi - lo)).double().mean()
    assert near > 0.05


def test_bad_dequantization_arguments_are_refused():
    toy = Toy("uniform")
    with pytest.raises(ValueError):
        dequantize(toy.x, V, toy.bound, kind="logistic")
    with pytest.raises(ValueError):
        dequantized_nll(toy.x, V, toy.log_density, toy.bound, kind="uniform", samples=0)


def test_reproducible_and_calls_back():
    toy = Toy("truncnorm")
    seen = []
    kw = dict(kind="truncnorm", samples=3, dtype=F64)
    a = dequantized_nll(toy.x, V, toy.log_density, toy.bound, generator=torch.Generator().manual_seed(5),
                        callback=lambda k, n: seen.append((k, n)), **kw)
    b = dequantized_nll(toy.x, V, toy.log_density, toy.bound, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b) and seen == [(1, 3), (2, 3), (3, 3)]


def test_with_the_ode_on_a_gaussian_model():
    """End to end: ODE density of the optimal model for near-discrete Gaussian data (mean near a bin centre,
    std a little above sigma_0, the regime truncated-normal dequantization is designed for). That model's p_0 is
    Gaussian (an affine flow of N(0, I)): N(alpha_0 mu - r alpha_1 mu, r^2), r = sqrt(v_0 / v_1), v_t =
    alpha_t^2 s^2 + sigma_t^2, so P(x) and the K = 1 bound (quadrature) are known."""
    g0, g1 = -13.3, 5.0  # the VDM/MuLAN end points: tau sigma_0 <= alpha_0 / V for V <= 256
    bound = lambda t: GammaOut(g0 + (g1 - g0) * t.to(F64).reshape(-1, 1, 1, 1),
                               torch.full((t.shape[0], 1, 1, 1), g1 - g0, dtype=F64))
    v_vals, s = 16, 0.003
    x = torch.tensor([7, 8, 8, 9], dtype=torch.uint8).reshape(1, *SHAPE)
    mu = encode(x, v_vals) + torch.tensor([0.0, 0.002, -0.003, 0.004], dtype=F64).reshape(1, *SHAPE)

    def eps_fn(x_t, t):
        g = bound(t)
        a, sig = g.alpha2.sqrt(), g.sigma2.sqrt()
        return sig * (x_t - a * mu) / (a**2 * s**2 + sig**2)

    gz, go = bound(torch.zeros(1)), bound(torch.ones(1))
    (a0, s0), (a1, s1) = [(float(g.alpha2.sqrt()), float(g.sigma2.sqrt())) for g in (gz, go)]
    r = math.sqrt((a0**2 * s**2 + s0**2) / (a1**2 * s**2 + s1**2))
    pixels = [(u, v_vals, a0, s0, (a0 - r * a1) * m, r)
              for u, m in zip(encode(x, v_vals).flatten().tolist(), mu.flatten().tolist())]
    true = sum(log_bin_mass(u, v, a, m, sd) for u, v, a, _, m, sd in pixels)
    expected = sum(expected_bound_1d("truncnorm", *p) for p in pixels)
    assert expected < true - 0.1  # the K = 1 gap, so that K = 8 has room to improve

    log_density = lambda y: ode_log_likelihood(y, eps_fn, bound, divergence="exact", dtype=F64).logp
    reps = x.expand(64, *SHAPE)
    one = dequantized_nll(reps, v_vals, log_density, bound, samples=1, generator=torch.Generator().manual_seed(0),
                          dtype=F64)
    mean1, half1 = mean_ci(-one, level=0.999)
    assert abs(mean1 - expected) < half1 + 2e-3, (mean1, half1, expected)  # 2e-3: ODE error at rtol=atol=1e-5
    nll = dequantized_nll(reps, v_vals, log_density, bound, samples=8, generator=torch.Generator().manual_seed(1),
                          dtype=F64)
    mean8, half8 = mean_ci(-nll, level=0.999)
    assert mean1 + half1 < mean8 <= true + half8 + 2e-3, (mean1, mean8, true)


def test_mean_ci_is_the_t_interval():
    v = np.array([1.0, 2.0, 4.0, 7.0, 3.0])
    mean, half = mean_ci(torch.tensor(v), level=0.9)
    lo, hi = stats.t.interval(0.9, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert mean == pytest.approx(v.mean()) and half == pytest.approx((hi - lo) / 2)
    assert mean_ci(v, 0.99)[1] > half  # wider at a higher level
    assert mean_ci([2.5])[1] == math.inf
    with pytest.raises(ValueError):
        mean_ci([], 0.95)
    with pytest.raises(ValueError):
        mean_ci(v, 1.0)
