"""Which chains advance at which tick: a pipeline fed by the bits finished chains leave on the stack.

Each image is one chain of ``T + 2`` steps (step 0: pop x_0, push x; steps 1..T: pop x_i, push x_{i-1};
step T+1: push x_T and z). A *tick* advances every chain in flight by one step with one network call for
all of them. A chain in flight has borrowed about ``need`` bits from the stack (its current latent and,
within a tick, the next one); a finished chain has left about ``gain`` bits on it. Chains start in image
order, one more whenever the bits on the stack cover one more chain in flight:

    start chain c at tick tau  iff  in_flight < batch  and  (in_flight == 0 or
                                    (in_flight + 1) * need <= budget + finished(tau) * gain)

so only the first chain (and any chain started when the stack ran dry) borrows initial bits. The rule
depends only on the numbers in :class:`Plan`, which the file header stores: the decoder rebuilds the same
ticks and runs them backwards, so every network call sees exactly the batch the encoder's did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    """The numbers that fix the pipeline."""

    chains: int  # images coded by bits-back, in order
    timesteps: int  # T
    batch: int  # most chains in flight (and in one network call)
    budget: float  # bits on the stack before the first chain (e.g. images pushed first without bits-back)
    need: float  # bits one chain in flight may borrow
    gain: float  # bits a finished chain leaves on the stack

    @property
    def length(self) -> int:
        """Steps (ticks) one chain takes."""
        return self.timesteps + 2

    def starts(self) -> np.ndarray:
        """The tick at which each chain starts (non-decreasing, int64)."""
        n, length = self.chains, self.length
        starts = np.zeros(n, dtype=np.int64)
        started = finished = 0
        tau = 0
        while started < n:
            while finished < started and starts[finished] + length <= tau:
                finished += 1
            in_flight = started - finished
            while started < n and in_flight < self.batch and (
                    in_flight == 0 or (in_flight + 1) * self.need <= self.budget + finished * self.gain):
                starts[started] = tau
                started += 1
                in_flight += 1
            if started < n:  # nothing changes until the next chain finishes
                tau = max(tau + 1, int(starts[finished]) + length) if in_flight >= 1 else tau + 1
        return starts

    def ticks(self) -> int:
        """Number of ticks in the whole pipeline."""
        return int(self.starts()[-1]) + self.length if self.chains else 0


def in_flight(starts: np.ndarray, length: int, tau: int) -> tuple[int, int]:
    """Chains lo..hi-1 are in flight at tick ``tau`` (chain c is at step tau - starts[c])."""
    lo = int(np.searchsorted(starts + length, tau, side="right"))
    hi = int(np.searchsorted(starts, tau, side="right"))
    return lo, hi
