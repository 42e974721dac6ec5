"""The VDM U-Net: shapes, zero output at init, conditioning, gradients, dropout, size, Fourier features."""

from __future__ import annotations

import math

import pytest
import torch

import conftest
from mulan.config import DenoiserConfig
from mulan.errors import ConfigError
from mulan.nn.layers import fourier_features, timestep_embedding
from mulan.nn.unet import UNet

SMALL = dict(channels=16, num_blocks=1, groups=8)


def make(shape=(1, 8, 8), cond_dim=0, perturb=False, seed=0, **overrides) -> UNet:
    torch.manual_seed(seed)
    net = UNet(DenoiserConfig(**{**SMALL, **overrides}), shape, cond_dim)
    if perturb:  # move every parameter off its (partly zero) init so every path carries signal
        conftest.perturb(net, 0.1, seed)
    return net


def inputs(shape=(1, 8, 8), cond_dim=0, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    t = torch.rand(batch, generator=g)
    z = torch.randn(batch, cond_dim, generator=g) if cond_dim else None
    return x, t, z


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 12), (2, 6, 10), (5, 1, 7)])
@pytest.mark.parametrize("cond_dim", [0, 3])
def test_shape_and_zero_output_at_init(shape, cond_dim):
    net = make(shape, cond_dim)
    x, t, z = inputs(shape, cond_dim)
    out = net(x, t, z)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))  # conv_out starts at zero
    assert make(shape, cond_dim, perturb=True)(x, t, z).abs().sum() > 0  # ... and only conv_out's init does that


def test_output_depends_on_time_and_cond():
    net = make((2, 6, 10), cond_dim=4, perturb=True).eval()
    x, t, z = inputs((2, 6, 10), cond_dim=4)
    out = net(x, t, z)
    assert not torch.allclose(out, net(x, 1.0 - t, z), atol=1e-5)
    assert not torch.allclose(out, net(x, t, z + 1.0), atol=1e-5)
    assert not torch.allclose(out, net(x + 0.1, t, z), atol=1e-5)


@pytest.mark.parametrize("perturb", [False, True])
def test_every_parameter_and_cond_get_gradients(perturb):
    # DDP (find_unused_parameters=False) needs every parameter in the graph, even at init
    net = make((3, 6, 6), cond_dim=4, perturb=perturb, attention=True)
    x, t, z = inputs((3, 6, 6), cond_dim=4)
    z.requires_grad_(True)
    net(x, t, z).square().sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    if perturb:
        zero = [name for name, p in net.named_parameters() if p.grad.abs().sum() == 0]
        assert not zero, f"parameters with an all-zero gradient: {zero}"
        assert z.grad is not None and z.grad.abs().sum() > 0


def test_eval_is_deterministic_and_train_dropout_is_not():
    net = make(perturb=True, dropout=0.5)
    x, t, _ = inputs()
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.allclose(net(x, t), net(x, t))
    no_dropout = make(perturb=True, dropout=0.0).train()
    assert torch.equal(no_dropout(x, t), no_dropout.eval()(x, t))


