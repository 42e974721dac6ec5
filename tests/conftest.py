"""Shared fixtures: tiny configurations that train in seconds on a CPU."""

from __future__ import annotations

import subprocess

import pytest
import torch

from mulan.config import Config, apply_overrides
from mulan.diffusion import Diffusion, build_model
from mulan.presets import get_preset

TINY = [
    "model.denoiser.channels=16", "model.denoiser.num_blocks=1", "model.denoiser.groups=4",
    "model.denoiser.dropout=0.0", "train.steps=3", "train.batch_size=16", "train.warmup_steps=1",
    "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=0", "eval.time_points=2",
    "eval.sample_steps=4", "eval.num_samples=4", "eval.batch_size=64", "data.limit=64",
    "train.threads=1",  # tests run two at a time on two cores: more threads would oversubscribe them
]


def tiny(preset: str = "digits-vdm", *extra: str) -> Config:
    """A preset shrunk to a tiny denoiser and a few steps."""
    return apply_overrides(get_preset(preset), [*TINY, *extra])


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initialisation (the denoiser's output layer and MuLAN's schedule heads start
    at zero, so an untrained model ignores its input and z): a network that matters, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def model_that_matters(preset: str = "digits-vdm", *extra: str, scale: float = 0.05, seed: int = 0) -> Diffusion:
    """The tiny model of ``preset`` (with ``extra`` overrides), initialised from ``seed`` and then perturbed from
    it (:func:`perturb`), in eval mode: every layer, output layers and schedule heads included, matters."""
    torch.manual_seed(seed)
    return perturb(build_model(tiny(preset, *extra)), scale, seed).eval()


def iid_denoiser(log_prior: torch.Tensor):
    """``eps_hat(model, x_t, g, z)``: the exact denoiser E[eps | x_t] for images whose pixels are i.i.d. over the
    V values with log-probabilities ``log_prior`` (V,), for any schedule (scalar or per pixel); ignores z. With it
    the only model left is the schedule, the Gaussian reverse steps, the discrete decoder and the latent."""

    def eps_hat(model, x_t, g, z):
        values = model.encode(torch.arange(model.num_values, device=x_t.device)).to(x_t.dtype)
        a, s = g.alpha2.sqrt().unsqueeze(-1), g.sigma2.sqrt().unsqueeze(-1)
        logits = log_prior.to(x_t) - 0.5 * ((x_t.unsqueeze(-1) - a * values) / s).square()
        w = torch.softmax(logits, dim=-1)
        return (x_t - a.squeeze(-1) * (w * values).sum(-1)) / s.squeeze(-1)

    return eps_hat


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command line's entry point in this process (fast), with its exit code and captured output."""
    from mulan.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)
