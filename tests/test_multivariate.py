"""Properties of the multivariate schedules and their decoders (SPEC "The noise schedule")."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import perturb
from mulan.config import ScheduleConfig
from mulan.schedules import build_schedule
from mulan.schedules.decoders import build_decoder
from mulan.schedules.multivariate import PixelSchedule

SHAPE = (2, 4, 4)
M = 6
KINDS = ("polynomial", "pixel_monotone_net", "pixel_sigmoid")
DECODERS = ("conv", "lowrank", "dense")
# (kind, decoder, adaptive, pixel_mean, latent_dim): every kind x decoder, then the ablations
CASES = [(k, d, True, False, M) for k in KINDS for d in DECODERS] + [
    (k, "conv", a, pm, m) for k in KINDS for a, pm, m in ((False, False, M), (True, True, M), (True, False, 0))
]


def _ids(case):
    kind, dec, adaptive, pixel_mean, m = case
    return f"{kind}-{dec}" + ("-constant" if not adaptive else "") + ("-mean" if pixel_mean else "") + (
        "-nolatent" if m == 0 else "")


def make(kind, decoder="conv", adaptive=True, pixel_mean=False, latent_dim=M, scale=0.5, seed=0, shape=SHAPE):
    """A schedule whose parameters (zero-initialised heads included) are randomly perturbed."""
    torch.manual_seed(seed)
    cfg = ScheduleConfig(kind=kind, decoder=decoder, adaptive=adaptive, pixel_mean=pixel_mean, hidden=16)
    s = build_schedule(cfg, shape, latent_dim)
    perturb(s, scale, seed)
    return s, cfg


def zs(n, m=M, seed=1, dtype=torch.float32):
    if m == 0:
        return None
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_end_points_exact(case):
    kind, dec, adaptive, pixel_mean, m = case
    s, cfg = make(kind, dec, adaptive, pixel_mean, m)
    at = s.bind(zs(5, m), 5)
    g0, g1 = at(torch.zeros(5)).gamma, at(torch.ones(5)).gamma
    assert torch.equal(g0, torch.full_like(g0, cfg.gamma_min))
    assert torch.equal(g1, torch.full_like(g1, cfg.gamma_max))
    # the polynomial / sigmoids really are curved after the perturbation (not trivially linear)
    t = torch.full((5,), 0.3)
    lin = cfg.gamma_min + 0.3 * (cfg.gamma_max - cfg.gamma_min)
    assert (at(t).gamma - lin).abs().max() > 0.05


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_monotone_and_shapes(case):
    kind, dec, adaptive, pixel_mean, m = case
    s, _ = make(kind, dec, adaptive, pixel_mean, m)
    assert s.per_pixel == (not pixel_mean)
    grid = torch.linspace(0, 1, 101)
    for seed in range(3):
        z = zs(1, m, seed=seed)
        z = None if z is None else z.expand(len(grid), -1)
        out = s.bind(z, len(grid))(grid)  # row i: gamma(z, t_i)
        want = (len(grid), 1, 1, 1) if pixel_mean else (len(grid), *SHAPE)
        assert out.gamma.shape == want and out.dgamma_dt.shape == want
        assert (out.gamma.diff(dim=0) >= 0).all()
        assert (out.dgamma_dt >= 0).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_derivative_matches_autograd_and_finite_differences(case):
    kind, dec, adaptive, pixel_mean, m = case
    s, _ = make(kind, dec, adaptive, pixel_mean, m)
    s = s.double()
    at = s.bind(zs(4, m, dtype=torch.float64), 4)
    t = torch.tensor([0.03, 0.31, 0.64, 0.97], dtype=torch.float64)
    closed = at(t).dgamma_dt
    # autograd: gamma of example b depends on t_b only, so the diagonal of the Jacobian is d gamma / dt
    jac = torch.autograd.functional.jacobian(lambda tt: at(tt).gamma, t)  # (B, ..., B)
    auto = torch.stack([jac[b, ..., b] for b in range(4)])
    torch.testing.assert_close(closed, auto, rtol=1e-9, atol=1e-9)
    h = 1e-6
    fd = (at(t + h).gamma - at(t - h).gamma) / (2 * h)
    torch.testing.assert_close(closed, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_adaptivity(kind):
    z = zs(2)  # two different latents
    t = torch.full((2,), 0.5)
    s, _ = make(kind, adaptive=True)
    g = s.bind(z, 2)(t).gamma
    assert (g[0] - g[1]).abs().max() > 1e-3
    s, _ = make(kind, adaptive=False)
    g = s.bind(z, 2)(t).gamma
    assert torch.equal(g[0], g[1])
    s, _ = make(kind, latent_dim=0)
    g = s.bind(None, 2)(t).gamma
    assert g.shape == (2, *SHAPE) and torch.equal(g[0], g[1])
    # the adaptive schedule needs z, and passes gradients back to it (to the latent's encoder)
    s, _ = make(kind, adaptive=True)
    with pytest.raises(ValueError):
        s.bind(None, 2)
    zg = z.clone().requires_grad_(True)
    out = s.bind(zg, 2)(t)
    (out.gamma.sum() + out.dgamma_dt.sum()).backward()
    assert zg.grad is not None and zg.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_pixel_mean_is_mean_of_per_pixel(kind):
    per_pixel, _ = make(kind)
    scalar, _ = make(kind, pixel_mean=True)
    scalar.load_state_dict(per_pixel.state_dict())
    z, t = zs(3), torch.rand(3, generator=torch.Generator().manual_seed(2))
    a, b = per_pixel.bind(z, 3)(t), scalar.bind(z, 3)(t)
    torch.testing.assert_close(b.gamma, a.gamma.mean(dim=(1, 2, 3), keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.dgamma_dt, a.dgamma_dt.mean(dim=(1, 2, 3), keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_starts_close_to_linear(kind, decoder):
    s, cfg = make(kind, decoder, scale=0.0)
    t = torch.linspace(0, 1, 11)
    out = s.bind(zs(11), 11)(t)
    span = cfg.gamma_max - cfg.gamma_min
    lin = (cfg.gamma_min + span * t).reshape(-1, 1, 1, 1)
    tol = 1e-5 if kind == "polynomial" else 0.01 * span  # the polynomial is exactly linear (a = b = 0)
    assert (out.gamma - lin).abs().max() <= tol
    # and, at initialisation, independent of z (every decoder's output layer starts at 0)
    out2 = s.bind(zs(11, seed=5), 11)(t)
    torch.testing.assert_close(out.gamma, out2.gamma, rtol=0, atol=1e-6)


def test_bind_accepts_scalar_time():
    s, _ = make("polynomial")
    out = s.bind(zs(3), 3)(torch.tensor([0.5]))
    assert out.gamma.shape == (3, *SHAPE)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 8, 8), (1, 1, 1)])
def test_decoder_shapes_and_zero_start(decoder, shape):
    dec = build_decoder(ScheduleConfig(decoder=decoder, hidden=8), shape, 4, 3)
    out = dec(torch.randn(2, 4))
    assert out.shape == (2, 3, *shape)
    assert torch.equal(out, torch.zeros_like(out))


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_decoder_parameter_counts():
    cfg = {d: ScheduleConfig(decoder=d, hidden=64) for d in DECODERS}
    n = 3 * 32 * 32
    with torch.device("meta"):
        dense = build_decoder(cfg["dense"], (3, 32, 32), 50, 3)
    # reference size: z -> Dense(n) -> Dense(n) -> 3 Dense(n) heads, about 38M parameters
    assert _count(dense) == 50 * n + n + n * n + n + 3 * (n * n + n)
    assert 37e6 < _count(dense) < 39e6
    conv = build_decoder(cfg["conv"], (3, 32, 32), 50, 3)
    lowrank = build_decoder(cfg["lowrank"], (3, 32, 32), 50, 3)
    assert _count(conv) < 1e6 and _count(lowrank) < 1e6  # far below the ~31M-parameter denoiser
    assert _count(conv) * 30 < _count(dense) and _count(lowrank) * 30 < _count(dense)


def test_subclasses_share_the_interface():
    for kind in KINDS:
        s, _ = make(kind)
        assert isinstance(s, PixelSchedule)
        out = s(torch.rand(2), zs(2))  # Schedule.forward(t, z)
        assert out.gamma.shape == (2, *SHAPE) and math.isfinite(out.gamma.sum().item())
