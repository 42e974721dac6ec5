"""Summaries of per-image likelihoods: a t-interval for the mean (bits/dim themselves: :func:`mulan.diffusion.bits_per_dim`)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from torch import Tensor


def mean_ci(values: Tensor | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Sample mean and half-width of its two-sided ``level`` confidence interval (Student t, n - 1 dof).

    The half-width is ``t_{(1+level)/2, n-1} * s / sqrt(n)`` with s the sample standard deviation (ddof = 1);
    it is ``inf`` for a single value. Raises ValueError for no values or a level outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.inf
    sem = float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, float(stats.t.ppf(0.5 * (1.0 + level), v.size - 1)) * sem
