"""The auxiliary latent z inferred from the image, and its KL term (SPEC "The auxiliary latent", NELBO item 4).

- ``none``: no latent (VDM, and the "no auxiliary latent" ablation).
- ``khot``: z in {0,1}^m with exactly k ones, prior uniform over the C(m, k) k-hot vectors. Trained with the
  straight-through "identity with projection" estimator of Sahoo et al. (2022): the forward pass uses the
  k-hot vector, the backward pass the Jacobian of "centre and L2-normalise" of the perturbed logits.
- ``gaussian``: z ~ N(mu, diag(var)) by reparameterisation, prior N(0, I), KL in closed form.

Every call reports which KL it charged (``kl_kind``), so reported numbers can say whether they are a bound.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan import rng
from mulan.config import LatentConfig
from mulan.rng import Generator


@dataclass
class LatentOut:
    """z and the KL charged for it."""

    z: Tensor | None  # (B, m) float, None for kind 'none'
    kl: Tensor  # (B,) nats: the KL charged in this call
    kl_kind: str  # 'none' | 'surrogate' | 'strict' | 'analytic'


class Latent(nn.Module, ABC):
    """Base class: ``forward(x_tilde)`` -> :class:`LatentOut`; ``sample_prior`` draws z from p(z)."""

    dim: int = 0  # m (0 for none)

    @abstractmethod
    def forward(self, x_tilde: Tensor, *, strict: bool, generator: Generator = None) -> LatentOut:
        """Infer z from images x_tilde (B, C, H, W) in [-1, 1]. ``strict`` forces a KL that keeps the ELBO a bound."""

    @abstractmethod
    def sample_prior(self, batch: int, *, generator: Generator = None,
                     device: torch.device | str | None = None) -> Tensor | None:
        """``batch`` draws from the prior p(z), (batch, m); None for no latent."""


class ConvEncoder(nn.Module):
    """x_tilde (B, C, H, W) -> (B, out_dim): 3x3 conv, then stride-2 3x3 convs down to about 4x4, swish,
    global average pool, Linear. The number of stride-2 steps is floor(log2(min(H, W) / 4)) (0 for tiny images).
    """

    def __init__(self, shape: tuple[int, int, int], channels: int, out_dim: int):
        super().__init__()
        c, h, w = shape
        n_down = max(0, int(math.floor(math.log2(max(min(h, w), 1) / 4.0))))
        layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1), nn.SiLU()]
        for _ in range(n_down):
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(channels, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.convs(x).mean(dim=(2, 3)))


class NoLatent(Latent):
    """No auxiliary latent: z is None and the KL is 0."""

    dim = 0

    def forward(self, x_tilde: Tensor, *, strict: bool, generator: Generator = None) -> LatentOut:
        return LatentOut(z=None, kl=x_tilde.new_zeros(x_tilde.shape[0]), kl_kind="none")

    def sample_prior(self, batch: int, *, generator: Generator = None,
                     device: torch.device | str | None = None) -> Tensor | None:
        return None


def log_comb(m: int, k: int) -> float:
    """log C(m, k) in nats: the log of the number of k-hot vectors of length m (the strict k-hot latent KL)."""
    return math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1)


def gumbel_noise(shape: tuple[int, ...], generator: Generator, like: Tensor) -> Tensor:
    """Standard Gumbel samples -log(-log U)."""
    u = rng.rand(shape, generator, device=like.device, dtype=like.dtype)
    tiny = torch.finfo(like.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - torch.finfo(like.dtype).eps)))


def sum_of_gamma_noise(shape: tuple[int, ...], k: int, generator: Generator, like: Tensor,
                       terms: int = 10, tau: float = 10.0) -> Tensor:
    """Sum-of-Gamma perturbation for top-k (Niepert et al. 2021), as the reference uses it:
    (tau / k) (sum_{i=1}^{terms} Gamma(1/k, rate k/i) - log terms).
    """
    g = rng.standard_gamma((terms, *shape), 1.0 / k, generator, batch_dim=1, device=like.device,
                           dtype=like.dtype)  # Gamma(1/k, rate 1)
    i = torch.arange(1, terms + 1, device=like.device, dtype=like.dtype).reshape(-1, *([1] * len(shape)))
    return (tau / k) * ((g * i / k).sum(dim=0) - math.log(terms))


def top_k_hot(scores: Tensor, k: int) -> Tensor:
    """Exactly k ones per row at the k largest scores; ties go to the lower index (stable sort)."""
    idx = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


class KHotLatent(Latent):
    """k-hot z from a conv encoder's m logits (SPEC "The auxiliary latent").

    Training: perturb the logits (Gumbel or sum-of-Gamma), centre, soft = centred / ||centred||_2,
    hard = top-k; z = hard + (soft - stop_grad(soft)) -- exactly the k-hot vector forward (no rounding, unlike
    stop_grad(hard - soft) + soft), the projection's Jacobian backward. Evaluation: the same without noise,
    so z = top-k(logits) is deterministic.

    KL to the uniform prior over k-hot vectors:
    - 'surrogate' (training, ``strict=False``, ``cfg.train_kl == 'surrogate'``): the reference's
      KL(softmax(logits) || uniform over m) = log m - H(softmax(logits)) in [0, log m]. Not a bound.
    - 'strict' (otherwise): log C(m, k). KL(q || p) = log C(m, k) - H(q) <= log C(m, k) as H(q) >= 0, so this
      keeps the ELBO a bound; it is exact for the deterministic top-k used at evaluation. Constant: no gradient.
    """

    def __init__(self, cfg: LatentConfig, shape: tuple[int, int, int]):
        super().__init__()
        if not 1 <= cfg.k < cfg.m:
            raise ValueError(f"k-hot latent needs 1 <= k < m, got k={cfg.k}, m={cfg.m}")
        self.dim, self.k = cfg.m, cfg.k
        self.noise, self.train_kl = cfg.noise, cfg.train_kl
        self.encoder = ConvEncoder(shape, cfg.encoder_channels, cfg.m)
        self.log_num_states = log_comb(cfg.m, cfg.k)

    def forward(self, x_tilde: Tensor, *, strict: bool, generator: Generator = None) -> LatentOut:
        logits = self.encoder(x_tilde)
        scores = logits
        if self.training:
            if self.noise == "gumbel":
                scores = logits + gumbel_noise(logits.shape, generator, logits)
            else:
                scores = logits + sum_of_gamma_noise(logits.shape, self.k, generator, logits)
        centred = scores - scores.mean(dim=-1, keepdim=True)
        soft = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        hard = top_k_hot(scores.detach(), self.k)
        z = hard + (soft - soft.detach())  # straight-through: forward hard, backward d soft

        if self.training and not strict and self.train_kl == "surrogate":
            # KL(softmax(l) || U(m)) = sum q (log q + log m), on the noiseless logits (as the reference)
            log_q = F.log_softmax(logits, dim=-1)
            kl = (log_q.exp() * (log_q + math.log(self.dim))).sum(dim=-1)
            return LatentOut(z=z, kl=kl, kl_kind="surrogate")
        kl = logits.new_full((logits.shape[0],), self.log_num_states)
        return LatentOut(z=z, kl=kl, kl_kind="strict")

    def sample_prior(self, batch: int, *, generator: Generator = None,
                     device: torch.device | str | None = None) -> Tensor:
        """Uniform over the C(m, k) k-hot vectors: top-k of i.i.d. Gaussian noise (exchangeable)."""
        device = device if device is not None else self.encoder.out.weight.device
        noise = rng.randn((batch, self.dim), generator, device=device)
        return top_k_hot(noise, self.k).to(self.encoder.out.weight.dtype)


class GaussianLatent(Latent):
    """z = mu + sigma * eps, eps ~ N(0, I), with (mu, log sigma^2) from a conv encoder; prior N(0, I).

    KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1) ('analytic'). z is sampled at
    evaluation too, which gives a stochastic but valid bound. The encoder's last layer starts at 0, so
    q(z|x) starts equal to the prior (KL = 0).
    """

    def __init__(self, cfg: LatentConfig, shape: tuple[int, int, int]):
        super().__init__()
        self.dim = cfg.m
        self.encoder = ConvEncoder(shape, cfg.encoder_channels, 2 * cfg.m)
        with torch.no_grad():
            self.encoder.out.weight.zero_()
            self.encoder.out.bias.zero_()

    def posterior(self, x_tilde: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma^2) of q(z | x), each (B, m)."""
        mu, log_var = self.encoder(x_tilde).chunk(2, dim=-1)
        return mu, log_var.clamp(-30.0, 20.0)

    def forward(self, x_tilde: Tensor, *, strict: bool, generator: Generator = None) -> LatentOut:
        mu, log_var = self.posterior(x_tilde)
        eps = rng.randn(mu.shape, generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * log_var) * eps
        return LatentOut(z=z, kl=self.kl(mu, log_var), kl_kind="analytic")

    @staticmethod
    def kl(mu: Tensor, log_var: Tensor) -> Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1), (B,) nats."""
        return 0.5 * (mu.square() + log_var.exp() - log_var - 1.0).sum(dim=-1)

    def sample_prior(self, batch: int, *, generator: Generator = None,
                     device: torch.device | str | None = None) -> Tensor:
        ref = self.encoder.out.weight
        device = device if device is not None else ref.device
        return rng.randn((batch, self.dim), generator, device=device).to(ref.dtype)


def build_latent(cfg: LatentConfig, shape: tuple[int, int, int]) -> Latent:
    """The latent named by ``cfg.kind`` for images of ``shape`` (C, H, W)."""
    shape = tuple(int(s) for s in shape)
    if cfg.kind == "none":
        return NoLatent()
    if cfg.kind == "khot":
        return KHotLatent(cfg, shape)
    if cfg.kind == "gaussian":
        return GaussianLatent(cfg, shape)
    raise ValueError(f"unknown latent kind {cfg.kind!r}")
