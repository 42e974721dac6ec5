"""The VDM denoiser: a U-Net without down/up-sampling (SPEC "The denoiser"; VDM's ``ScoreUNet``).

x_t (+ Fourier features) -> conv_in -> ``num_blocks`` ResNet blocks, every activation kept for a skip ->
ResNet, attention, ResNet -> ``num_blocks + 1`` ResNet blocks, each fed concat(h, skip) -> GroupNorm, swish,
zero-initialised conv_out. Every ResNet block adds a projection of one conditioning embedding built from the
time input and MuLAN's latent z. With ``gamma_input='map'`` the per-pixel noise level (gamma rescaled to about
[0, 1]) enters as C extra input channels beside x_t and its Fourier features; with ``position_input`` two more
channels hold each pixel's row and column in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.config import DenoiserConfig
from mulan.errors import ConfigError
from mulan.nn.layers import GROUPNORM_EPS, AttnBlock, ResnetBlock, conv3x3, fourier_features, linear, timestep_embedding


class UNet(nn.Module):
    """VDM's U-Net at one resolution.

    Args:
        cfg: widths, depth, attention, dropout, GroupNorm groups, Fourier frequencies, embedding width.
        shape: (C, H, W) of the images.
        cond_dim: size of the extra conditioning vector (MuLAN's z); 0 for none.
    """

    def __init__(self, cfg: DenoiserConfig, shape: tuple[int, int, int], cond_dim: int = 0):
        super().__init__()
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"image shape must be (C, H, W) of positive sizes, got {tuple(shape)}")
        if cfg.groups < 1 or cfg.channels % cfg.groups:
            raise ConfigError(f"model.denoiser.groups ({cfg.groups}) must divide channels ({cfg.channels})")
        self.shape = tuple(shape)
        self.cond_dim = cond_dim
        self.gamma_map = cfg.gamma_input == "map"
        self.position = bool(cfg.position_input)
        if self.position:
            rows = torch.linspace(-1.0, 1.0, shape[1]).reshape(1, 1, -1, 1).expand(1, 1, shape[1], shape[2])
            cols = torch.linspace(-1.0, 1.0, shape[2]).reshape(1, 1, 1, -1).expand(1, 1, shape[1], shape[2])
            self.register_buffer("coords", torch.cat([rows, cols], 1), persistent=False)
        self.fourier = (cfg.fourier_min, cfg.fourier_max)
        c, ch = shape[0], cfg.channels
        emb_dim = cfg.embedding_dim or 4 * ch  # VDM: 4 * n_embd
        n_freqs = max(cfg.fourier_max - cfg.fourier_min + 1, 0)

        self.embed_dim_t = ch  # VDM: the sinusoidal time embedding is `channels` wide
        # VDM: concat(temb, conditioning) -> Dense -> swish -> Dense -> swish
        self.embed = nn.Sequential(linear(ch + cond_dim, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim), nn.SiLU())

        def block(c_in: int) -> ResnetBlock:
            return ResnetBlock(c_in, ch, emb_dim, cfg.groups, cfg.dropout)

        self.conv_in = conv3x3(c * (1 + 2 * n_freqs + int(self.gamma_map)) + 2 * int(self.position), ch)
        self.down = nn.ModuleList(block(ch) for _ in range(cfg.num_blocks))
        self.mid1 = block(ch)
        # VDM always has the middle attention; `cfg.attention` can drop it (VDM's per-block attention,
        # off for its CIFAR-10 run, is not offered)
        self.mid_attn = AttnBlock(ch, cfg.groups) if cfg.attention else nn.Identity()
        self.mid2 = block(ch)
        self.up = nn.ModuleList(block(2 * ch) for _ in range(cfg.num_blocks + 1))
        self.norm_out = nn.GroupNorm(cfg.groups, ch, eps=GROUPNORM_EPS)
        self.conv_out = conv3x3(ch, c, zero=True)  # VDM: zero init, so an untrained net outputs 0

    def forward(self, x_t: Tensor, t_in: Tensor, cond: Tensor | None = None, gamma_map: Tensor | None = None) -> Tensor:
        """The raw network output (read as eps-hat or v-hat by the model).

        Args:
            x_t: (B, C, H, W) noisy images.
            t_in: (B,) (or a scalar) time input in [0, 1]: the model passes the pixel-mean of gamma rescaled
                to [0, 1], as VDM does with its scalar gamma.
            cond: (B, cond_dim) extra conditioning (MuLAN's z), or None when ``cond_dim == 0``.
            gamma_map: (B, C, H, W) (or broadcastable) per-pixel noise level, rescaled like ``t_in``; required
                exactly when the network was built with ``gamma_input='map'``.

        Returns:
            (B, C, H, W), in the dtype the last convolution computes in.
        """
        if tuple(x_t.shape[1:]) != self.shape:
            raise ValueError(f"x_t must be (B, {', '.join(map(str, self.shape))}), got {tuple(x_t.shape)}")
        if (cond is None) != (self.cond_dim == 0):
            raise ValueError(f"this UNet takes cond of size {self.cond_dim}; got {None if cond is None else tuple(cond.shape)}")
        batch = x_t.shape[0]

        dtype = self.embed[0].weight.dtype  # the model's: z keeps its precision in a float64 model
        emb = timestep_embedding(t_in.reshape(-1).expand(batch), self.embed_dim_t).to(dtype)  # (B, channels)
        if cond is not None:
            emb = torch.cat([emb, cond.reshape(batch, self.cond_dim).to(dtype)], dim=1)
        emb = self.embed(emb)  # (B, emb_dim)

        if (gamma_map is None) == self.gamma_map:
            raise ValueError("gamma_map must be given exactly when the UNet was built with gamma_input='map'")
        h = fourier_features(x_t, *self.fourier)
        if gamma_map is not None:
            h = torch.cat([h, gamma_map.to(h.dtype).expand_as(x_t)], dim=1)
        if self.position:
            h = torch.cat([h, self.coords.to(h.dtype).expand(batch, -1, -1, -1)], dim=1)
        h = self.conv_in(h)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        # (VDM then adds x_t, a "base measure"; we return the raw output, which the model reads as eps or v)
        return self.conv_out(F.silu(self.norm_out(h)))
