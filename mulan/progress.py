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
    """A bar for the duration of a ``with`` block; yields ``callback(done, total)`` (total 0: unknown)."""
    from tqdm import tqdm

    fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}<{remaining}]"
    b = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
             bar_format=fmt if total else None)

    def update(done: float, of: float) -> None:
        if of and b.total != of:
            b.total = of
            b.bar_format = fmt
        b.update(done - b.n)

    try:
        yield update
    finally:
        b.close()