def test_examples_are_independent_of_the_batch():
    net = make((2, 6, 10), cond_dim=3, perturb=True).eval()
    x, t, z = inputs((2, 6, 10), cond_dim=3, batch=4)
    whole = net(x, t, z)
    alone = torch.cat([net(x[i : i + 1], t[i : i + 1], z[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=1e-4)


def test_a_float64_net_keeps_z_in_float64():
    """A change of z far below float32's resolution still moves a float64 net's output, by what its
    derivative along that change predicts (cast to float32, z + 1e-9 would be z exactly)."""
    net = make(cond_dim=3, perturb=True, attention=False).double().eval()  # (forward-mode AD has no CPU attention)
    x, t, z = (v.double() for v in inputs(cond_dim=3))
    z = 0.5 + z.abs()  # |z| >= 0.5: a float32 ulp there is >= 6e-8
    dz = torch.full_like(z, 1e-9)
    out = net(x, t, z)
    moved = net(x, t, z + dz) - out
    _, slope = torch.func.jvp(lambda c: net(x, t, c), (z,), (dz,))
    assert out.dtype == torch.float64 and moved.abs().max() > 0
    # the difference of two float64 outputs carries a few ulps of |out| of rounding (measured: 5-7 over six seeds),
    # four orders of magnitude below the slope (~1e-10)
    rounding = 32 * torch.finfo(torch.float64).eps * float(out.detach().abs().max())
    torch.testing.assert_close(moved, slope, rtol=1e-3, atol=rounding)


def test_channels_last_and_bf16_autocast_agree():
    net = make((3, 8, 10), perturb=True).eval()
    x, t, _ = inputs((3, 8, 10))
    ref = net(x, t)
    torch.testing.assert_close(net(x.to(memory_format=torch.channels_last), t), ref, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_paper_size_parameter_count():
    # SPEC: VDM's CIFAR-10 denoiser (128 channels, 32 blocks) has about 31M parameters
    with torch.device("meta"):
        net = UNet(DenoiserConfig(channels=128, num_blocks=32, attention=True), (3, 32, 32))
    count = sum(p.numel() for p in net.parameters())
    assert 28e6 < count < 34e6, count


def test_attention_adds_its_known_parameter_count():
    c = SMALL["channels"]
    with_attn = sum(p.numel() for p in make(attention=True).parameters())
    without = sum(p.numel() for p in make(attention=False).parameters())
    assert with_attn - without == 4 * c * c + 6 * c  # GroupNorm 2C, qkv 3C^2 + 3C, proj_out C^2 + C


@pytest.mark.parametrize("lo, hi, c", [(6, 7, 3), (6, 5, 3), (0, 3, 2), (6, 6, 1)])
def test_fourier_input_channels(lo, hi, c):
    net = make((c, 4, 4), fourier_min=lo, fourier_max=hi)
    expected = c if hi < lo else c * (1 + 2 * (hi - lo + 1))
    assert net.conv_in.in_channels == expected
    x, t, _ = inputs((c, 4, 4))
    assert net(x, t).shape == x.shape


def test_fourier_features_values():
    x = torch.randn(2, 3, 4, 5)
    feats = fourier_features(x, 1, 1)  # frequency 2^1 * 2 pi
    torch.testing.assert_close(feats, torch.cat([x, torch.sin(4 * math.pi * x), torch.cos(4 * math.pi * x)], 1))
    # x on the grid k / 2^n_min completes whole periods at every frequency: sin = 0, cos = 1
    grid = torch.arange(-64, 65, dtype=torch.float32).reshape(1, 1, 1, -1) / 64
    feats = fourier_features(grid, 6, 7)
    torch.testing.assert_close(feats[:, 1:3], torch.zeros(1, 2, 1, 129), atol=2e-4, rtol=0)
    torch.testing.assert_close(feats[:, 3:5], torch.ones(1, 2, 1, 129))
    assert fourier_features(x, 3, 2) is x


def test_timestep_embedding():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (3, 7) and torch.equal(emb[:, -1], torch.zeros(3))  # odd width: zero pad
    torch.testing.assert_close(emb[0, :6], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    # the first frequency is 1 on the time scale t * 1000, the last 1 / 10000
    torch.testing.assert_close(emb[1, [0, 2]], torch.tensor([math.sin(500.0), math.sin(0.05)]))


def test_bad_inputs_raise():
    with pytest.raises(ConfigError):
        UNet(DenoiserConfig(channels=12, groups=8), (1, 8, 8))
    net = make(cond_dim=2)
    x, t, z = inputs(cond_dim=2)
    with pytest.raises(ValueError):
        net(x, t)  # cond missing
    with pytest.raises(ValueError):
        net(x[:, :, :4], t, z)  # wrong image shape
    with pytest.raises(ValueError):
        make()(x, t, z)  # cond given to an unconditional net
