"""Where the bits go: per term, what the coder spent and what an ideal coder would spend on the same chain.

Three views of one coded file, all in bits:

- ``coded``: the ANS stack's growth over each group of operations (exact, from the coder).
- ``ideal``: for the same symbols, -log2 of the exact Gaussian mass of each bin (or the decoder's exact
  probability): what a coder of infinite precision would write for the same chain. ``coded - ideal`` is
  the coder's own overhead (24-bit quantization, truncated ranges, the leaky floor, the 64-bit state).
- ``expected``: the chain's Rao-Blackwellised bound along the coded path: recon -log2 p(x | x_0) at the
  coded x_0, sum_i KL(q(x_{i-1} | x_i, x) || p(x_{i-1} | x_i)) at the coded x_i, the prior's KL in closed
  form and the latent's cost. Its expectation is the discrete-time negative ELBO; ``ideal - expected`` is
  the chain's sampling noise, with variance sum_i 2 KL_i (``noise_var``, nats^2, per image).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mulan.coding.transitions import Gaussian

LN2 = math.log(2.0)
CODED_TERMS = ("seed", "latent", "decoder", "draws", "reverse", "prior")
"""Groups of operations: uniform seed images, z, push x under p(x | x_0), pops of x_0..x_T, pushes of
x_0..x_{T-1} under the reverse steps, push of x_T under N(0, I)."""


def bin_bits(j: Tensor, g: Gaussian) -> Tensor:
    """-log2 of the mass N(mean, std^2) puts on [j - 1/2, j + 1/2], per element (float64, untruncated)."""
    u = (j.to(torch.float64) - g.mean) / g.std
    h = 0.5 / g.std
    # mass on the side of the mean the bin is on, so the difference never cancels catastrophically
    a = -torch.abs(u) - h
    b = -torch.abs(u) + h
    mass = torch.special.ndtr(b) - torch.special.ndtr(a)
    log_mass = torch.where(mass > 1e-300, torch.log(mass.clamp_min(1e-300)),
                           torch.special.log_ndtr(b) + torch.log(-torch.expm1(torch.special.log_ndtr(a)
                                                                                - torch.special.log_ndtr(b))))
    return -log_mass / LN2


@dataclass
class Ledger:
    """Per-term totals of the coded, ideal and expected bits, and per-image ideal/expected sums."""

    images: int
    coded: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    ideal: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    expected: dict[str, Tensor] = field(default_factory=dict)  # term -> (images,) bits
    ideal_per_image: Tensor | None = None
    noise_var: Tensor | None = None  # (images,) nats^2

    def __post_init__(self):
        self.ideal_per_image = torch.zeros(self.images, dtype=torch.float64)
        self.noise_var = torch.zeros(self.images, dtype=torch.float64)
        for term in ("recon", "diffusion", "prior", "latent"):
            self.expected[term] = torch.zeros(self.images, dtype=torch.float64)

    def spend(self, term: str, bits: int) -> None:
        """The coder's stack grew by ``bits`` (negative: shrank) over a group of ``term`` operations."""
        self.coded[term] += bits

    def charge(self, term: str, images: Tensor, bits: Tensor, sign: float = 1.0) -> None:
        """Ideal bits (per element, rows = ``images``) for ``term``; sign -1 for pops."""
        if bits.numel() == 0:
            return
        per_image = sign * bits.reshape(bits.shape[0], -1).to(torch.float64).sum(1)
        self.ideal[term] += float(per_image.sum())
        self.ideal_per_image.index_add_(0, images, per_image)

    def expect(self, term: str, images: Tensor, bits: Tensor) -> None:
        """Expected bits (B,) of ``term`` for ``images``."""
        self.expected[term].index_add_(0, images, bits.to(torch.float64))

    def step_noise(self, images: Tensor, kl_nats: Tensor) -> None:
        """A reverse step with KL (B,) nats adds 2 KL to the variance of the coded length."""
        self.noise_var.index_add_(0, images, 2.0 * kl_nats.to(torch.float64))

    def summary(self) -> dict:
        """Plain numbers for reports."""
        return {
            "coded_bits": dict(self.coded), "ideal_bits": dict(self.ideal),
            "expected_bits": {k: float(v.sum()) for k, v in self.expected.items()},
            "noise_std_bits": math.sqrt(float(self.noise_var.sum())) / LN2,
        }
