"""The pipeline's numbers, estimated before coding: bits per image, bits a chain in flight needs, seed images.

- ``gain``: bits a finished chain leaves on the stack, about its negative ELBO at T steps; estimated with a
  few time points per image (``negative_elbo`` at ``timesteps=T``) plus the latent's cost, then lowered by
  10% so the pipeline rarely outruns the stack.
- ``need``: the most a chain on grids 2^0 of its standard deviations borrows at once,
  max_i (H(x_{i-1}) + H(x_i)) over its steps, where H(x_i) is the entropy of q(x_i | .) on x_i's grid;
  computed from one image's schedule (the grid is set relative to each step's standard deviations, so
  every image's need is close to it). Each grid bit adds 2n.
- ``seed_images``: the first chain (on the coarsest grid, k = 0) must borrow ``need`` bits; pushing M
  images first under the uniform distribution puts M n log2 V bits on the stack for M (n log2 V - gain)
  bits more than bits-back would have cost them. M minimises M (n log2 V - gain) + max(0, need - M n log2 V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mulan.coding import transitions as tr
from mulan.diffusion import Diffusion
from mulan.likelihood.elbo import negative_elbo

GAIN_MARGIN = 0.9  # plan with 90% of the estimated bits per image
TIME_POINTS = 4  # per image, for the gain estimate


@dataclass
class Estimates:
    gain: float  # bits per image, estimated (with the margin)
    bits_per_image: float  # bits per image, estimated (without it)
    need: float  # bits a chain in flight on grids 2^0 borrows at most
    seed_images: int  # images to push uniformly first


@torch.no_grad()
def bits_per_image(model: Diffusion, images: Tensor, timesteps: int, *, batch: int = 256,
                   generator: torch.Generator | None = None) -> float:
    """Mean negative ELBO at T steps in bits over ``images`` (a few stratified times each), latent included."""
    total, count = 0.0, 0
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch].to(model.device)
        cond = model.condition(x, generator=generator)
        x_tilde = model.encode(x)
        for s in range(TIME_POINTS):
            u = torch.rand((), generator=generator).item()
            t = torch.remainder(u + torch.arange(x.shape[0], device=model.device) / x.shape[0] + s / TIME_POINTS,
                                1.0).to(model.dtype)
            terms = negative_elbo(x_tilde, cond.eps_fn, cond.bound, t, x=x, num_values=model.num_values,
                                  timesteps=timesteps, generator=generator)
            terms = terms.as_dict() if hasattr(terms, "as_dict") else terms  # ELBOTerms or a dict of terms
            total += float(sum(v.double().sum() for v in terms.values())) / TIME_POINTS
        total += float(cond.latent.kl.double().sum())
        count += x.shape[0]
    return total / max(count, 1) / math.log(2.0)


@torch.no_grad()
def chain_need(model: Diffusion, image: Tensor, timesteps: int, grid_bits: int) -> float:
    """max_i (H(x_{i-1}) + H(x_i)) in bits for one image's chain (its z, its schedule)."""
    T = timesteps
    cond = model.condition(image[None].to(model.device))
    z = cond.z
    t = (torch.arange(T + 1, dtype=torch.float64) / T).to(model.dtype).to(model.device)
    bound = model.condition(z=None if z is None else z.expand(T + 1, -1), batch=T + 1).bound
    g = bound(t).gamma.to("cpu", torch.float64).expand(T + 1, *model.shape)
    g_prev = torch.cat([g[:1], g[:-1]])
    g_next = torch.cat([g[1:], g[-1:]])
    first = (torch.arange(T + 1) == 0).reshape(-1, 1, 1, 1)
    last = (torch.arange(T + 1) == T).reshape(-1, 1, 1, 1)
    width = tr.grid_width(g_prev, g, g_next, grid_bits, first=first, last=last)
    entropy = tr.gaussian_entropy_bits(tr.forward_std(g_prev, g, first) / width).flatten(1).sum(1)
    pairs = entropy[:-1] + entropy[1:]
    return float(pairs.max())


def choose_seed_images(count: int, n: int, num_values: int, bits: float, need: float) -> int:
    """The number of images to push uniformly first (see the module docstring)."""
    uniform = n * math.log2(num_values)

    def cost(m: int) -> float:
        return m * (uniform - bits) + max(0.0, need - m * uniform)

    best = min(range(0, max(1, count)), key=cost)  # at least one image is coded by bits-back
    return best


def estimate(model: Diffusion, images: Tensor, timesteps: int, *,
             generator: torch.Generator | None = None) -> Estimates:
    """All of the above for coding ``images`` at T steps."""
    bits = bits_per_image(model, images, timesteps, generator=generator)
    need = chain_need(model, images[0], timesteps, 0)
    seed = choose_seed_images(images.shape[0], model.n, model.num_values, bits, need)
    return Estimates(gain=GAIN_MARGIN * max(bits, 1.0), bits_per_image=bits, need=need, seed_images=seed)


