"""Held-out negative ELBO per image, with S stratified diffusion times per image (SPEC "ELBO (VLB)")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mulan import distributed, rng
from mulan.diffusion import (Diffusion, ELBOTerms, EpsFn, bits_per_dim, diffusion_loss, discrete_recon, encode,
                             gaussian_recon, prior_kl)
from mulan.distributed import World
from mulan.rng import Generator
from mulan.schedules import BoundSchedule


@dataclass
class ELBOResult:
    """Per-image terms (N,) in nats, each averaged over the S time points."""

    recon: Tensor
    prior: Tensor
    diffusion: Tensor
    latent: Tensor
    latent_kl: str  # which latent KL was charged
    time_points: int  # S

    @property
    def total(self) -> Tensor:
        return self.recon + self.prior + self.diffusion + self.latent

    def bpd(self, n: int) -> Tensor:
        """Per-image negative ELBO in bits/dim."""
        return bits_per_dim(self.total, n)


@torch.no_grad()
def elbo_per_image(model: Diffusion, images: Tensor, *, time_points: int = 128, batch_size: int = 256,
                   seed: int = 0, indices: Tensor | None = None,
                   callback: Callable[[int, int], None] | None = None, world: World | None = None) -> ELBOResult:
    """The negative ELBO of every image in ``images`` (N, C, H, W), integers in 0..V-1.

    Each image gets ``time_points`` times t_s = (u + s/S) mod 1, s = 0..S-1, with its own uniform u
    (stratified); every term is averaged over them. Every draw for image i (u, then per time point the
    latent's, the decoder's and the diffusion noise) comes from its own generator seeded by (``seed``,
    ``indices[i]``) (default: i), so an image's bound depends on nothing but the image, the model and the
    seed: not on the batch size, the rank count or the other images. Two models evaluated with the same seed
    see the same times and noise (common random numbers; see ``mulan compare``).

    The model is evaluated as it is (call ``.eval()`` first for the strict latent KL and no dropout). Under
    torchrun the images are sharded over the ranks (``world``, default the job's) and every rank returns all
    results.
    """
    device = model.device
    world = world or distributed.world()
    if time_points < 1:
        raise ValueError(f"time_points must be >= 1, got {time_points}")
    if indices is None:
        indices = torch.arange(images.shape[0])
    sums: dict[str, list[Tensor]] = {"recon": [], "prior": [], "diffusion": [], "latent": []}
    kind = "none"
    done = 0
    for idx, real in world.batches(images.shape[0], batch_size):
        x = images[idx].to(device)
        gen = rng.PerExample.seeded(seed, indices[idx], device)
        u = rng.rand((x.shape[0],), gen, device=device)
        acc = torch.zeros(len(sums), x.shape[0], dtype=torch.float64, device=device)
        for s in range(time_points):
            terms = model.elbo_terms(x, t=torch.remainder(u + s / time_points, 1.0), generator=gen)
            kind = terms.latent_kl
            acc += torch.stack([terms.as_dict()[k].double() for k in sums])
        acc = world.gather((acc / time_points).T.contiguous())[:real].cpu()  # (real, terms)
        for i, k in enumerate(sums):
            sums[k].append(acc[:, i])
        done += real
        if callback is not None:
            callback(done, images.shape[0])
    return ELBOResult(**{k: torch.cat(v) for k, v in sums.items()}, latent_kl=kind, time_points=time_points)


def negative_elbo(x_tilde: Tensor, eps_fn: EpsFn, bound: BoundSchedule, t: Tensor, *, x: Tensor | None = None,
                  num_values: int = 0, timesteps: int = 0, generator: Generator = None) -> ELBOTerms:
    """The negative ELBO's terms (B,) in nats for any denoiser ``eps_fn(x_t, t)`` and schedule ``bound(t)``
    (e.g. ``model.condition(x)``'s, or your own), at diffusion times ``t`` (B,), one noise draw each.

    Returns :class:`~mulan.diffusion.ELBOTerms`, the type :meth:`Diffusion.elbo_terms` returns: ``.recon``,
    ``.prior``, ``.diffusion``, ``.total``. Discrete data: pass the integers ``x`` and ``num_values`` V (VDM's
    discrete decoder; ``x_tilde`` must be their encoding 2 (x + 1/2) / V - 1). Continuous data (``x`` None): the
    Gaussian decoder N(x_tilde; x_0 / alpha_0, exp(gamma_0)), a bound on -log p(x_tilde) as a density. A latent's
    KL is not included (``.latent`` is zero, ``.latent_kl`` 'none'): add ``model.condition(x).latent.kl`` for
    a model with a latent. Average over many ``t`` (e.g. stratified) for the expected bound.
    """
    batch = x_tilde.shape[0]
    zeros = torch.zeros(batch, dtype=x_tilde.dtype, device=x_tilde.device)
    g0, g1 = bound(zeros), bound(zeros + 1.0)
    if x is not None:
        if num_values < 2:
            raise ValueError("discrete data needs num_values >= 2")
        values = encode(torch.arange(num_values, device=x_tilde.device), num_values, x_tilde.dtype)
        recon = discrete_recon(x, x_tilde, g0, values, generator)
    else:
        recon = gaussian_recon(x_tilde, g0, generator)
    return ELBOTerms(recon=recon, prior=prior_kl(x_tilde, g1),
                     diffusion=diffusion_loss(x_tilde, t, bound, lambda x_t, s, g: eps_fn(x_t, s),
                                              timesteps=timesteps, generator=generator),
                     latent=zeros, latent_kl="none")
