"""Bits-back coding of a set of images over the model's discrete-time chain, batched through the network.

Each image is a *chain* of T + 2 steps (``chain``). Chains advance together in *ticks* (``schedule``): a
tick runs every chain in flight by one step, with one network call for the chains at steps 1..T; the
decoder runs the same ticks backwards, each with exactly the batch the encoder had, so the network returns
bit-identical values. Within a tick the encoder does the step-0 chains, then steps 1..T, then step T+1;
the decoder the reverse.

Before the first chain, ``seed_images`` images are pushed under the uniform distribution (log2 V bits per
pixel, no bits-back) so the first chains have bits to pop; whatever the stack still lacks is borrowed from
a fixed pseudo-random *initial message*: the file stores only the part of it that was consumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mulan.coding.ans import CodingError, Stack
from mulan.coding.chain import ChainCoder
from mulan.coding.ledger import Ledger
from mulan.coding.schedule import Plan, in_flight
from mulan.diffusion import Diffusion

Callback = Callable[[int, int], None]


def initial_message(seed: int, words: int) -> np.ndarray:
    """The fixed pseudo-random words the stack starts on (its last word non-zero, as constriction needs)."""
    out = np.random.Generator(np.random.PCG64(seed)).integers(0, 1 << 32, size=words, dtype=np.uint32)
    if words:
        out[-1] |= np.uint32(1 << 31)
    return out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two uint32 arrays."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def run_ticks(coder: ChainCoder, plan: Plan, *, decode: bool, callback: Callback | None = None) -> None:
    """Run the plan's ticks forwards (encode) or backwards (decode)."""
    starts = plan.starts()
    total, length, T = int(starts[-1]) + plan.length, plan.length, plan.timesteps
    order = range(total - 1, -1, -1) if decode else range(total)
    for done, tau in enumerate(order, 1):
        lo, hi = in_flight(starts, length, tau)
        steps = torch.as_tensor(tau - starts[lo:hi], dtype=torch.int64)
        chains = np.arange(lo, hi)
        begin = chains[(steps == 0).numpy()].tolist()
        mid_mask = ((steps >= 1) & (steps <= T)).numpy()
        mid, mid_steps = chains[mid_mask].tolist(), steps[torch.from_numpy(mid_mask)]
        end = chains[(steps == T + 1).numpy()].tolist()
        # within a tick the encoder does steps 0, 1..T, T+1 in that order; the decoder undoes them in reverse
        if decode:
            ops = [(end, coder.decode_end), (mid, partial(coder.decode_steps, steps=mid_steps)),
                   (begin, coder.decode_start)]
        else:
            ops = [(begin, coder.encode_start), (mid, partial(coder.encode_steps, steps=mid_steps)),
                   (end, coder.encode_end)]
        for group, op in ops:
            if group:
                op(group)
        if callback is not None:
            callback(done, total)


@dataclass
class Encoded:
    """The coded stream and what it cost."""

    words: np.ndarray  # the stack's words above the untouched bottom of the initial message (uint32)
    shared_words: int  # words of the initial message below them (not stored: the decoder regenerates them)
    net_bits: int  # the stack's growth: every image's bits, without the initial message
    ledger: Ledger | None

    @property
    def initial_bits(self) -> int:
        """What the stored words carry beyond the net growth: the consumed part of the initial message (what
        the first chains borrowed), the 64-bit ANS state and the rounding to whole words."""
        return 32 * len(self.words) - self.net_bits


@torch.no_grad()
def encode(model: Diffusion, images: Tensor, plan: Plan, *, seed_images: int, seed: int, initial_words: int,
           ledger: bool = False, callback: Callback | None = None) -> Encoded:
    """Code ``images`` (N, C, H, W) integers; images[:seed_images] uniformly, the rest by bits-back."""
    init = initial_message(seed, initial_words)
    stack = Stack(init)
    start_bits = stack.bits
    book = Ledger(images.shape[0]) if ledger else None
    seed_part = images[:seed_images].reshape(-1).to(torch.int64)
    stack.push_uniform(seed_part, model.num_values)
    if book is not None:
        book.spend("seed", stack.bits - start_bits)
        book.charge("seed", torch.arange(seed_images), torch.full((seed_images, 1), model.n * math.log2(model.num_values)))
    coder = ChainCoder(model, stack, images, timesteps=plan.timesteps, grid_bits=plan.layout()[1],
                       first=seed_images, ledger=book)
    run_ticks(coder, plan, decode=False, callback=callback)
    words = stack.words()
    shared = common_prefix(words, init)
    return Encoded(words=words[shared:].copy(), shared_words=shared, net_bits=stack.bits - start_bits, ledger=book)


@torch.no_grad()
def decode(model: Diffusion, words: np.ndarray, shared_words: int, plan: Plan, *, shape: tuple[int, ...],
           count: int, seed_images: int, seed: int, initial_words: int, callback: Callback | None = None) -> Tensor:
    """Inverse of :func:`encode`: the ``count`` images (uint8 or int64, (count, C, H, W))."""
    init = initial_message(seed, initial_words)
    stack = Stack(np.concatenate([init[:shared_words], words]))
    dtype = torch.uint8 if model.num_values <= 256 else torch.int64
    images = torch.zeros((count, *shape), dtype=dtype)
    coder = ChainCoder(model, stack, images, timesteps=plan.timesteps, grid_bits=plan.layout()[1],
                       first=seed_images)
    run_ticks(coder, plan, decode=True, callback=callback)
    seed_part = stack.pop_uniform(seed_images * model.n, model.num_values)
    images[:seed_images] = seed_part.reshape(seed_images, *shape).to(dtype)
    rest = stack.words()
    if len(rest) != len(init) or common_prefix(rest, init) != len(init):
        raise CodingError("the decoded stream does not end on its initial message")
    return images
