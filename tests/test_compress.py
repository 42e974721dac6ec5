"""Lossless compression by bits-back coding: exact round trips, the coder's pieces, and the coded size against
the bound (the command line and its refusals: test_compress_cli.py)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from conftest import iid_denoiser, model_that_matters, tiny
from conftest import run_here as cli
from mulan.checkpoint import save_checkpoint
from mulan.coding import latents
from mulan.coding.ans import CodingError, Stack
from mulan.coding.codec import decode, encode, initial_message
from mulan.coding.schedule import Plan, in_flight
from mulan.coding.transitions import Gaussian
from mulan.data import load_splits
from mulan.likelihood.elbo import negative_elbo


def random_model(preset: str, *overrides: str, scale: float = 0.05, seed: int = 0):
    """A tiny model whose every layer matters (conftest's ``model_that_matters``), and its whole config."""
    return model_that_matters(preset, *overrides, scale=scale, seed=seed), tiny(preset, *overrides)


def round_trip(model, images, *, timesteps, batch, seed_images=1, budget=0.0, initial_words=4096):
    plan = Plan(chains=images.shape[0] - seed_images, timesteps=timesteps, batch=batch, budget=budget,
                need=300.0, gain=200.0, grid_bits=3, pixels=model.n)
    kw = dict(seed_images=seed_images, seed=5, initial_words=initial_words)
    enc = encode(model, images, plan, **kw)
    out = decode(model, enc.words, enc.shared_words, plan, shape=tuple(images.shape[1:]), count=images.shape[0], **kw)
    return enc, out, plan, kw


# --- exact round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, overrides, batch", [
    ("digits-vdm", (), 1),  # scalar learned schedule, no latent, one chain at a time
    ("digits-mulan", (), 2),  # per-pixel polynomial schedule, k-hot latent
    ("digits-mulan-no-latent", (), 3),  # per-pixel schedule, no latent
    ("digits-mulan", ("model.latent.kind=gaussian",), 7),  # Gaussian latent by bits-back; batch > images
])
def test_round_trip_is_exact_and_keeps_the_order(preset, overrides, batch):
    model, cfg = random_model(preset, *overrides)
    images = torch.randint(0, cfg.data.num_values, (6, *cfg.data.shape), dtype=torch.uint8)
    images[2] = images[3]  # neighbours one pixel apart: swapping or mixing up two chains would show
    images[3, 0, 0, 0] = (int(images[3, 0, 0, 0]) + 1) % cfg.data.num_values
    enc, out, plan, kw = round_trip(model, images, timesteps=4, batch=batch)
    assert torch.equal(out, images)
    assert int(np.diff(plan.starts()).min()) >= 0 and plan.ticks() >= plan.length

    # the network matters: the same stream decoded by a model with one weight changed is not the images
    other, _ = random_model(preset, *overrides)
    with torch.no_grad():
        other.denoiser.conv_out.weight.view(-1)[0] += 0.5
    try:
        wrong = decode(other, enc.words, enc.shared_words, plan, shape=tuple(images.shape[1:]),
                       count=images.shape[0], **kw)
    except CodingError:
        return
    assert not torch.equal(wrong, images)


def test_round_trip_when_the_initial_message_runs_dry():
    model, cfg = random_model("digits-mulan")
    images = torch.randint(0, cfg.data.num_values, (4, *cfg.data.shape), dtype=torch.uint8)
    enc, out, _, _ = round_trip(model, images, timesteps=3, batch=4, seed_images=0, budget=1e9, initial_words=2)
    assert torch.equal(out, images)


# --- the pieces ----------------------------------------------------------------------------------------------

def test_plan_starts_chains_as_the_stack_allows():
    # length T + 2 = 3; a chain starts alone, or when the needs in flight plus its own fit in
    # budget + finished * gain; need(k) = need + 2 n k
    def plan(**kw):
        return Plan(**{"chains": 3, "timesteps": 1, "batch": 2, "budget": 0.0, "need": 10.0, "gain": 10.0,
                       "grid_bits": 0, "pixels": 1, **kw})

    assert plan().starts().tolist() == [0, 3, 6]
    assert plan(gain=20.0).starts().tolist() == [0, 3, 3]
    assert plan(chains=5, budget=1e9).starts().tolist() == [0, 0, 3, 3, 6]
    # alone, a chain takes the finest grid the stack covers: need(k) = 10, 14, 18 for k = 0, 1, 2
    starts, bits = plan(batch=1, gain=15.0, grid_bits=2, pixels=2).layout()
    assert starts.tolist() == [0, 3, 6] and bits.tolist() == [0, 1, 2]
    # with others in flight, only at the finest grid
    starts, bits = plan(chains=4, batch=3, budget=40.0, grid_bits=2, pixels=2).layout()
    assert starts.tolist() == [0, 0, 3, 3] and bits.tolist() == [2, 2, 2, 2]
    plan = Plan(chains=40, timesteps=5, batch=4, budget=50.0, need=30.0, gain=12.0, grid_bits=3, pixels=2)
    starts = plan.starts()
    for tau in range(plan.ticks()):
        lo, hi = in_flight(starts, plan.length, tau)
        assert hi - lo <= 4
        assert all(starts[c] <= tau < starts[c] + plan.length for c in range(lo, hi))


