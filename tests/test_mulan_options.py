"""Options beyond the paper's MuLAN: learned end points of the per-pixel schedules, the gamma-map input."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import perturb, tiny
from mulan.config import ScheduleConfig
from mulan.diffusion import build_model
from mulan.schedules import build_schedule

SHAPE = (1, 4, 4)


def schedule(learn_ends: str, kind: str = "polynomial", seed: int = 0):
    torch.manual_seed(seed)
    s = build_schedule(ScheduleConfig(kind=kind, decoder="conv", hidden=8, learn_ends=learn_ends), SHAPE, 3)
    perturb(s, 0.5)  # curved per-pixel schedules and ends moved off their start
    return s


@pytest.mark.parametrize("learn_ends", ["scalar", "pixel"])
@pytest.mark.parametrize("kind", ["polynomial", "pixel_sigmoid", "pixel_monotone_net"])
def test_learned_ends_are_exact_and_get_gradients(learn_ends, kind):
    s = schedule(learn_ends, kind)
    z = torch.randn(5, 3)
    at = s.bind(z, 5)
    g0, g1 = at(torch.zeros(5)).gamma, at(torch.ones(5)).gamma
    b, w = s.b.detach(), s.w.detach()
    assert b.shape == (() if learn_ends == "scalar" else SHAPE)
    assert torch.equal(g0, (b + torch.zeros(5, *SHAPE)))  # gamma(0) = b exactly, every pixel, every z
    assert torch.equal(g1, (b + w.abs() + torch.zeros(5, *SHAPE)))  # gamma(1) = b + |w| exactly
    # monotone in between (checked in float64: in float32 the flat stretch near t = 1 rounds to steps of
    # -1e-5 on some CPUs), and the derivative integrates to the learned span
    at64 = copy.deepcopy(s).double().bind(z.double(), 5)
    t = torch.linspace(0, 1, 401, dtype=torch.float64)
    g = torch.stack([at64(torch.full((5,), float(v), dtype=torch.float64)).gamma for v in t])
    assert (g.diff(dim=0) >= -1e-9).all()
    t = t.float()
    dg = torch.stack([at(torch.full((5,), float(v))).dgamma_dt for v in t])
    integral = torch.trapezoid(dg, t, dim=0)
    torch.testing.assert_close(integral, (w.abs() + torch.zeros(5, *SHAPE)), rtol=2e-3, atol=2e-3)
    # gradients reach both ends through the ELBO's pieces (gamma at 0, 1 and in between)
    loss = at(torch.zeros(5)).gamma.sum() + at(torch.ones(5)).gamma.sum() + at(torch.rand(5)).dgamma_dt.sum()
    loss.backward()
    assert s.b.grad is not None and s.b.grad.abs().min() > 0
    assert s.w.grad is not None and s.w.grad.abs().min() > 0


def test_fixed_ends_give_the_spec_formula():
    """With the ends fixed the schedule is SPEC's gamma_min + (gamma_max - gamma_min) P(t)/P(1), from its
    coefficients written out here; learned ends at their initial values give the same numbers."""
    torch.manual_seed(0)
    fixed = schedule("none")
    learned = schedule("scalar")
    learned.load_state_dict({**fixed.state_dict(), "b": torch.tensor(-13.3), "w": torch.tensor(18.3)})
    z, t = torch.randn(4, 3), torch.rand(4)
    a, b_, c_ = (m for m in fixed.decoder(z).unbind(1))
    c = 1e-3 + torch.nn.functional.softplus(c_)
    tt = t.reshape(-1, 1, 1, 1)

    def P(t):
        return a**2 * t**5 / 5 + a * b_ * t**4 / 2 + (b_**2 + 2 * a * c) * t**3 / 3 + b_ * c * t**2 + c**2 * t

    want = -13.3 + 18.3 * P(tt) / P(torch.ones_like(tt))
    torch.testing.assert_close(fixed(t, z).gamma, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(learned(t, z).gamma, fixed(t, z).gamma, rtol=1e-6, atol=1e-5)


def test_learned_ends_train_and_move(tmp_path):
    from mulan.train import train

    cfg = tiny("digits-mulan", "model.schedule.learn_ends=pixel", "train.steps=6", "train.lr=0.05")
    s = train(cfg, tmp_path).model.schedule
    assert (s.b != -13.3).all() and (s.w != 18.3).all()  # the optimiser moved every pixel's ends


def test_gamma_map_with_a_scalar_schedule_is_the_constant_map():
    """Known answer: under a scalar schedule the map is the rescaled gamma everywhere, so the model's eps_hat
    equals the network fed a constant map by hand."""
    model = build_model(tiny("digits-vdm", "model.denoiser.gamma_input=map")).eval()
    perturb(model.denoiser, 0.05)
    x_t = torch.randn(3, 1, 8, 8)
    g = model.schedule.bind(None, 3)(torch.tensor([0.1, 0.5, 0.9]))
    level = (g.gamma.reshape(-1) + 13.3) / 18.3  # gamma rescaled by the configured ends
    by_hand = model.denoiser(x_t, level, None, level.reshape(-1, 1, 1, 1).expand(3, 1, 8, 8))
    torch.testing.assert_close(model.eps_hat(x_t, g, None), by_hand)
    # and the map matters: another map gives another output
    other = model.denoiser(x_t, level, None, torch.zeros(3, 1, 8, 8))
    assert not torch.allclose(other, by_hand)


def test_gamma_map_reaches_a_per_pixel_network():
    model = build_model(tiny("digits-mulan", "model.denoiser.gamma_input=map")).eval()
    assert model.denoiser.conv_in.in_channels == 1 + 2 * 2 * 1 + 1  # x, 2 Fourier frequencies (sin, cos), map
    perturb(model, 0.05)
    x = torch.randint(0, 17, (4, 1, 8, 8))
    terms = model.elbo_terms(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.total).all()
    with pytest.raises(ValueError, match="gamma_map must be given"):
        model.denoiser(torch.randn(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, 8))


def test_position_input_channels_hold_row_and_column():
    """The control option: two channels with each pixel's row and column in [-1, 1], fed to the first conv."""
    model = build_model(tiny("digits-vdm", "model.denoiser.position_input=true")).eval()
    coords = model.denoiser.coords
    assert coords.shape == (1, 2, 8, 8)
    step = 2.0 / 7
    for i in range(8):
        torch.testing.assert_close(coords[0, 0, i], torch.full((8,), -1.0 + step * i))  # row i, every column
        torch.testing.assert_close(coords[0, 1, :, i], torch.full((8,), -1.0 + step * i))  # column i, every row
    assert model.denoiser.conv_in.in_channels == 1 + 2 * 2 + 2
    perturb(model.denoiser, 0.05)
    with torch.no_grad():
        x_t, level = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6])
        out = model.denoiser(x_t, level)
        model.denoiser.coords.zero_()  # without the positions the output changes: the channels are used
        assert not torch.allclose(model.denoiser(x_t, level), out)


