"""The ANS stack, through ``constriction`` (Bamler's coder library; nothing here is a hand-written coder).

:class:`Stack` wraps ``constriction.stream.stack.AnsCoder`` (32-bit words, 64-bit state, models quantized
to 24-bit probabilities with every symbol in range at least 2^-24) with the few operations the chain needs,
each a *push* (encode) or a *pop* (decode) of a vector of symbols, and each the exact inverse of its
counterpart: ``pop_x(...)`` undoes ``push_x(..., same params)`` and the other way round. Every vector is
pushed with ``encode_reverse``, so the matching pop returns it in the same order.

Gaussian symbols are grid indices j. A vector's quantized Gaussians are centred on o = round(mean) and span
o - R .. o + R, R = ceil(c * max std) for the whole vector (constriction fixes the range per call;
c = DRAW_STDS or CODE_STDS). A pop draws from that range. A push with ``escape`` (the model's reverse steps and the prior, which
must accept any value a pop produced) codes |j - o| >= R as the edge symbol followed by the excess in an
Elias-gamma code of uniform symbols, so a poor model costs bits, never correctness.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import constriction
import numpy as np
import torch
from torch import Tensor

from mulan.coding.transitions import Gaussian
from mulan.errors import MulanError

# Half-width of a symbol range, in standard deviations. Every symbol in range gets at least 2^-24
# (constriction's leaky floor), which costs about 2^-24 log2(e) bits per symbol whose Gaussian mass is
# below that, on every push; measured for std 16: 1e-6 bits per symbol at +-5.5 std, 1e-5 at +-8 std,
# 2e-5 at +-12 std (benchmarks/compression.py). At 64 pixels x 1000 steps x 2 operations per image, 1e-5
# would be 1 bit per image. So draws and the model's pushes both span +-5.5 std (mass beyond: 4e-8), and
# a pushed value beyond is escaped; draws almost never land in a far tail.
DRAW_STDS = 5.5
CODE_STDS = 5.5
MAX_HALF_RANGE = 1 << 16  # 2^17 symbols keep the leaky floor's total mass below 1% at 24-bit precision
MIN_STD = 1e-3  # grid units; constriction needs std > 0 (a narrower Gaussian is a point mass anyway)
CHUNK_BITS = 16  # escape payloads are split into uniform symbols of at most this many bits
ROTATION_BITS = 6  # at most this many top bits of each quantile are rotated (see ROTATION)
# ROTATION. Bits-back assumes a pop reads uniformly random bits. In a chain they are the code of the latents
# just pushed under the reverse steps p(x_{i-1} | x_i), whose actual distribution (the forward process's
# posterior, which knows x) is not p: their positions in p's CDF are over-dispersed, and a pop reading them
# as quantiles draws over-dispersed latents. (Measured on digits at T = 100: 0.76% more variance than
# q(x_i | x_{i-1}), 0.8% more bits.) Shifting each quantile by a fixed pseudo-random amount keeps every
# draw a bijection of the stack, costs no bits, and makes the bias average out instead of piling up in the
# tails. The shift is a multiple of 2^-b (popping a uniform symbol of 2^b values takes the top b bits of the
# 24-bit quantile; pushing it back shifted rotates them): the part of the bias within 2^-b of the quantile
# range is left (~2^-b of it). b = 6, or fewer for Gaussians of less than 6 bits of entropy (coarse grids),
# so a draw never takes more bits off the stack at once than the latent itself: the rotation borrows no
# initial bits.

_model = constriction.stream.model


class CodingError(MulanError):
    """The model produced values the coder cannot use (non-finite), or the stream is inconsistent."""


@dataclass
class _Part:
    """Some elements of a vector of Gaussians whose standard deviations are within 2^(1/4) of each other,
    coded in one constriction call over o - half .. o + half."""

    idx: np.ndarray  # positions in the flattened vector
    offset: np.ndarray  # o = round(mean), int64
    mean: np.ndarray  # mean - o, in [-1/2, 1/2]
    std: np.ndarray
    half: int


def _parts(g: Gaussian, stds: float) -> list[_Part]:
    """A vector of Gaussians in grid units, split by width so every element's range is about +-stds of its
    own standard deviation (constriction fixes one range per call; a range far wider than an element's
    Gaussian costs bits through the leaky floor, see DRAW_STDS)."""
    mean = g.mean.reshape(-1).to(torch.float64)
    std = g.std.reshape(-1).to(torch.float64)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise CodingError("the model produced non-finite values; this checkpoint cannot code these images")
    offset = torch.round(mean)
    mean, offset = (mean - offset).numpy(), offset.to(torch.int64).numpy()
    std = std.clamp_min(MIN_STD).numpy()
    width = np.ceil(4.0 * np.log2(std)).astype(np.int64)
    if width.min() == width.max():
        half = int(min(MAX_HALF_RANGE, max(1, math.ceil(stds * float(std.max())))))
        return [_Part(np.arange(len(std)), offset, mean, std, half)]
    parts = []
    for w in np.unique(width):
        idx = np.flatnonzero(width == w)
        half = int(min(MAX_HALF_RANGE, max(1, math.ceil(stds * float(std[idx].max())))))
        parts.append(_Part(idx, offset[idx], mean[idx], std[idx], half))
    return parts


class Stack:
    """An ANS stack of 32-bit words. ``Stack(words)`` continues from ``words`` (a uint32 array)."""

    def __init__(self, words: np.ndarray | None = None):
        self.coder = constriction.stream.stack.AnsCoder(
            None if words is None else np.ascontiguousarray(words, dtype=np.uint32))

    def words(self) -> np.ndarray:
        """The compressed words, bottom of the stack first."""
        return self.coder.get_compressed()

    @property
    def bits(self) -> int:
        """Size of the stack in bits (not rounded to words)."""
        return int(self.coder.num_valid_bits())

    # --- Gaussians on grids ------------------------------------------------------------------------------
    def pop_gaussian(self, g: Gaussian) -> Tensor:
        """Draw grid indices j ~ g from the stack (int64, g's shape), each at a rotated quantile (see
        ``ROTATION``): the top bits of the quantiles on top of the stack are popped, shifted by fixed
        pseudo-random amounts and pushed back, then the symbols are decoded from them."""
        out = np.zeros(g.mean.numel(), dtype=np.int64)
        for part in _parts(g, DRAW_STDS):
            full, shift = _rotation(len(part.idx), _rotation_bits(part.std))
            u = self.coder.decode(_model.Uniform(), full).astype(np.int64)
            self.coder.encode_reverse(((u + shift) % full[0]).astype(np.int32), _model.Uniform(), full)
            sym = self.coder.decode(_model.QuantizedGaussian(-part.half, part.half), part.mean, part.std)
            out[part.idx] = part.offset + sym.astype(np.int64)
        return torch.from_numpy(out).reshape(g.mean.shape)

    def push_gaussian(self, j: Tensor, g: Gaussian) -> None:
        """Inverse of :meth:`pop_gaussian`: ``j`` must lie in the range g's pop draws from."""
        flat = j.reshape(-1).numpy()
        for part in reversed(_parts(g, DRAW_STDS)):
            sym = flat[part.idx] - part.offset
            if np.abs(sym).max() > part.half:
                raise CodingError("a value lies outside the range it was drawn from")
            full, shift = _rotation(len(part.idx), _rotation_bits(part.std))
            self.coder.encode_reverse(sym.astype(np.int32), _model.QuantizedGaussian(-part.half, part.half),
                                      part.mean, part.std)
            u = self.coder.decode(_model.Uniform(), full).astype(np.int64)
            self.coder.encode_reverse(((u - shift) % full[0]).astype(np.int32), _model.Uniform(), full)

    def push_gaussian_escaped(self, j: Tensor, g: Gaussian) -> None:
        """Push any integers ``j`` under g: values at or beyond the range's edge are escaped."""
        flat = j.reshape(-1).numpy()
        for part in _parts(g, CODE_STDS):
            sym = flat[part.idx] - part.offset
            out = np.abs(sym) >= part.half
            if out.any():
                self._push_excess(np.abs(sym[out]) - part.half)  # popped after the main vector
                sym = np.where(out, np.sign(sym) * part.half, sym)
            self.coder.encode_reverse(sym.astype(np.int32), _model.QuantizedGaussian(-part.half, part.half),
                                      part.mean, part.std)

    def pop_gaussian_escaped(self, g: Gaussian) -> Tensor:
        """Inverse of :meth:`push_gaussian_escaped`."""
        result = np.zeros(g.mean.numel(), dtype=np.int64)
        for part in reversed(_parts(g, CODE_STDS)):
            sym = self.coder.decode(_model.QuantizedGaussian(-part.half, part.half), part.mean,
                                    part.std).astype(np.int64)
            out = np.abs(sym) >= part.half
            if out.any():
                sym[out] = np.sign(sym[out]) * (part.half + self._pop_excess(int(out.sum())))
            result[part.idx] = part.offset + sym
        return torch.from_numpy(result).reshape(g.mean.shape)

    def _push_excess(self, excess: np.ndarray) -> None:
        """Elias-gamma of excess + 1: its bit length (uniform over 1..63), then the bits below the top one."""
        value = excess.astype(np.uint64) + np.uint64(1)
        nbits = np.array([int(v).bit_length() for v in value], dtype=np.int64)
        sizes, chunks = [], []
        for v, nb in zip(value, nbits):
            rest, left = int(v) & ((1 << (int(nb) - 1)) - 1), int(nb) - 1
            while left > 0:
                take = min(CHUNK_BITS, left)
                sizes.append(1 << take)
                chunks.append(rest & ((1 << take) - 1))
                rest >>= take
                left -= take
        if chunks:
            self.coder.encode_reverse(np.array(chunks, dtype=np.int32), _model.Uniform(),
                                      np.array(sizes, dtype=np.int32))
        self.coder.encode_reverse((nbits - 1).astype(np.int32), _model.Uniform(),
                                  np.full(len(nbits), 63, dtype=np.int32))

    def _pop_excess(self, count: int) -> np.ndarray:
        nbits = self.coder.decode(_model.Uniform(), np.full(count, 63, dtype=np.int32)).astype(np.int64) + 1
        sizes = []
        for nb in nbits:
            left = int(nb) - 1
            while left > 0:
                take = min(CHUNK_BITS, left)
                sizes.append(take)
                left -= take
        chunks = (self.coder.decode(_model.Uniform(), np.array([1 << s for s in sizes], dtype=np.int32))
                  if sizes else np.zeros(0, dtype=np.int32))
        out, pos = np.zeros(count, dtype=np.int64), 0
        for i, nb in enumerate(nbits):
            rest, shift, left = 0, 0, int(nb) - 1
            while left > 0:
                take = min(CHUNK_BITS, left)
                rest |= int(chunks[pos]) << shift
                pos, shift, left = pos + 1, shift + take, left - take
            out[i] = ((1 << (int(nb) - 1)) | rest) - 1
        return out

    # --- categorical, uniform ------------------------------------------------------------------------------
    def push_categorical(self, symbols: Tensor, probs: Tensor) -> None:
        """Push ``symbols`` (N,) under rows of ``probs`` (N, K) (non-negative, any normalisation)."""
        if symbols.numel() == 0:
            return
        p = _probabilities(probs)
        self.coder.encode_reverse(symbols.reshape(-1).numpy().astype(np.int32),
                                  _model.Categorical(perfect=False), p)

    def pop_categorical(self, probs: Tensor) -> Tensor:
        if probs.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64)
        p = _probabilities(probs)
        return torch.from_numpy(self.coder.decode(_model.Categorical(perfect=False), p).astype(np.int64))

    def push_uniform(self, symbols: Tensor, size: int) -> None:
        """Push integers in 0..size-1, each costing log2(size) bits."""
        if symbols.numel() == 0:
            return
        sizes = np.full(symbols.numel(), size, dtype=np.int32)
        self.coder.encode_reverse(symbols.reshape(-1).numpy().astype(np.int32), _model.Uniform(), sizes)

    def pop_uniform(self, count: int, size: int) -> Tensor:
        if count == 0:
            return torch.zeros(0, dtype=torch.int64)
        sizes = np.full(count, size, dtype=np.int32)
        return torch.from_numpy(self.coder.decode(_model.Uniform(), sizes).astype(np.int64))


def _rotation_bits(std: np.ndarray) -> int:
    """b: the narrowest Gaussian's entropy on unit bins, log2(std sqrt(2 pi e)), rounded down, in 1..6."""
    return int(min(ROTATION_BITS, max(1, math.floor(math.log2(float(std.min())) + 2.047))))


@functools.lru_cache(maxsize=128)
def _rotation(length: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(sizes 2^bits, fixed pseudo-random shifts) for ``length`` quantiles."""
    shift = np.random.Generator(np.random.PCG64([length, bits])).integers(0, 1 << bits, size=length,
                                                                          dtype=np.int64)
    return np.full(length, 1 << bits, dtype=np.int32), shift


def _probabilities(probs: Tensor) -> np.ndarray:
    p = probs.to(torch.float64)
    if not torch.isfinite(p).all():
        raise CodingError("the model produced non-finite probabilities; this checkpoint cannot code these images")
    return np.ascontiguousarray(p.numpy())
