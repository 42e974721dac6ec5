"""Step grids: the times 1 = t_N > ... > t_0 = 0 a fixed-step sampler visits, one column per sample.

- ``t``: uniform in t, the same for every sample (the 1,000-step ancestral sampler's grid).
- ``logsnr``: uniform in the pixel-mean log-SNR, -mean_i gamma_i(z, t), between its values at t = 1 and t = 0.
  With a per-pixel schedule the pixel mean depends on z, so each sample gets its own times; for a schedule
  linear in t (VDM's learned_linear) this is the ``t`` grid.

The pixel mean is non-decreasing in t (every pixel's gamma is), so the grid is found by inverting a table of it
on ``TABLE`` uniform times with linear interpolation (the grid only has to be a fixed monotone choice; it need
not hit the targets exactly).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mulan.schedules.base import BoundSchedule

Grid = Literal["t", "logsnr"]
GRIDS: dict[str, str] = {
    "t": "uniform in t",
    "logsnr": "uniform in the pixel-mean log-SNR -mean(gamma(z, t)), per sample",
}
TABLE = 129  # times at which the pixel-mean gamma is tabulated for the logsnr grid


def time_grid(bound: BoundSchedule, steps: int, batch: int, grid: Grid = "t", *, device=None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """(steps + 1, batch) times from 1 down to 0 (row k is t_{N-k}); ``bound`` is the schedule with z fixed."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grid == "t":
        t = torch.arange(steps, -1, -1, dtype=torch.float64, device=device) / steps
        return t.to(dtype)[:, None].expand(steps + 1, batch).contiguous()
    if grid != "logsnr":
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    table_t = torch.linspace(0.0, 1.0, TABLE, dtype=torch.float64, device=device)
    mean_gamma = torch.stack([bound(torch.full((batch,), float(u), device=device, dtype=dtype)).gamma
                              .double().flatten(1).mean(1) for u in table_t], 1)  # (batch, TABLE), non-decreasing
    mean_gamma = torch.cummax(mean_gamma, 1).values  # guard against round-off wiggles
    frac = torch.arange(steps, -1, -1, dtype=torch.float64, device=device) / steps  # 1 .. 0
    targets = mean_gamma[:, :1] + frac * (mean_gamma[:, -1:] - mean_gamma[:, :1])  # (batch, steps + 1)
    hi = torch.searchsorted(mean_gamma.contiguous(), targets.contiguous()).clamp(1, TABLE - 1)
    g_lo, g_hi = mean_gamma.gather(1, hi - 1), mean_gamma.gather(1, hi)
    w = ((targets - g_lo) / (g_hi - g_lo).clamp_min(1e-300)).clamp(0.0, 1.0)
    t = table_t[hi - 1] + w * (table_t[hi] - table_t[hi - 1])
    t[:, 0], t[:, -1] = 1.0, 0.0
    return t.T.to(dtype).contiguous()