def test_khot_latent_costs_exactly_log2_binomial():
    m, k, rows = 50, 15, 40  # C(50, 15) > 2^32: no integer index is ever formed
    gen = torch.Generator().manual_seed(0)
    z = torch.zeros(rows, m)
    for r in range(rows):
        z[r, torch.randperm(m, generator=gen)[:k]] = 1.0
    stack = Stack(initial_message(0, 64))
    before = stack.bits
    latents.push_khot(stack, z, k)
    spent = stack.bits - before
    assert abs(spent - rows * math.log2(math.comb(m, k))) < 1.0 + 1e-4 * spent
    assert torch.equal(latents.pop_khot(stack, rows, m, k), z)
    assert stack.bits == before


def test_escaped_push_takes_any_value_back():
    stack = Stack(initial_message(1, 64))
    g = Gaussian(torch.zeros(5, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64))
    j = torch.tensor([0, 15, -16, 10**7, -(10**9)])  # inside, at and far beyond the +-8 std range
    before = stack.bits
    stack.push_gaussian_escaped(j, g)
    assert torch.equal(stack.pop_gaussian_escaped(g), j)
    assert stack.bits == before


def test_draws_follow_the_distribution_even_from_dirty_bits():
    """Pops read bits that pushes under a mismatched model just wrote; the draws must still be N(mean, std)."""
    gen = torch.Generator().manual_seed(0)
    stack = Stack(initial_message(2, 4096))
    n, draws = 512, []
    for _ in range(40):
        truth = Gaussian(torch.zeros(n, dtype=torch.float64), torch.full((n,), 8.0, dtype=torch.float64))
        j = stack.pop_gaussian(truth)
        draws.append(((j - truth.mean) / truth.std).flatten())
        # push values drawn from N(1.5, 8^2) under N(0, 4^2): their codes are far from uniform bits
        wrong = Gaussian(torch.zeros(n, dtype=torch.float64), torch.full((n,), 4.0, dtype=torch.float64))
        stack.push_gaussian_escaped(torch.round(12.0 + 8.0 * torch.randn(n, generator=gen, dtype=torch.float64)).long(),
                                    wrong)
    u = torch.cat(draws)
    # a N(0, 1) sample of 20480: mean within 4 / sqrt(n), variance within 4 sqrt(2 / n) (+ 1/12 of a bin)
    assert abs(float(u.mean())) < 4 / math.sqrt(u.numel())
    assert abs(float(u.var()) - 1.0 - 1.0 / (12 * 64)) < 4 * math.sqrt(2.0 / u.numel())


# --- the coded size against the bound ------------------------------------------------------------------------

def coded_and_bound(model, *, images: int, timesteps: int, seed: int) -> tuple[float, dict[str, float]]:
    """(coded nats, the bound's terms in nats) for ``images`` random images coded by bits-back at T steps.

    The bound comes from diffusion.py (``negative_elbo`` at ``timesteps=T``, every step 4 times, plus the
    model's strict latent KL), never from the coder."""
    T, V = timesteps, model.num_values
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (images, *model.shape), generator=gen, dtype=torch.uint8)
    terms = {"recon": 0.0, "prior": 0.0, "diffusion": 0.0}
    with torch.no_grad():
        cond = model.condition(x)
        x_tilde = model.encode(x)
        draws = 4
        for _ in range(draws):
            for i in range(1, T + 1):
                t = torch.full((images,), (i - 0.5) / T)
                out = negative_elbo(x_tilde, cond.eps_fn, cond.bound, t, x=x, num_values=V, timesteps=T,
                                    generator=gen)
                for k in terms:
                    terms[k] += float(getattr(out, k).sum()) / (T * draws)
        terms["latent"] = float(cond.latent.kl.sum())
    plan = Plan(chains=images, timesteps=T, batch=images, budget=1e9, need=1.0, gain=1.0, grid_bits=4, pixels=model.n)
    enc = encode(model, x, plan, seed_images=0, seed=seed, initial_words=1 << 16)
    return enc.net_bits * math.log(2.0), terms


