"""Building blocks of the VDM U-Net: input Fourier features, the time embedding, ResNet and attention blocks.

Choices that are VDM's (Kingma et al. 2021, google-research/vdm ``model_vdm.py``) are marked "VDM".
Images are (B, C, H, W); the conditioning embedding is (B, E).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPNORM_EPS = 1e-6  # VDM uses flax's GroupNorm, whose epsilon is 1e-6 (PyTorch's default is 1e-5)


def _lecun_normal_(weight: Tensor) -> None:
    """flax's default kernel init (VDM): truncated normal at +-2 std, variance 1 / fan_in."""
    fan_in = weight[0].numel()  # in_features (Linear) or in_channels * kh * kw (Conv2d)
    std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978  # undo the variance lost to truncation
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _vdm_init_(layer: nn.Conv2d | nn.Linear, zero: bool = False) -> nn.Conv2d | nn.Linear:
    """VDM's init of a layer, in place: lecun-normal weight (``zero=True``: exactly 0) and a zero bias."""
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        _lecun_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv3x3(c_in: int, c_out: int, zero: bool = False) -> nn.Conv2d:
    """3x3 'same' convolution with VDM's init; ``zero=True`` starts it at exactly 0."""
    return _vdm_init_(nn.Conv2d(c_in, c_out, 3, padding=1), zero)


def linear(d_in: int, d_out: int, zero: bool = False, bias: bool = True) -> nn.Linear:
    """Dense layer with VDM's init; ``zero=True`` starts it at exactly 0."""
    return _vdm_init_(nn.Linear(d_in, d_out, bias=bias), zero)


def fourier_features(x: Tensor, n_min: int, n_max: int) -> Tensor:
    """Concatenate x with sin and cos of 2^n * 2 pi * x for n = n_min..n_max (VDM's Base2FourierFeatures).

    (B, C, H, W) -> (B, C * (1 + 2 * (n_max - n_min + 1)), H, W); x unchanged when n_max < n_min. The
    phases are formed in float32: at 2^7 * 2 pi a half-precision x would lose the whole phase.
    """
    if n_max < n_min:
        return x
    scale = torch.exp2(torch.arange(n_min, n_max + 1, device=x.device, dtype=torch.float32)) * (2 * math.pi)
    phase = (x.float().unsqueeze(2) * scale[:, None, None]).flatten(1, 2)  # (B, C * n_freqs, H, W)
    return torch.cat([x, phase.sin().to(x.dtype), phase.cos().to(x.dtype)], dim=1)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t * 1000 (VDM's tensor2tensor variant), (B,) -> (B, dim), float32.

    Frequencies 10000^(-i / (half - 1)), i = 0..half-1; [sin, cos] concatenated, zero-padded if dim is odd.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1)))
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]
    return F.pad(torch.cat([args.sin(), args.cos()], dim=1), (0, dim % 2))


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv, + projected embedding, GroupNorm-swish-dropout-conv (zero init), + skip (VDM).

    (B, c_in, H, W), (B, emb_dim) -> (B, c_out, H, W). The zero-initialised second conv makes the block
    start as its skip path.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=GROUPNORM_EPS)
        self.conv1 = conv3x3(c_in, c_out)
        self.cond_proj = linear(emb_dim, c_out, zero=True, bias=False)  # VDM: bias-free, zero init
        self.norm2 = nn.GroupNorm(groups, c_out, eps=GROUPNORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(c_out, c_out, zero=True)
        # VDM's 'nin_shortcut' is a Dense over channels, i.e. a 1x1 conv
        self.skip = _vdm_init_(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Residual self-attention over the H*W positions: x + proj(attn(GroupNorm(x))) (VDM: one head).

    (B, C, H, W) -> (B, C, H, W). The output projection starts at zero, so the block starts as identity.
    """

    def __init__(self, channels: int, groups: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention heads ({heads}) must divide channels ({channels})")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS)
        self.qkv = linear(channels, 3 * channels)  # VDM's separate q, k, v Dense layers, fused
        self.proj_out = linear(channels, channels, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a free view for channels_last x
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, C // self.heads)).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C / heads), scale 1/sqrt(C / heads)
        h = self.proj_out(h.transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + h.transpose(1, 2).unflatten(2, (H, W))
