"""Known answers and properties of every ELBO term (SPEC "Negative ELBO")."""

from __future__ import annotations

import math

import torch
from torch import nn

from conftest import tiny
from mulan.diffusion import Diffusion, antithetic_times, bits_per_dim
from mulan.schedules.base import GammaOut, Schedule, as_col
from mulan.train import build_model


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


def test_decoder_probabilities_sum_to_one_and_recover_x_at_low_noise():
    m = model_for()
    x = digits_batch()
    x0 = m.encode(x) + 0.01 * torch.randn(x.shape, dtype=torch.float64)
    for g in (-13.3, -4.0, 0.0):
        logits = m.decoder_logits(x0, torch.full((8, 1, 1, 1), g, dtype=torch.float64))
        p = torch.softmax(logits, -1)
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    # at gamma_0 = -13.3 the decoder is sure of the right value: recon ~ 0 nats
    assert (p.shape[-1] == 17)
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


def test_generator_makes_elbo_reproducible_and_batch_independent():
    m = model_for()
    x = digits_batch(6)
    a = m.elbo_terms(x, generator=torch.Generator().manual_seed(3)).total
    b = m.elbo_terms(x, generator=torch.Generator().manual_seed(3)).total
    torch.testing.assert_close(a, b)


def test_antithetic_times_cover_unit_interval_evenly():
    t = antithetic_times(8, generator=torch.Generator().manual_seed(0))
    gaps = torch.sort(t).values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8))
    assert t.min() >= 0 and t.max() < 1


def test_negative_elbo_of_plain_callables_equals_the_models_terms():
    """The public estimator (any eps_fn and schedule) computes the model's own terms from its condition()."""
    import pytest

    from mulan.likelihood.elbo import negative_elbo

    for preset in ("digits-vdm", "digits-mulan-v"):
        model = model_for(preset)
        with torch.no_grad():  # a non-zero denoiser output
            for p in model.denoiser.parameters():
                p.add_(0.05 * torch.randn_like(p))
        x = digits_batch()
        t = torch.rand(8, dtype=torch.float64)
        ref = model.elbo_terms(x, t=t, generator=torch.Generator().manual_seed(4))
        cond = model.condition(x)
        got = negative_elbo(model.encode(x), cond.eps_fn, cond.bound, t, x=x, num_values=17,
                            generator=torch.Generator().manual_seed(4))
        assert type(got) is type(ref)  # the same typed terms as the model's own
        for k in ("recon", "prior", "diffusion"):
            torch.testing.assert_close(getattr(got, k), getattr(ref, k), rtol=1e-12, atol=1e-12)
        assert got.latent_kl == "none" and not got.latent.any()  # a latent's KL is the caller's to add
        torch.testing.assert_close(got.total + cond.latent.kl, ref.total, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        negative_elbo(model.encode(x), cond.eps_fn, cond.bound, t, x=x)
