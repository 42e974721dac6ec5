"""Held-out negative ELBO per image, with S stratified diffusion times per image (SPEC "ELBO (VLB)")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mulan import distributed, rng
from mulan.diffusion import Diffusion, bits_per_dim
from mulan.distributed import World
from mulan.rng import ShardedGenerator


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
                   generator: torch.Generator | None = None,
                   callback: Callable[[int, int], None] | None = None, world: World | None = None) -> ELBOResult:
    """The negative ELBO of every image in ``images`` (N, C, H, W), integers in 0..V-1.

    Each image gets ``time_points`` times t_s = (u + s/S) mod 1, s = 0..S-1, with its own uniform u
    (stratified); every term is averaged over them. The model is evaluated as it is (call ``.eval()``
    first for the strict latent KL and no dropout). Under torchrun the images are sharded over the ranks
    (``world``, default the job's) and every rank returns all results; with R ranks the draws equal those of
    one process with R x ``batch_size``, except in a last, padded batch.
    """
    device = model.device
    world = world or distributed.world()
    sums: dict[str, list[Tensor]] = {"recon": [], "prior": [], "diffusion": [], "latent": []}
    kind = "none"
    done = 0
    for idx, real in world.batches(images.shape[0], batch_size):
        x = images[idx].to(device)
        gen = ShardedGenerator(generator, world.rank, world.size) if world.distributed else generator
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
