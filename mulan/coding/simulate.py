"""What the grid costs: the binned chain against the continuous one, with common random numbers.

The coder's expected length is the negative ELBO of the *binned* chain (each latent rounded to its grid).
This runs both chains on the same noise: x_i = alpha_{i|i-1} x_{i-1} + sigma_q eps_i exactly, and the
binned x_i = round(that / delta_i) delta_i from the binned x_{i-1} (which is an exact draw from the
binned q). Each chain's realized length -log q/p summed over its steps (continuous densities for one, bin
masses for the other) has the bound's large sampling noise, but almost all of it is shared, so the mean
of their difference measures the grid's cost to a small error. No ANS is involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mulan.coding import transitions as tr
from mulan.coding.ledger import bin_bits
from mulan.diffusion import Diffusion

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_density_bits(x: Tensor, g: tr.Gaussian, width: Tensor) -> Tensor:
    """-log2 (density of g at x, in grid units) per element: the continuous chain's cost on the same scale."""
    u = (x / width - g.mean) / g.std
    return (0.5 * u.square() + torch.log(g.std) + LOG_SQRT_2PI) / math.log(2.0)


@dataclass
class GridCost:
    """Per image (N,) bits: the continuous chain's and the binned chain's realized lengths."""

    continuous: Tensor
    binned: Tensor

    @property
    def excess(self) -> Tensor:
        return self.binned - self.continuous


@torch.no_grad()
def grid_cost(model: Diffusion, images: Tensor, *, timesteps: int, grid_bits: int,
              generator: torch.Generator | None = None) -> GridCost:
    """Realized lengths (without the latent's and the decoder's terms, which the grid does not touch) of
    the continuous and the binned chain for ``images``, driven by the same noise."""
    T, k, n_img = timesteps, grid_bits, images.shape[0]
    cond = model.condition(images.to(model.device))
    x_tilde = model.encode(images).to(torch.float64)
    ones = torch.ones(n_img, dtype=torch.float64)

    def gamma(i: int) -> Tensor:
        t = (ones * (min(max(i, 0), T) / T)).to(model.dtype).to(model.device)
        return cond.bound(t).gamma.to("cpu", torch.float64).expand(n_img, *model.shape)

    def eps(x: Tensor, i: int) -> Tensor:
        t = (ones * (i / T)).to(model.dtype).to(model.device)
        return cond.eps_fn(x.to(model.dtype).to(model.device), t).to("cpu", torch.float64)

    def draw(q_c: tr.Gaussian, q_b: tr.Gaussian, width: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both chains' next latent from the same noise (continuous x, binned grid index j), and the bits each
        pop costs its chain."""
        e = torch.randn(x_tilde.shape, generator=generator, dtype=torch.float64)
        x = (q_c.mean + q_c.std * e) * width
        j = torch.round(q_b.mean + q_b.std * e)
        return x, j, _log_density_bits(x, q_c, width).flatten(1).sum(1), bin_bits(j, q_b).flatten(1).sum(1)

    cost_c = torch.zeros(n_img, dtype=torch.float64)
    cost_b = torch.zeros(n_img, dtype=torch.float64)
    g = {i: gamma(i) for i in (0, 1)}
    w_prev = tr.grid_width(g[0], g[0], g[1], k, first=True)
    q = tr.q_first(x_tilde, g[0], w_prev)
    x_c, j_b, bits_c, bits_b = draw(q, q, w_prev)
    cost_c -= bits_c
    cost_b -= bits_b
    for i in range(1, T + 1):
        g[i + 1] = gamma(i + 1)
        w = tr.grid_width(g[i - 1], g[i], g[i + 1], k, last=(i == T))
        xi_c, ji_b, bits_c, bits_b = draw(tr.q_step(x_c, g[i - 1], g[i], w), tr.q_step(j_b * w_prev, g[i - 1], g[i], w), w)
        cost_c -= bits_c
        cost_b -= bits_b
        p_c = tr.p_step(xi_c, eps(xi_c, i), g[i - 1], g[i], w_prev)
        p_b = tr.p_step(ji_b * w, eps(ji_b * w, i), g[i - 1], g[i], w_prev)
        cost_c += _log_density_bits(x_c, p_c, w_prev).flatten(1).sum(1)
        cost_b += bin_bits(j_b, p_b).flatten(1).sum(1)
        x_c, j_b, w_prev = xi_c, ji_b, w
        del g[i - 1]
    cost_c += _log_density_bits(x_c, tr.prior(w_prev), w_prev).flatten(1).sum(1)
    cost_b += bin_bits(j_b, tr.prior(w_prev)).flatten(1).sum(1)
    return GridCost(continuous=cost_c, binned=cost_b)