# Three models coded at T = 20 over 1024 images of 4x4 pixels uniform over V = 5 values, each with the exact
# denoiser: name -> (preset, overrides), and the tolerance on |coded - bound| / bound.
# - 'vdm': VDM's schedule from gamma(0) = -13.3: the decoder term is ~0 and there is no latent (diffusion 100%).
# - 'decoder': a fixed linear schedule from gamma(0) = -3, where the discrete decoder p(x | x_0) holds 38% of the
#   bound (diffusion 62%).
# - 'khot': MuLAN's per-pixel schedule with its k-hot latent (m = 8, k = 2: log2 C(8, 2) = 4.8 bits per image,
#   7.4% of the bound; diffusion 93%).
# The coded length is one importance sample of the bound. Measured over seeds 0..23 (images, the bound's draws
# and the initial message all from the seed: coded_and_bound(size_model(name), images=1024, timesteps=20,
# seed=s), one thread, 2026-12-03), (coded - bound) / bound had mean -0.07%, sd 0.63% (vdm); -0.02%, sd 0.30% (decoder); -0.33%, sd 0.56% (khot); the largest
# |deviation| of the 72 was 1.43%. sqrt(2 L_diff) (each reverse step's log-ratio has variance 2 KL) predicts
# 0.68%, 0.66%, 0.63%. The tolerance is 4 measured sd, rounded up. A bound that is 5% too large in its diffusion
# term (weight x1.05 in diffusion.py) moves the three by -4.8%, -3.1%, -4.6%; a decoder that pushes nothing
# by -38%, a latent that is not pushed by -7.4%: each fails here.
SIZE_MODELS = {
    "vdm": (("digits-vdm",), 0.025),
    "decoder": (("digits-vdm", "model.schedule.kind=fixed_linear", "model.schedule.gamma_min=-3.0"), 0.012),
    "khot": (("digits-mulan",), 0.023),
}


def size_model(name: str):
    (preset, *overrides), _ = SIZE_MODELS[name]
    model, _ = random_model(preset, *overrides, "data.shape=(1,4,4)", "data.num_values=5", scale=0.0)
    model.eps_hat = partial(iid_denoiser(torch.zeros(model.num_values)), model)  # pixels uniform over 0..V-1
    return model


@pytest.mark.parametrize("name", list(SIZE_MODELS))
def test_coded_size_matches_the_discrete_time_bound(name):
    """The coded length of bits-back over the T-step chain is the T-step negative ELBO, within the coding noise
    (see SIZE_MODELS), for a model whose cost is all diffusion, one with a real decoder term, one with a latent."""
    model = size_model(name)
    coded, terms = coded_and_bound(model, images=1024, timesteps=20, seed=0)
    bound = sum(terms.values())
    assert bound > 1024 * 16 * math.log(5)  # the bound bounds the true -log p = n log V of these images
    assert abs(coded - bound) < SIZE_MODELS[name][1] * bound, ((coded - bound) / bound, terms)


# --- the command line (more in test_compress_cli.py) ---------------------------------------------------------

FAST = ("--timesteps", "3", "--limit", "6", "--no-progress")


def test_a_vdm_checkpoint_and_its_export_decode_the_same_file(tmp_path, capsys):
    """Scalar (0-dim) weights are hashed too, and the hash does not depend on the container."""
    from mulan.export import export

    model, cfg = random_model("digits-vdm", scale=0.02)
    sd = model.state_dict()
    assert any(v.dim() == 0 for v in sd.values())  # learned_linear's end points
    save_checkpoint(tmp_path / "vdm.pt", {"config": cfg, "ema": sd, "model": sd, "step": 0})
    export(tmp_path / "vdm.pt", tmp_path / "vdm.safetensors")
    out = tmp_path / "x.mlz"
    assert cli(capsys, "compress", str(tmp_path / "vdm.pt"), "--out", str(out), *FAST).returncode == 0
    proc = cli(capsys, "decompress", str(tmp_path / "vdm.safetensors"), str(out), "--out", str(tmp_path / "x.npz"),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "x.npz")["images"]), load_splits(cfg.data)[1].images[:6])
