"""The auxiliary latent: k-hot straight-through estimator, KL terms, prior samples (SPEC "The auxiliary latent")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import perturb
from mulan.config import LatentConfig
from mulan.latent import GaussianLatent, KHotLatent, NoLatent, build_latent, gumbel_noise, log_comb

SHAPE = (1, 8, 8)


def images(b=6, shape=SHAPE, seed=0):
    return torch.rand(b, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed):
    return torch.Generator().manual_seed(seed)


def khot(m=16, k=4, noise="gumbel", train_kl="surrogate", shape=SHAPE, seed=0):
    torch.manual_seed(seed)
    return build_latent(LatentConfig(kind="khot", m=m, k=k, noise=noise, train_kl=train_kl, encoder_channels=8), shape)


def assert_khot(z, k):
    assert ((z == 0) | (z == 1)).all()
    assert torch.equal(z.sum(dim=1), torch.full((z.shape[0],), float(k)))


@pytest.mark.parametrize("noise", ["gumbel", "gamma"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (2, 3, 5)])
def test_khot_has_exactly_k_ones(noise, shape):
    lat = khot(noise=noise, shape=shape)
    assert isinstance(lat, KHotLatent) and lat.dim == 16
    x = images(shape=shape)
    out = lat(x, strict=False, generator=gen(0))
    assert out.z.shape == (6, 16) and out.kl.shape == (6,)
    assert_khot(out.z, 4)
    lat.eval()
    assert_khot(lat(x, strict=False).z, 4)


@pytest.mark.parametrize("m,k", [(50, 15), (10, 8)])
def test_khot_values_are_exact(m, k):
    """z is exactly 0/1 in the forward pass; stop_grad(hard - soft) + soft would round (1 - s) + s != 1 for
    some negative soft values s, which occur in the top k when k is close to m."""
    lat = khot(m=m, k=k)
    for noise_seed in range(3):
        assert_khot(lat(images(16), strict=False, generator=gen(noise_seed)).z, k)


def test_ties_still_give_k_ones():
    lat = khot()
    lat.encoder.out.weight.data.zero_()  # all logits equal: every score ties at evaluation
    lat.encoder.out.bias.data.zero_()
    lat.eval()
    z = lat(images(), strict=True).z
    assert_khot(z, 4)
    assert torch.equal(z[:, :4], torch.ones(6, 4))  # ties go to the lowest indices


@pytest.mark.parametrize("noise", ["gumbel", "gamma"])
def test_gradients_reach_every_encoder_parameter(noise):
    lat = khot(noise=noise)
    w = torch.randn(6, 16, generator=gen(3))
    (lat(images(), strict=False, generator=gen(0)).z * w).sum().backward()
    for name, p in lat.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.out = nn.Linear(1, 1)  # KHotLatent reads the output layer's dtype/device

    def forward(self, x):
        return self.logits


def test_straight_through_forward_hard_backward_projection():
    """Forward: top-k of the perturbed logits; backward: the Jacobian of centre-and-normalise."""
    m, k = 10, 3
    lat = khot(m=m, k=k)
    logits = torch.randn(4, m, generator=gen(1))
    lat.encoder = FixedLogits(logits)
    w = torch.randn(4, m, generator=gen(2))
    z = lat(images(4), strict=False, generator=gen(7)).z
    (z * w).sum().backward()
    scores = logits + gumbel_noise(logits.shape, gen(7), logits)  # the same noise, replayed
    hard = torch.zeros(4, m).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    assert torch.equal(z.detach(), hard)
    c = scores - scores.mean(dim=1, keepdim=True)
    norm = c.norm(dim=1, keepdim=True)
    s = c / norm
    wc = w - w.mean(dim=1, keepdim=True)  # centring is a symmetric projection
    want = (wc - s * (s * wc).sum(dim=1, keepdim=True)) / norm
    torch.testing.assert_close(lat.encoder.logits.grad, want, rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic_and_noiseless():
    lat = khot()
    lat.eval()
    x = images()
    a = lat(x, strict=False, generator=gen(0)).z
    b = lat(x, strict=False, generator=gen(1)).z
    assert torch.equal(a, b)
    logits = lat.encoder(x)
    assert torch.equal(a, torch.zeros_like(logits).scatter_(1, logits.topk(4, dim=1).indices, 1.0))


def test_strict_kl_is_log_binomial():
    lat = khot(m=50, k=15)
    x = images()
    assert math.log(math.comb(50, 15)) == pytest.approx(28.4423, abs=1e-3)
    for training, strict in ((True, True), (False, False), (False, True)):
        lat.train(training)
        out = lat(x, strict=strict, generator=gen(0))
        assert out.kl_kind == "strict"
        torch.testing.assert_close(out.kl, torch.full((6,), math.log(math.comb(50, 15))))
    # train_kl='strict' charges the bound while training too
    lat = khot(m=50, k=15, train_kl="strict")
    out = lat(x, strict=False, generator=gen(0))
    assert out.kl_kind == "strict" and out.kl[0].item() == pytest.approx(28.4423, abs=1e-3)


@pytest.mark.parametrize("m, k", [(2, 1), (16, 4), (50, 15), (64, 63), (1000, 500)])
def test_log_comb_is_the_log_of_the_exact_binomial_and_presets_charge_it(m, k):
    assert log_comb(m, k) == pytest.approx(math.log(math.comb(m, k)), rel=1e-12, abs=1e-12)
    from mulan.config import apply_overrides
    from mulan.presets import get_preset, latent_cost_bpd

    cfg = apply_overrides(get_preset("digits-mulan"), [f"model.latent.m={m}", f"model.latent.k={k}"])
    assert latent_cost_bpd(cfg) == pytest.approx(math.log2(math.comb(m, k)) / 64, rel=1e-12)


def test_surrogate_kl():
    lat = khot(m=16, k=4)
    with torch.no_grad():
        lat.encoder.out.weight.mul_(20.0)  # sharpen the logits so the KL is far from 0
    x = images()
    out = lat(x, strict=False, generator=gen(0))
    assert out.kl_kind == "surrogate"
    q = torch.softmax(lat.encoder(x), dim=1)
    entropy = -(q * q.log()).sum(dim=1)
    torch.testing.assert_close(out.kl, math.log(16) - entropy)
    assert (out.kl >= 0).all() and (out.kl <= math.log(16)).all() and (out.kl > 1e-3).any()


def test_prior_is_uniform_over_the_k_subsets():
    """Every one of the C(m, k) k-hot vectors is equally likely: a chi-square test of the counts of all 120
    subsets (m = 10, k = 3). Right marginals alone would not do: e.g. only the 10 cyclic runs of 3 have them."""
    from itertools import combinations

    from scipy import stats

    m, k, draws = 10, 3, 24000
    lat = khot(m=m, k=k)
    z = lat.sample_prior(draws, generator=gen(0))
    assert z.shape == (draws, m)
    assert_khot(z, k)
    index = {s: i for i, s in enumerate(combinations(range(m), k))}
    counts = torch.zeros(len(index))
    for row in z.nonzero()[:, 1].reshape(draws, k).tolist():
        counts[index[tuple(row)]] += 1
    assert len(index) == math.comb(m, k) and counts.min() > 0
    # fixed seed, so a fixed verdict; a sampler 20% too likely on a tenth of the subsets gives p ~ 1e-8 here
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    cyclic = torch.zeros(draws, m)
    for i in range(draws):
        cyclic[i, [(i + j) % m for j in range(k)]] = 1
    assert (cyclic.mean(0) - k / m).abs().max() < 1e-3  # right marginals ...
    cyclic_counts = torch.bincount(torch.tensor([index[tuple(r)] for r in cyclic.nonzero()[:, 1].reshape(draws, k)
                                                 .sort(1).values.tolist()]), minlength=len(index))
    assert stats.chisquare(cyclic_counts.numpy()).pvalue < 1e-9  # ... and caught
    assert torch.equal(z, lat.sample_prior(draws, generator=gen(0)))
    assert not torch.equal(z, lat.sample_prior(draws, generator=gen(1)))


def test_gaussian_latent():
    lat = build_latent(LatentConfig(kind="gaussian", m=5, encoder_channels=8), SHAPE)
    assert isinstance(lat, GaussianLatent) and lat.dim == 5
    x = images()
    out = lat(x, strict=True, generator=gen(0))
    assert out.kl_kind == "analytic" and out.z.shape == (6, 5)
    torch.testing.assert_close(out.kl, torch.zeros(6))  # q(z|x) starts at the prior
    perturb(lat.encoder.out, 1.0)
    for training in (True, False):  # sampled in evaluation as well
        lat.train(training)
        out = lat(x, strict=True, generator=gen(0))
        mu, log_var = lat.encoder(x).chunk(2, dim=1)
        q = torch.distributions.Normal(mu, (0.5 * log_var).exp())
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=1)
        torch.testing.assert_close(out.kl, kl)
        assert (out.kl >= 0).all() and (out.kl > 0.01).all()
        eps = torch.randn(6, 5, generator=gen(0))
        torch.testing.assert_close(out.z, mu + (0.5 * log_var).exp() * eps)
    prior = lat.sample_prior(20000, generator=gen(4))
    assert prior.shape == (20000, 5)
    assert prior.mean().abs() < 0.03 and (prior.var() - 1).abs() < 0.03


def test_no_latent():
    lat = build_latent(LatentConfig(kind="none"), SHAPE)
    assert isinstance(lat, NoLatent) and lat.dim == 0
    out = lat(images(), strict=True)
    assert out.z is None and out.kl_kind == "none"
    assert torch.equal(out.kl, torch.zeros(6))
    assert lat.sample_prior(3) is None


@pytest.mark.parametrize("kind,noise", [("khot", "gumbel"), ("khot", "gamma"), ("gaussian", "gumbel")])
def test_generator_makes_results_reproducible(kind, noise):
    torch.manual_seed(0)
    lat = build_latent(LatentConfig(kind=kind, m=16, k=4, noise=noise, encoder_channels=8), SHAPE)
    x = images(16)
    a = lat(x, strict=False, generator=gen(11)).z
    torch.manual_seed(123)  # the global generator must not matter
    b = lat(x, strict=False, generator=gen(11)).z
    c = lat(x, strict=False, generator=gen(12)).z
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
