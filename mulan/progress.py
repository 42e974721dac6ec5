"""Progress bars (tqdm) for long steps, fed by the ``callback(done, total)`` of samplers and estimators.

Bars go to stderr, only on the main rank, only when stderr is a terminal (logs and pipes stay clean) and not
with ``--no-progress``.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from mulan import distributed


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def wanted(no_progress: bool = False) -> bool:
    """Whether to draw bars: not switched off, on the main rank, and stderr is a terminal."""
    return not no_progress and distributed.world().main and stderr_is_terminal()


@contextmanager
def bar(desc: str, unit: str, enabled: bool, total: float | None = None) -> Iterator[Callable[[float, float], None]]:
    """A bar for the duration of a ``with`` block; yields ``callback(done, total)`` (total 0 or None: unknown).

    ``done`` may be fractional (a batch part-way through); the count shown is the whole units done.
    """
    from tqdm import tqdm

    # With a known total the bar shows whole units done, "3/359 images", kept in tqdm's {unit} field (its {n} would
    # show a fractional count).
    known = "{desc}: {percentage:3.0f}%|{bar}| {unit} [{elapsed}<{remaining}]"
    open_ended = "{desc}: {n:.0f} " + unit + " [{elapsed}, {rate_fmt}]"
    b = tqdm(total=total or None, desc=desc, unit=f" {unit}", disable=not enabled, dynamic_ncols=True,
             file=sys.stderr, bar_format=known if total else open_ended)

    def update(done: float, of: float) -> None:
        if of:
            b.total, b.bar_format, b.unit = of, known, f"{int(done)}/{int(of)} {unit}"
        b.update(done - b.n)

    if total:
        b.unit = f"0/{int(total)} {unit}"
        b.refresh()
    try:
        yield update
    finally:
        b.close()
