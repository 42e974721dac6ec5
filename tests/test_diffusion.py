"""Known answers and properties of every ELBO term (SPEC "Negative ELBO")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import perturb, tiny
from mulan.diffusion import Diffusion, antithetic_times, bits_per_dim, build_model
from mulan.schedules.base import GammaOut, Schedule, as_col


def model_for(preset="digits-vdm", *extra) -> Diffusion:
    return build_model(tiny(preset, *extra)).double().eval()


def digits_batch(b=8, V=17, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (b, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


class OracleDenoiser(nn.Module):
    """The exact eps for data that is a single known image: eps = (x_t - alpha x) / sigma (scalar schedules)."""

    def __init__(self, x_tilde: torch.Tensor, gamma_min: float, gamma_max: float, v: bool = False):
        super().__init__()
        self.x_tilde, self.lo, self.hi, self.v = x_tilde, gamma_min, gamma_max, v

    def forward(self, x_t, t_in, cond=None):
        gamma = as_col(self.lo + t_in * (self.hi - self.lo))
        alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
        eps = (x_t - alpha * self.x_tilde) / sigma
        return alpha * eps - sigma * self.x_tilde if self.v else eps


class FixedFunctionDenoiser(nn.Module):
    """A denoiser that is a fixed (non-optimal) function of (x_t, gamma)."""

    def __init__(self, lo, hi):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x_t, t_in, cond=None):
        gamma = as_col(self.lo + t_in * (self.hi - self.lo))
        return torch.tanh(1.5 * x_t) * torch.sigmoid(0.7 * gamma) + 0.1 * torch.sin(gamma)


class SquaredSchedule(Schedule):
    """gamma = gamma_min + (gamma_max - gamma_min) t^2: same ends as the linear schedule, other shape."""

    def __init__(self, lo, hi):
        super().__init__()
        self.lo, self.hi = lo, hi

    def bind(self, z, batch):
        def at(t):
            t = as_col(t)
            return GammaOut(self.lo + (self.hi - self.lo) * t**2, 2 * (self.hi - self.lo) * t)

        return at


def test_decoder_is_the_gaussian_normalised_over_the_values_and_recovers_x_at_low_noise():
    m = model_for()
    x = digits_batch()
    x0 = m.encode(x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = torch.tensor([2 * (v + 0.5) / 17 - 1 for v in range(17)], dtype=torch.float64)
    for g in (-13.3, -4.0, 0.0):
        logits = m.decoder_logits(x0, torch.full((8, 1, 1, 1), g, dtype=torch.float64))
        # SPEC 1: p(x = v | x_0') is N(x_0'; x_tilde(v), exp(gamma_0)) renormalised over the V values
        gauss = torch.distributions.Normal(values, math.exp(g / 2)).log_prob(x0.unsqueeze(-1))
        torch.testing.assert_close(torch.log_softmax(logits, -1), torch.log_softmax(gauss, -1), rtol=1e-9, atol=1e-9)
    # at gamma_0 = -13.3 the decoder is sure of the right value: recon ~ 0 nats
    terms = m.elbo_terms(x, generator=torch.Generator().manual_seed(0))
    assert terms.recon.abs().max() < 1e-3


def test_prior_kl_matches_torch_distributions():
    m = model_for()
    x = digits_batch()
    g1 = m.schedule(torch.ones(8, dtype=torch.float64))
    alpha, sigma = g1.alpha2.sqrt(), g1.sigma2.sqrt()
    q = torch.distributions.Normal(alpha * m.encode(x), sigma.expand(x.shape))
    p = torch.distributions.Normal(torch.zeros(x.shape, dtype=torch.float64), 1.0)
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(m._prior(m.encode(x), g1), expected)


def test_perfect_denoiser_gives_zero_diffusion_loss_eps_and_v():
    for prediction in ("eps", "v"):
        m = model_for("digits-fixed", f"model.prediction={prediction}")
        x = digits_batch(1).repeat(8, 1, 1, 1)
        m.denoiser = OracleDenoiser(m.encode(x), -13.3, 5.0, v=prediction == "v")
        t = torch.linspace(0.01, 0.99, 8, dtype=torch.float64)
        d = m.elbo_terms(x, t=t, generator=torch.Generator().manual_seed(0)).diffusion
        assert d.abs().max() < 1e-6, (prediction, d)


def _expected_diffusion(m: Diffusion, x, S=4096, seed=0) -> float:
    """E_t of the diffusion loss with S stratified times (one shared noise stream)."""
    gen = torch.Generator().manual_seed(seed)
    tot = 0.0
    with torch.no_grad():
        for s in range(0, S, 256):
            t = (torch.arange(s, s + 256, dtype=torch.float64) + torch.rand(256, generator=gen, dtype=torch.float64)) / S
            xb = x.repeat(256, 1, 1, 1)
            cond = m.condition(xb, generator=gen)
            tot += m._diffusion(m.encode(xb), t, cond.bound, cond.z, gen).sum().item()
    return tot / S


def test_discrete_time_loss_approaches_continuous_as_T_grows():
    m = model_for("digits-fixed")
    m.denoiser = FixedFunctionDenoiser(-13.3, 5.0)
    x = digits_batch(1)
    cont = _expected_diffusion(m, x)
    gaps = []
    for T in (4, 32, 1000):
        m.cfg.timesteps = T
        gaps.append(abs(_expected_diffusion(m, x) - cont) / cont)
    m.cfg.timesteps = 0
    assert gaps[-1] < 0.02 and gaps[0] > gaps[-1], gaps


def test_vdm_invariance_scalar_schedule_shape_does_not_change_expected_loss():
    m = model_for("digits-fixed")
    m.denoiser = FixedFunctionDenoiser(-13.3, 5.0)
    x = digits_batch(1)
    linear = _expected_diffusion(m, x)
    m.schedule = SquaredSchedule(-13.3, 5.0)
    squared = _expected_diffusion(m, x)
    assert abs(linear - squared) / linear < 0.02, (linear, squared)


def test_terms_are_per_example_and_bits_per_dim():
    m = model_for()
    x = digits_batch(5)
    terms = m.elbo_terms(x, generator=torch.Generator().manual_seed(0))
    for v in terms.as_dict().values():
        assert v.shape == (5,)
    assert terms.latent_kl == "none" and torch.all(terms.latent == 0)
    torch.testing.assert_close(bits_per_dim(terms.total, 64), terms.total / (64 * math.log(2)))


def test_generator_makes_the_elbo_reproducible():
    """Same seed, same terms, whatever the global generator does; another seed, other terms (its noise and
    times reach the diffusion term; recon is 0 to float precision at gamma_0 = -13.3)."""
    m = model_for()
    x = digits_batch(6)
    a = m.elbo_terms(x, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    b = m.elbo_terms(x, generator=torch.Generator().manual_seed(3))
    c = m.elbo_terms(x, generator=torch.Generator().manual_seed(4))
    for k in ("recon", "prior", "diffusion"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert not torch.allclose(a.diffusion, c.diffusion)


def test_antithetic_times_cover_unit_interval_evenly():
    t = antithetic_times(8, generator=torch.Generator().manual_seed(0))
    gaps = torch.sort(t).values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8))
    assert t.min() >= 0 and t.max() < 1


def spec_terms(model: Diffusion, x, t, generator, timesteps: int = 0) -> dict:
    """The negative ELBO's terms written from SPEC "Negative ELBO" with plain tensor algebra: none of the
    library's term functions, decoder or eps/v conversion. Only the draws are the library's (mulan.rng, in the
    library's order: the decoder's noise, then the diffusion noise), so the two sides see the same noise."""
    from mulan import rng

    V = model.num_values
    x_tilde = 2 * (x.double() + 0.5) / V - 1
    cond = model.condition(x)
    sched = cond.bound  # the schedule is an input here, like the network

    def alpha_sigma(gamma):
        return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()

    lo, hi = model.cfg.schedule.gamma_min, model.cfg.schedule.gamma_max

    def eps_hat(x_t, g):  # the raw network, read as eps or v (v = alpha eps - sigma x_tilde), fed the
        # pixel-mean gamma rescaled to [0, 1] by the configured ends (SPEC "The denoiser")
        out = model.denoiser(x_t, (g.gamma.flatten(1).mean(1) - lo) / (hi - lo), cond.z)
        if model.cfg.prediction == "v":
            a, s = alpha_sigma(g.gamma)
            out = s * x_t + a * out
        return out

    zeros = torch.zeros(len(x), dtype=torch.float64)
    g0, g1 = sched(zeros), sched(zeros + 1)
    # 1. recon: x_0' = x_tilde + exp(gamma_0 / 2) eps; p(x = v | x_0') from the Gaussian over the V values
    x0 = x_tilde + torch.exp(g0.gamma / 2) * rng.randn(x.shape, generator, dtype=torch.float64)
    values = 2 * (torch.arange(V, dtype=torch.float64) + 0.5) / V - 1
    logits = -0.5 * ((x0.unsqueeze(-1) - values) * torch.exp(-g0.gamma / 2).unsqueeze(-1)) ** 2
    logp = logits.gather(-1, x.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    recon = -logp.flatten(1).sum(1)
    # 2. prior: 1/2 sum (alpha_1^2 x_tilde^2 + sigma_1^2 - log sigma_1^2 - 1)
    s1 = torch.sigmoid(g1.gamma)
    prior = (0.5 * ((1 - s1) * x_tilde**2 + s1 - torch.log(s1) - 1)).expand_as(x_tilde).flatten(1).sum(1)
    # 3. diffusion at t: 1/2 gamma'(t) (eps - eps_hat)^2, or 1/2 T expm1(gamma_t - gamma_s) (eps - eps_hat)^2
    if timesteps:
        t = (torch.floor(t * timesteps) + 1) / timesteps
    g = sched(t)
    a, s = alpha_sigma(g.gamma)
    eps = rng.randn(x.shape, generator, dtype=torch.float64)
    err = (eps - eps_hat(a * x_tilde + s * eps, g)) ** 2
    weight = timesteps * torch.expm1(g.gamma - sched(t - 1 / timesteps).gamma) if timesteps else g.dgamma_dt
    diffusion = 0.5 * (weight * err).flatten(1).sum(1)
    return {"recon": recon, "prior": prior, "diffusion": diffusion}


@pytest.mark.parametrize("preset,timesteps", [("digits-vdm", 0), ("digits-mulan-v", 0), ("digits-mulan", 10)])
def test_terms_match_the_spec_equations(preset, timesteps):
    """The model's terms and the public estimator's (plain callables) against :func:`spec_terms`, with a
    non-zero network and schedule heads, at low and high noise, the decoder at a noticeable gamma_0."""
    from mulan.likelihood.elbo import negative_elbo

    model = perturb(model_for(preset, "model.schedule.gamma_min=-5.0"))  # gamma_0 = -5: the decoder is not sure
    model.cfg.timesteps = timesteps
    x = digits_batch()
    t = torch.tensor([0.0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999], dtype=torch.float64)
    want = spec_terms(model, x, t, torch.Generator().manual_seed(4), timesteps)
    assert (want["recon"] > 1e-3).all() and (want["diffusion"] > 1e-3).all()  # nothing trivially zero
    got = model.elbo_terms(x, t=t, generator=torch.Generator().manual_seed(4))
    cond = model.condition(x)
    public = negative_elbo(model.encode(x), cond.eps_fn, cond.bound, t, x=x, num_values=17, timesteps=timesteps,
                           generator=torch.Generator().manual_seed(4))
    assert type(public) is type(got)  # the same typed terms as the model's own
    for k in ("recon", "prior", "diffusion"):
        torch.testing.assert_close(getattr(got, k), want[k], rtol=1e-10, atol=1e-10, msg=k)
        torch.testing.assert_close(getattr(public, k), want[k], rtol=1e-10, atol=1e-10, msg=k)
    assert public.latent_kl == "none" and not public.latent.any()  # a latent's KL is the caller's to add
    torch.testing.assert_close(public.total + cond.latent.kl, got.total, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):
        negative_elbo(model.encode(x), cond.eps_fn, cond.bound, t, x=x)  # discrete data without V
