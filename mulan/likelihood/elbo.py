"""Held-out negative ELBO per image, with S stratified diffusion times per image (SPEC "ELBO (VLB)")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mulan.diffusion import Diffusion, bits_per_dim


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
                   callback: Callable[[int, int], None] | None = None) -> ELBOResult:
    """The negative ELBO of every image in ``images`` (N, C, H, W), integers in 0..V-1.

    Each image gets ``time_points`` times t_s = (u + s/S) mod 1, s = 0..S-1, with its own uniform u
    (stratified); every term is averaged over them. The model is evaluated as it is (call ``.eval()``
    first for the strict latent KL and no dropout).
    """
    device = model.device
    sums: dict[str, list[Tensor]] = {"recon": [], "prior": [], "diffusion": [], "latent": []}
    kind = "none"
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        u = torch.rand(x.shape[0], generator=generator, device=device)
        acc = {k: torch.zeros(x.shape[0], dtype=torch.float64, device=device) for k in sums}
        for s in range(time_points):
            terms = model.elbo_terms(x, t=torch.remainder(u + s / time_points, 1.0), generator=generator)
            kind = terms.latent_kl
            for k, v in terms.as_dict().items():
                acc[k] += v.double()
        for k in sums:
            sums[k].append((acc[k] / time_points).cpu())
        if callback is not None:
            callback(min(start + batch_size, images.shape[0]), images.shape[0])
    return ELBOResult(**{k: torch.cat(v) for k, v in sums.items()}, latent_kl=kind, time_points=time_points)
