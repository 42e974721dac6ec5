"""One harness for every schedule: end points, monotonicity, d gamma/dt against autograd and finite differences."""

from __future__ import annotations

import pytest
import torch

from conftest import perturb
from mulan.config import ScheduleConfig
from mulan.schedules import SCALAR_KINDS, build_schedule

SHAPE = (2, 3, 4)
LATENT = 5
ALL_KINDS = [*SCALAR_KINDS, "polynomial", "pixel_monotone_net", "pixel_sigmoid"]
FIXED_ENDS = {"fixed_linear", "polynomial", "pixel_monotone_net", "pixel_sigmoid"}


def make(kind: str, **kw):
    """A schedule with randomly perturbed parameters (so it is not trivially linear), in float64."""
    torch.manual_seed(1)
    sched = build_schedule(ScheduleConfig(kind=kind, **kw), SHAPE, LATENT).double()
    perturb(sched, 0.3)
    return sched


def z_batch(b: int) -> torch.Tensor:
    return torch.randn(b, LATENT, dtype=torch.float64)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_end_points(kind):
    s, z = make(kind), z_batch(6)
    g0, g1 = s(torch.zeros(6, dtype=torch.float64), z).gamma, s(torch.ones(6, dtype=torch.float64), z).gamma
    if kind in FIXED_ENDS:
        torch.testing.assert_close(g0, torch.full_like(g0, -13.3), rtol=0, atol=1e-6)
        torch.testing.assert_close(g1, torch.full_like(g1, 5.0), rtol=0, atol=1e-6)
    else:  # learned end points: gamma(0) < gamma(1), and the same for every z (scalar, not adaptive)
        assert (g0 < g1).all()
        torch.testing.assert_close(g0, g0[:1].expand_as(g0))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_non_decreasing_on_grid(kind):
    s, z = make(kind), z_batch(3)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    gam = torch.stack([s(t.repeat(3), z).gamma for t in grid])
    assert (gam.diff(dim=0) >= -1e-9).all()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_derivative_matches_autograd_and_finite_differences(kind):
    s, z = make(kind), z_batch(4)
    t = torch.tensor([0.05, 0.3, 0.61, 0.97], dtype=torch.float64, requires_grad=True)
    out = s(t, z)
    # gamma of example b depends on t_b only, so the gradient of the sum gives every d gamma_i/dt_b.
    pix = out.gamma.reshape(4, -1)
    auto = torch.stack([torch.autograd.grad(pix[:, i].sum(), t, retain_graph=True)[0] for i in range(pix.shape[1])], 1)
    torch.testing.assert_close(out.dgamma_dt.reshape(4, -1).expand_as(auto), auto, rtol=1e-6, atol=1e-6)
    h = 1e-5
    with torch.no_grad():
        fd = (s(t + h, z).gamma - s(t - h, z).gamma) / (2 * h)
    torch.testing.assert_close(out.dgamma_dt.detach().expand_as(fd), fd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_shapes(kind):
    s = make(kind)
    out = s(torch.rand(3, dtype=torch.float64), z_batch(3))
    expected = (3, 1, 1, 1) if kind in SCALAR_KINDS else (3, *SHAPE)
    assert out.gamma.shape == out.dgamma_dt.shape == expected
    assert s.per_pixel == (kind not in SCALAR_KINDS)


def test_learned_linear_is_linear_between_its_ends():
    s = make("learned_linear")
    t = torch.rand(5, dtype=torch.float64)
    g = s(t).gamma.flatten()
    g0, g1 = s(torch.zeros(1, dtype=torch.float64)).gamma.item(), s(torch.ones(1, dtype=torch.float64)).gamma.item()
    torch.testing.assert_close(g, g0 + (g1 - g0) * t)