def test_schedule_lr_scale_scales_only_the_schedules_steps():
    """Adam's first step moves every parameter with a gradient by lr (|m_hat / sqrt(v_hat)| = 1), plus weight
    decay: with the scale, the schedule's parameters move scale x as far, the others as before."""
    from mulan.train import lr_at, param_groups, train_step

    cfg = tiny("digits-mulan", "train.schedule_lr_scale=10", "train.weight_decay=0", "train.grad_clip=0")
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, weight_decay=0.0)
    for group in opt.param_groups:
        group["lr"] = lr_at(0, cfg) * group["lr_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, torch.randint(0, 17, (8, 1, 8, 8)), generator=torch.Generator().manual_seed(0),
               grad_clip=0.0)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    lr = lr_at(0, cfg)
    schedule = max(v for n, v in moved.items() if n.startswith("schedule."))
    others = max(v for n, v in moved.items() if not n.startswith("schedule."))
    assert abs(schedule - 10 * lr) < 1e-3 * lr and abs(others - lr) < 1e-3 * lr, (schedule / lr, others / lr)


@pytest.mark.parametrize("scale, wd, expected", [(10.0, -1.0, 10 * 0.01), (10.0, 0.001, 10 * 0.001),
                                                  (1.0, 0.1, 0.1), (1.0, 0.0, 0.0)])
def test_schedule_weight_decay_is_its_own_setting(scale, wd, expected):
    """With a zero gradient AdamW only decays: one step multiplies a parameter by 1 - lr x group lr scale x
    group weight decay. The schedule's parameters decay by train.schedule_weight_decay (-1: train.weight_decay)
    at the schedule's learning rate, the others by train.weight_decay at the base rate."""
    from mulan.train import param_groups

    cfg = tiny("digits-vdm", f"train.schedule_lr_scale={scale}", f"train.schedule_weight_decay={wd}",
               "train.weight_decay=0.01")
    model = build_model(cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=0.5, weight_decay=cfg.train.weight_decay)
    for group in opt.param_groups:
        group["lr"] = 0.5 * group.get("lr_scale", 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * (expected if name.startswith("schedule.") else 0.01)
        assert torch.allclose(p.detach(), before[name] * factor, rtol=1e-6, atol=0), name


def test_schedule_weight_decay_out_of_range_is_refused():
    from mulan.errors import ConfigError

    with pytest.raises(ConfigError, match="train.schedule_weight_decay"):
        tiny("digits-vdm", "train.schedule_weight_decay=-0.5")
