"""Coding the auxiliary latent z (SPEC "The auxiliary latent").

- k-hot: at evaluation z is the deterministic top-k of the encoder's logits, so q(z | x) is a point mass
  and KL(q || p) = log C(m, k) exactly. z is pushed under its uniform prior as m binary decisions
  "position p is on" with probability (ones left) / (positions left); their product is 1 / C(m, k), so the
  cost is log2 C(m, k) bits for any m, k (no integer of C(m, k) states is ever formed, so C(50, 15) > 2^32
  needs no splitting).
- Gaussian: bits-back on a fixed grid of width 2^-GRID_BITS: pop z ~ q(z | x) = N(mu, sigma^2), push it
  under the prior N(0, I) on the same grid; the expected net length is KL(q(z | x) || N(0, I)) when the grid
  is fine next to sigma. The grid is fixed (not relative to sigma) because the decoder pops z under the
  prior before it knows x.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mulan.coding.ans import Stack
from mulan.coding.transitions import Gaussian
from mulan.latent import log_comb

GRID_BITS = 10  # Gaussian latent: grid width 2^-10 (the prior N(0, 1) spans ~2^10 bins per std)


def khot_decision_probs(ones_left: Tensor, positions_left: int) -> Tensor:
    """(B, 2) probabilities of (off, on) for the next position: on with (ones left) / (positions left)."""
    p_on = ones_left.to(torch.float64) / positions_left
    return torch.stack([1.0 - p_on, p_on], dim=1)


def push_khot(stack: Stack, z: Tensor, k: int) -> None:
    """Push k-hot rows z (B, m) under the uniform prior over k-hot vectors: log2 C(m, k) bits each."""
    if z.shape[0] == 0:
        return
    bits = z.round().to(torch.int64)
    m = bits.shape[1]
    probs, ones_left = [], torch.full((bits.shape[0],), k, dtype=torch.int64)
    for p in range(m):  # position-major, so the decoder pops one position of every row per call
        probs.append(khot_decision_probs(ones_left, m - p))
        ones_left = ones_left - bits[:, p]
    stack.push_categorical(bits.T.reshape(-1), torch.cat(probs))


def pop_khot(stack: Stack, batch: int, m: int, k: int) -> Tensor:
    """Inverse of :func:`push_khot`: (batch, m) float k-hot rows."""
    z = torch.zeros(batch, m, dtype=torch.int64)
    ones_left = torch.full((batch,), k, dtype=torch.int64)
    if batch == 0:
        return z.float()
    for p in range(m):
        z[:, p] = stack.pop_categorical(khot_decision_probs(ones_left, m - p))
        ones_left = ones_left - z[:, p]
    return z.float()


def log2_khot_states(m: int, k: int) -> float:
    """log2 C(m, k): the bits a k-hot z costs (the model's strict latent KL, ``mulan.latent.log_comb``, in bits)."""
    return log_comb(m, k) / math.log(2.0)


def latent_from_grid(jz: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The Gaussian latent's grid indices as the z values the network is given."""
    return (jz.to(torch.float64) * gaussian_grid()).to(dtype).to(device)


def gaussian_grid() -> float:
    """Width of the Gaussian latent's grid."""
    return 2.0 ** -GRID_BITS


def gaussian_posterior_on_grid(mu: Tensor, log_var: Tensor) -> Gaussian:
    """q(z | x) = N(mu, exp(log_var)) in grid units."""
    w = gaussian_grid()
    return Gaussian(mu.to(torch.float64) / w, torch.exp(0.5 * log_var.to(torch.float64)) / w)


def gaussian_prior_on_grid(shape: tuple[int, ...]) -> Gaussian:
    """N(0, 1) in grid units."""
    w = gaussian_grid()
    return Gaussian(torch.zeros(shape, dtype=torch.float64), torch.full(shape, 1.0 / w, dtype=torch.float64))
