"""Which chains advance at which tick: a pipeline fed by the bits finished chains leave on the stack.

Each image is one chain of ``T + 2`` steps (step 0: pop x_0, push x; steps 1..T: pop x_i, push x_{i-1};
step T+1: push x_T and z). A *tick* advances every chain in flight by one step with one network call for
all of them. A chain in flight has borrowed at most ``need(k)`` bits from the stack (its current latent
and, within a tick, the next one), which grows by 2n bits per grid bit k (two latents of n pixels); a
finished chain has left about ``gain`` bits on it. Chains start in image order:

- while others are in flight, a chain starts (with grid bits K) when the stack covers one more:
  committed + need(K) <= budget + finished * gain, committed = sum of the needs of the chains in flight;
- when none is, it starts anyway, with the largest k <= K whose need the stack covers (0 if none: only
  then are initial bits borrowed). So the first few chains run on coarser grids instead of borrowing.

The rule depends only on the numbers in :class:`Plan`, which the file header stores: the decoder rebuilds
the same ticks and runs them backwards, so every network call sees exactly the batch the encoder's did.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    """The numbers that fix the pipeline."""

    chains: int  # images coded by bits-back, in order
    timesteps: int  # T
    batch: int  # most chains in flight (and in one network call)
    budget: float  # bits on the stack before the first chain (e.g. images pushed first without bits-back)
    need: float  # bits a chain in flight may borrow at grid bits 0
    gain: float  # bits a finished chain leaves on the stack
    grid_bits: int  # K: the grid bits of every chain that starts while others are in flight
    pixels: int  # n: a chain's need grows by 2n bits per grid bit

    @property
    def length(self) -> int:
        """Steps (ticks) one chain takes."""
        return self.timesteps + 2

    def need_at(self, k: int) -> float:
        return self.need + 2.0 * self.pixels * k

    def layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(start tick, grid bits) of every chain; start ticks are non-decreasing."""
        n, length, K = self.chains, self.length, self.grid_bits
        starts = np.zeros(n, dtype=np.int64)
        bits = np.zeros(n, dtype=np.int64)
        running: list[tuple[int, float]] = []  # heap of (finish tick, need) of the chains in flight
        started = finished = 0
        committed = 0.0
        tau = 0
        while started < n:
            while running and running[0][0] <= tau:
                committed -= heapq.heappop(running)[1]
                finished += 1
            while started < n and len(running) < self.batch:
                room = self.budget + finished * self.gain - committed
                if not running:
                    k = max([j for j in range(K + 1) if self.need_at(j) <= room], default=0)
                elif self.need_at(K) <= room:
                    k = K
                else:
                    break
                starts[started], bits[started] = tau, k
                heapq.heappush(running, (tau + length, self.need_at(k)))
                committed += self.need_at(k)
                started += 1
            if started < n:  # nothing changes until the next chain finishes
                tau = max(tau + 1, running[0][0])
        return starts, bits

    def starts(self) -> np.ndarray:
        return self.layout()[0]

    def ticks(self) -> int:
        """Number of ticks in the whole pipeline."""
        return int(self.starts()[-1]) + self.length if self.chains else 0


def in_flight(starts: np.ndarray, length: int, tau: int) -> tuple[int, int]:
    """Chains lo..hi-1 are in flight at tick ``tau`` (chain c is at step tau - starts[c])."""
    lo = int(np.searchsorted(starts + length, tau, side="right"))
    hi = int(np.searchsorted(starts, tau, side="right"))
    return lo, hi
