"""Random draws that do not depend on how a batch is split.

A data-parallel step (several ranks, or several accumulated micro-batches) must draw, for every example, the
same noise, times and latent perturbation as one process computing the whole batch would; otherwise "same
seed, same result" would depend on the number of devices. A :class:`ShardedGenerator` says "this call
computes part ``index`` of ``count`` equal parts of a batch": every draw is made for the whole batch from the
same seeded generator and sliced, so each part sees exactly its examples' values. The extra draws are cheap
next to the network (a few numbers per pixel).

A :class:`PerExample` generator goes further: every example draws from its own generator, seeded from
(seed, the example's index in the data set) by :func:`example_seeds`. Its draws then depend on nothing but the
image (not the batch size, the rank count, or the other images), so two models evaluated with the same seed see
the same times and noise on every image: common random numbers, which make paired differences between models
far less noisy than either bound.

Every function here accepts a plain :class:`torch.Generator` (or None) as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class ShardedGenerator:
    """Part ``index`` (0-based) of ``count`` equal parts of a batch whose draws come from ``generator``."""

    generator: torch.Generator
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in [0, {self.count})")


@dataclass(frozen=True)
class PerExample:
    """One generator per example of a batch: example b's part of every draw comes from ``generators[b]``."""

    generators: tuple[torch.Generator, ...]

    @classmethod
    def seeded(cls, seed: int, indices, device=None) -> "PerExample":
        """Generators for the examples with data-set ``indices`` (a sequence or 1-D tensor) under ``seed``."""
        return cls(tuple(torch.Generator(device or "cpu").manual_seed(s) for s in example_seeds(seed, indices)))


def example_seeds(seed: int, indices) -> list[int]:
    """Well-mixed 63-bit seeds for (seed, index) pairs (SplitMix64 finaliser), one per index."""
    out = []
    for i in (indices.tolist() if isinstance(indices, Tensor) else indices):
        x = (int(seed) * 0x9E3779B97F4A7C15 + int(i) + 1) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        out.append((x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF)
    return out


Generator = Union[torch.Generator, ShardedGenerator, PerExample, None]


def _parts(generator: Generator) -> tuple[torch.Generator | None, int, int]:
    if isinstance(generator, ShardedGenerator):
        return generator.generator, generator.index, generator.count
    if isinstance(generator, PerExample):
        raise TypeError("this draw is not per example; a PerExample generator cannot make it")
    return generator, 0, 1


def plain(generator: Generator) -> torch.Generator | None:
    """The underlying torch generator (for draws that are not per example)."""
    return _parts(generator)[0]


def _draw(fn: Callable[..., Tensor], shape, generator: Generator, batch_dim: int, **kwargs) -> Tensor:
    shape = tuple(shape)
    if isinstance(generator, PerExample):
        if shape[batch_dim] != len(generator.generators):
            raise ValueError(f"{len(generator.generators)} per-example generators for a batch of {shape[batch_dim]}")
        one = shape[:batch_dim] + (1,) + shape[batch_dim + 1:]
        return torch.cat([fn(one, generator=g, **kwargs) for g in generator.generators], dim=batch_dim)
    gen, index, count = _parts(generator)
    if count == 1:
        return fn(shape, generator=gen, **kwargs)
    b = shape[batch_dim]
    full = shape[:batch_dim] + (b * count,) + shape[batch_dim + 1:]
    return fn(full, generator=gen, **kwargs).narrow(batch_dim, index * b, b)


def randn(shape, generator: Generator, *, batch_dim: int = 0, **kwargs) -> Tensor:
    """Standard normal draws of ``shape`` (this shard's part of the batch along ``batch_dim``)."""
    return _draw(torch.randn, shape, generator, batch_dim, **kwargs)


def rand(shape, generator: Generator, *, batch_dim: int = 0, **kwargs) -> Tensor:
    """Uniform [0, 1) draws of ``shape`` (this shard's part of the batch along ``batch_dim``)."""
    return _draw(torch.rand, shape, generator, batch_dim, **kwargs)


def standard_gamma(shape, concentration: float, generator: Generator, *, batch_dim: int = 0, **kwargs) -> Tensor:
    """Gamma(concentration, rate 1) draws of ``shape``."""

    def fn(full, generator, **kw):
        return torch._standard_gamma(torch.full(full, concentration, **kw), generator=generator)

    return _draw(fn, shape, generator, batch_dim, **kwargs)


def antithetic_times(batch: int, generator: Generator, *, device=None) -> Tensor:
    """Low-discrepancy times t_i = (u + i/B) mod 1 over the whole batch B, with one uniform u
    (SPEC "Time sampling"); a shard gets its examples' times. (Per-example generators have no batch-wide u:
    stratify each example's own times instead, as :func:`mulan.likelihood.elbo.elbo_per_image` does.)"""
    gen, index, count = _parts(generator)
    total = batch * count
    u = torch.rand((), generator=gen, device=device)
    i = torch.arange(index * batch, (index + 1) * batch, device=device)
    return torch.remainder(u + i / total, 1.0)
