"""MuLAN as settings of the one model: VDM recovered when its parts are off; the schedule's path matters."""

from __future__ import annotations

import math

import torch

from conftest import model_that_matters, perturb, tiny
from mulan.diffusion import Diffusion, build_model
from mulan.schedules.base import GammaOut, Schedule, as_col
from test_diffusion import FixedFunctionDenoiser, OracleDenoiser, _expected_diffusion, digits_batch


def test_mulan_with_its_parts_off_computes_vdm_terms_exactly():
    torch.manual_seed(0)
    vdm = build_model(tiny("digits-fixed")).double().eval()
    # polynomial schedule averaged over pixels, not adaptive, no latent: at initialisation gamma is linear
    mulan = build_model(tiny("digits-mulan-no-latent", "model.schedule.pixel_mean=true")).double().eval()
    mulan.denoiser.load_state_dict(vdm.denoiser.state_dict())
    perturb(vdm.denoiser, 0.05)
    mulan.denoiser.load_state_dict(vdm.denoiser.state_dict())
    x = digits_batch(6)
    a = vdm.elbo_terms(x, generator=torch.Generator().manual_seed(1))
    b = mulan.elbo_terms(x, generator=torch.Generator().manual_seed(1))
    for k in ("recon", "prior", "diffusion", "latent"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-9, atol=1e-9)


class PowerSchedule(Schedule):
    """gamma_i = gamma_min + (gamma_max - gamma_min) t^p_i with fixed ends; per pixel, or one p for all."""

    def __init__(self, powers: torch.Tensor, lo=-13.3, hi=5.0):
        super().__init__()
        self.p, self.lo, self.hi = powers.double(), lo, hi
        self.per_pixel = powers.numel() > 1

    def bind(self, z, batch):
        def at(t):
            t = as_col(t).clamp_min(1e-12)
            p = self.p.reshape(1, *self.p.shape) if self.per_pixel else self.p
            return GammaOut(self.lo + (self.hi - self.lo) * t**p, (self.hi - self.lo) * p * t ** (p - 1))

        return at


def _loss_with(m: Diffusion, schedule: Schedule, x) -> float:
    m.schedule = schedule
    return _expected_diffusion(m, x, S=4096)


class BlendDenoiser(torch.nn.Module):
    """A fixed function of (x_t, pixel-mean gamma): the exact eps for one known image under a scalar
    schedule, plus a fixed distortion. It sees each pixel's noise level only through the pixel mean."""

    def __init__(self, x_tilde):
        super().__init__()
        self.oracle, self.other = OracleDenoiser(x_tilde, -13.3, 5.0), FixedFunctionDenoiser(-13.3, 5.0)

    def forward(self, x_t, t_in, cond=None):
        return self.oracle(x_t, t_in) + 0.3 * self.other(x_t, t_in)


def test_path_matters_for_multivariate_schedules_not_for_scalar_ones():
    m = build_model(tiny("digits-fixed")).double().eval()
    x = digits_batch(1)
    m.denoiser = BlendDenoiser(m.encode(x))
    ones = torch.ones(1, 8, 8)
    scalar_a = _loss_with(m, PowerSchedule(torch.tensor(1.0)), x)
    scalar_b = _loss_with(m, PowerSchedule(torch.tensor(2.0)), x)
    # the same change of shape made to half of the pixels only: a multivariate schedule with the same ends
    mixed = ones.clone()
    mixed[:, :4] = 2.0
    multi_a = _loss_with(m, PowerSchedule(ones), x)
    multi_b = _loss_with(m, PowerSchedule(mixed), x)
    assert abs(scalar_a - scalar_b) / scalar_a < 0.02, (scalar_a, scalar_b)
    assert abs(multi_a - scalar_a) / scalar_a < 1e-9  # all-ones powers is the scalar linear schedule
    assert abs(multi_a - multi_b) / multi_a > 0.10, (multi_a, multi_b)


def test_strict_latent_kl_at_evaluation_is_log_binomial():
    m = build_model(tiny("digits-mulan")).eval()
    terms = m.elbo_terms(digits_batch(4), generator=torch.Generator().manual_seed(0))
    assert terms.latent_kl == "strict"
    torch.testing.assert_close(terms.latent, torch.full((4,), math.log(math.comb(8, 2))))
    m.train()
    terms = m.elbo_terms(digits_batch(4), generator=torch.Generator().manual_seed(0))
    assert terms.latent_kl == "surrogate" and (terms.latent <= math.log(8) + 1e-6).all()


def test_denoiser_and_schedule_see_z():
    m = model_that_matters("digits-mulan", scale=0.1)
    z1 = m.latent.sample_prior(2, generator=torch.Generator().manual_seed(0))
    z2 = m.latent.sample_prior(2, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(z1, z2)
    t = torch.full((2,), 0.5)
    g1, g2 = m.condition(z=z1).bound(t), m.condition(z=z2).bound(t)
    assert not torch.allclose(g1.gamma, g2.gamma)  # adaptive per-pixel schedule
    x_t = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(m.eps_hat(x_t, g1, z1), m.eps_hat(x_t, g1, z2))  # denoiser conditioned on z


def test_nonadaptive_schedule_ignores_z_but_denoiser_does_not():
    m = model_that_matters("digits-mulan-nonadaptive", scale=0.1)
    z1 = m.latent.sample_prior(2, generator=torch.Generator().manual_seed(0))
    z2 = m.latent.sample_prior(2, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.5)
    torch.testing.assert_close(m.condition(z=z1).bound(t).gamma, m.condition(z=z2).bound(t).gamma)


def test_scalar_ablation_is_pixel_mean_of_the_polynomial():
    full = build_model(tiny("digits-mulan")).eval()
    scalar = build_model(tiny("digits-mulan-scalar")).eval()
    perturb(full, 0.1)
    scalar.load_state_dict(full.state_dict())
    z = full.latent.sample_prior(3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.8])
    g_full, g_scalar = full.condition(z=z).bound(t), scalar.condition(z=z).bound(t)
    assert g_scalar.gamma.shape == (3, 1, 1, 1)
    torch.testing.assert_close(g_scalar.gamma.flatten(), g_full.gamma.flatten(1).mean(1), rtol=1e-5, atol=1e-5)


def test_conditional_sampling_uses_the_given_z():
    from mulan.sampling import ancestral_sample

    m = model_that_matters("digits-mulan", scale=0.1)  # z reaches the schedule and the denoiser
    z1 = m.latent.sample_prior(3, generator=torch.Generator().manual_seed(0))
    z2 = m.latent.sample_prior(3, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(z1, z2)

    def sample(z):
        return ancestral_sample(m, 3, steps=5, z=z, generator=torch.Generator().manual_seed(0))

    a = sample(z1)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.long and torch.equal(a, sample(z1))
    assert a.min() >= 0 and a.max() < 17
    # the same noise with another z gives other images: the sampler follows the z it is given (a sampler
    # that drew its own z, or ignored it, would return the same images for both)
    assert not torch.equal(a, sample(z2))
