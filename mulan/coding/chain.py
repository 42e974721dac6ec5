"""One tick's operations on a set of chains, and their inverses (``mulan.coding.codec`` runs the ticks).

Per image (a *chain*; ``transitions`` has the distributions), the encoder runs

    step 0:      [Gaussian z: pop z ~ q(z | x)]; pop x_0 ~ q(x_0 | x); push x under p(x | x_0)
    step i<=T:   pop x_i ~ q(x_i | x_{i-1}); push x_{i-1} under p(x_{i-1} | x_i)    (one network call)
    step T+1:    push x_T under N(0, I); push z (k-hot: uniform prior; Gaussian: N(0, I))

and the decoder runs every operation's inverse in the opposite order, so each pop returns the bits the
matching push took. Every value a network call (or the schedule) returns depends on the whole batch it was
computed in, so every such call here is made for exactly the chains of one group of one tick, which the
decoder rebuilds identically.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mulan.coding import latents as lat
from mulan.coding import transitions as tr
from mulan.coding.ans import CodingError, Stack
from mulan.coding.ledger import LN2, Ledger, bin_bits
from mulan.diffusion import Diffusion, prior_kl
from mulan.schedules import GammaOut


class ChainCoder:
    """The operations of one tick, for encoding and (their inverses) decoding.

    ``images`` (N, C, H, W) holds the images being coded (encoder) or filled in (decoder); chain c codes
    image ``first + c``.
    """

    def __init__(self, model: Diffusion, stack: Stack, images: Tensor, *, timesteps: int, grid_bits: np.ndarray,
                 first: int, ledger: Ledger | None = None):
        self.model, self.stack, self.images = model, stack, images
        self.T, self.grid_bits, self.first = timesteps, torch.as_tensor(grid_bits, dtype=torch.float64), first
        self.kind = model.cfg.latent.kind
        self.ledger = ledger
        self.j: dict[int, Tensor] = {}  # chain -> grid indices of its current latent (C, H, W) int64
        self.z: dict[int, Tensor] = {}  # chain -> z (m,) float32, in the model's device
        self.jz: dict[int, Tensor] = {}  # Gaussian latent: chain -> grid indices of z

    # --- shared pieces -------------------------------------------------------------------------------------
    def _k(self, chains: list[int]) -> Tensor:
        """Grid bits of each chain, (B, 1, 1, 1)."""
        return self.grid_bits[torch.tensor(chains, dtype=torch.int64)].reshape(-1, 1, 1, 1)

    def _z(self, chains: list[int]) -> Tensor | None:
        return torch.stack([self.z[c] for c in chains]) if self.kind != "none" else None

    def _gammas(self, chains: list[int], steps: Tensor, offsets: tuple[int, ...]) -> list[Tensor]:
        """gamma at times (steps + o) / T, clamped to [0, 1], for each offset o: float64 (B, C, H, W).

        All offsets go through the schedule in one call (z repeated); ``self._cond`` is left bound to the
        chains themselves for the network call."""
        model, B = self.model, len(chains)
        z = self._z(chains)
        self._cond = model.condition(z=z, batch=B)
        many = len(offsets)
        cond = model.condition(z=None if z is None else z.repeat(many, 1), batch=many * B)
        t = torch.cat([(steps + o).clamp(0, self.T) for o in offsets]).to(torch.float64) / self.T
        gamma = cond.bound(t.to(model.dtype).to(model.device)).gamma.detach().to("cpu", torch.float64)
        gamma = gamma.expand(many * B, *model.shape)
        return list(gamma.split(B))

    def _eps(self, x: Tensor, steps: Tensor) -> Tensor:
        model = self.model
        t = (steps.to(torch.float64) / self.T).to(model.dtype).to(model.device)
        eps = self._cond.eps_fn(x.to(model.dtype).to(model.device), t)
        return eps.detach().to("cpu", torch.float64)

    def _decoder_probs(self, x0: Tensor, gamma0: Tensor) -> Tensor:
        """p(x | x_0) per pixel, (B*n, V) float64."""
        model = self.model
        rescaled = (x0 / tr.alpha(gamma0)).to(model.dtype).to(model.device)
        logits = model.decoder_logits(rescaled, gamma0.to(model.dtype).to(model.device))
        return torch.softmax(logits.detach().to("cpu", torch.float64), dim=-1).reshape(-1, model.num_values)

    def _x_tilde(self, chains: list[int]) -> Tensor:
        idx = torch.tensor([self.first + c for c in chains])
        return self.model.encode(self.images[idx]).to(torch.float64)

    def _spend(self, term: str, before: int) -> None:
        if self.ledger is not None:
            self.ledger.spend(term, self.stack.bits - before)

    def _set_gaussian_z(self, chains: list[int], jz: Tensor) -> None:
        """Keep each chain's Gaussian latent: its grid indices, and z as the network is given it."""
        for c, jc in zip(chains, jz):
            self.jz[c] = jc
            self.z[c] = lat.latent_from_grid(jc, self.model.dtype, self.model.device)

    def _rows(self, chains: list[int]) -> Tensor:
        return torch.tensor([self.first + c for c in chains], dtype=torch.int64)

    # --- step 0 --------------------------------------------------------------------------------------------
    def encode_start(self, chains: list[int]) -> None:
        model, rows = self.model, self._rows(chains)
        x = self.images[rows]
        x_tilde = model.encode(x.to(model.device))
        b = self.stack.bits
        if self.kind == "khot":
            z = model.latent(x_tilde, strict=True).z.detach().round()
            for c, zc in zip(chains, z):
                self.z[c] = zc
        elif self.kind == "gaussian":
            mu, log_var = model.latent.posterior(x_tilde)
            q = lat.gaussian_posterior_on_grid(mu.detach().cpu(), log_var.detach().cpu())
            jz = self.stack.pop_gaussian(q)
            self._charge("latent", rows, bin_bits(jz, q), -1.0)
            self._set_gaussian_z(chains, jz)
        self._spend("latent", b)
        steps = torch.zeros(len(chains), dtype=torch.int64)
        g0, g1 = self._gammas(chains, steps, (0, 1))
        width0 = tr.grid_width(g0, g0, g1, self._k(chains), first=True)
        x_tilde = x_tilde.detach().to("cpu", torch.float64)
        q = tr.q_first(x_tilde, g0, width0)
        b = self.stack.bits
        j0 = self.stack.pop_gaussian(q)
        self._spend("draws", b)
        probs = self._decoder_probs(j0 * width0, g0)
        b = self.stack.bits
        self.stack.push_categorical(x.reshape(-1).to(torch.int64), probs)
        self._spend("decoder", b)
        self.j.update(zip(chains, j0))
        if self.ledger is not None:
            self._charge("draws", rows, bin_bits(j0, q), -1.0)
            recon = -torch.log2(probs.gather(1, x.reshape(-1, 1).long()).reshape(len(chains), -1))
            self._charge("decoder", rows, recon)
            self.ledger.expect("recon", rows, recon.sum(1))
            self._expect_prior_and_latent(chains, rows, x_tilde)

    def decode_start(self, chains: list[int]) -> None:
        model, rows = self.model, self._rows(chains)
        steps = torch.zeros(len(chains), dtype=torch.int64)
        g0, g1 = self._gammas(chains, steps, (0, 1))
        width0 = tr.grid_width(g0, g0, g1, self._k(chains), first=True)
        j0 = torch.stack([self.j.pop(c) for c in chains])
        probs = self._decoder_probs(j0 * width0, g0)
        x = self.stack.pop_categorical(probs).reshape(len(chains), *model.shape)
        if int(x.max()) >= model.num_values:
            raise CodingError("decoded a pixel value out of range: the file does not match this model")
        self.images[rows] = x.to(self.images.dtype)
        x_tilde = model.encode(x.to(model.device))
        self.stack.push_gaussian(j0, tr.q_first(x_tilde.detach().to("cpu", torch.float64), g0, width0))
        if self.kind == "gaussian":
            mu, log_var = model.latent.posterior(x_tilde)
            jz = torch.stack([self.jz.pop(c) for c in chains])
            self.stack.push_gaussian(jz, lat.gaussian_posterior_on_grid(mu.detach().cpu(), log_var.detach().cpu()))
        for c in chains:
            self.z.pop(c, None)

    # --- steps 1..T ----------------------------------------------------------------------------------------
    def _step_grids(self, chains: list[int], steps: Tensor):
        g_pp, g_p, g, g_n = self._gammas(chains, steps, (-2, -1, 0, 1))
        col = (-1, 1, 1, 1)
        k = self._k(chains)
        width_prev = tr.grid_width(g_pp, g_p, g, k, first=(steps == 1).reshape(col))
        width = tr.grid_width(g_p, g, g_n, k, last=(steps == self.T).reshape(col))
        return g_p, g, width_prev, width

    def encode_steps(self, chains: list[int], steps: Tensor) -> None:
        g_p, g, width_prev, width = self._step_grids(chains, steps)
        j_prev = torch.stack([self.j[c] for c in chains])
        q = tr.q_step(j_prev * width_prev, g_p, g, width)
        b = self.stack.bits
        j = self.stack.pop_gaussian(q)
        self._spend("draws", b)
        x = j * width
        eps_hat = self._eps(x, steps)
        p = tr.p_step(x, eps_hat, g_p, g, width_prev)
        b = self.stack.bits
        self.stack.push_gaussian_escaped(j_prev, p)
        self._spend("reverse", b)
        self.j.update(zip(chains, j))
        if self.ledger is not None:
            rows = self._rows(chains)
            self._charge("draws", rows, bin_bits(j, q), -1.0)
            self._charge("reverse", rows, bin_bits(j_prev, p))
            kl = tr.step_kl(x, self._x_tilde(chains), eps_hat, g_p, g).flatten(1).sum(1)
            self.ledger.expect("diffusion", rows, kl / LN2)
            self.ledger.step_noise(rows, kl)

    def decode_steps(self, chains: list[int], steps: Tensor) -> None:
        g_p, g, width_prev, width = self._step_grids(chains, steps)
        j = torch.stack([self.j[c] for c in chains])
        x = j * width
        eps_hat = self._eps(x, steps)
        j_prev = self.stack.pop_gaussian_escaped(tr.p_step(x, eps_hat, g_p, g, width_prev))
        self.stack.push_gaussian(j, tr.q_step(j_prev * width_prev, g_p, g, width))
        self.j.update(zip(chains, j_prev))

    # --- step T+1 ------------------------------------------------------------------------------------------
    def _last_width(self, chains: list[int]) -> Tensor:
        steps = torch.full((len(chains),), self.T, dtype=torch.int64)
        g_p, g = self._gammas(chains, steps, (-1, 0))
        return tr.grid_width(g_p, g, g, self._k(chains), last=True)

    def encode_end(self, chains: list[int]) -> None:
        width = self._last_width(chains)
        j = torch.stack([self.j.pop(c) for c in chains])
        b = self.stack.bits
        self.stack.push_gaussian_escaped(j, tr.prior(width))
        self._spend("prior", b)
        if self.ledger is not None:
            self._charge("prior", self._rows(chains), bin_bits(j, tr.prior(width)))
        b = self.stack.bits
        if self.kind == "khot":
            z = torch.stack([self.z.pop(c) for c in chains]).cpu()
            lat.push_khot(self.stack, z, self.model.cfg.latent.k)
            if self.ledger is not None:
                bits = torch.full((len(chains), 1), lat.log2_khot_states(z.shape[1], self.model.cfg.latent.k))
                self._charge("latent", self._rows(chains), bits)
        elif self.kind == "gaussian":
            jz = torch.stack([self.jz.pop(c) for c in chains])
            self.stack.push_gaussian_escaped(jz, lat.gaussian_prior_on_grid(tuple(jz.shape)))
            if self.ledger is not None:
                self._charge("latent", self._rows(chains), bin_bits(jz, lat.gaussian_prior_on_grid(tuple(jz.shape))))
            for c in chains:
                self.z.pop(c)
        self._spend("latent", b)

    def decode_end(self, chains: list[int]) -> None:
        model = self.model
        if self.kind == "khot":
            z = lat.pop_khot(self.stack, len(chains), model.cfg.latent.m, model.cfg.latent.k)
            for c, zc in zip(chains, z):
                self.z[c] = zc.to(model.dtype).to(model.device)
        elif self.kind == "gaussian":
            jz = self.stack.pop_gaussian_escaped(lat.gaussian_prior_on_grid((len(chains), model.cfg.latent.m)))
            self._set_gaussian_z(chains, jz)
        width = self._last_width(chains)
        j = self.stack.pop_gaussian_escaped(tr.prior(width))
        self.j.update(zip(chains, j))

    # --- accounting ----------------------------------------------------------------------------------------
    def _charge(self, term: str, rows: Tensor, bits: Tensor, sign: float = 1.0) -> None:
        if self.ledger is not None:
            self.ledger.charge(term, rows, bits, sign)

    def _expect_prior_and_latent(self, chains: list[int], rows: Tensor, x_tilde: Tensor) -> None:
        """The model's own prior KL(q(x_T | x) || N(0, I)) and latent cost, in bits."""
        (g1,) = self._gammas(chains, torch.full((len(chains),), self.T, dtype=torch.int64), (0,))
        self.ledger.expect("prior", rows, prior_kl(x_tilde, GammaOut(g1, torch.zeros_like(g1))) / LN2)
        if self.kind == "khot":
            cfg = self.model.cfg.latent
            self.ledger.expect("latent", rows, torch.full((len(chains),), lat.log2_khot_states(cfg.m, cfg.k)))
        elif self.kind == "gaussian":
            latent = self.model.latent
            kl = latent.kl(*latent.posterior(self.model.encode(self.images[rows].to(self.model.device))))
            self.ledger.expect("latent", rows, kl.detach().cpu().to(torch.float64) / LN2)
