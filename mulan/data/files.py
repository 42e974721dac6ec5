"""File helpers shared by the format readers: existence checks, gzip-aware bounded reads, error wrapping.

Every reader turns whatever goes wrong with a file (missing, unreadable, corrupt) into a one-line
:class:`~mulan.errors.DataError` that names the file, so nothing else escapes :func:`mulan.data.load_splits`.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mulan.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 24  # read in pieces so a header announcing terabytes allocates nothing up front


def one_line(text: str, limit: int = 200) -> str:
    """``text`` squeezed onto one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """A one-line description of an exception: its type and message."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn any exception raised while reading ``path`` (other than DataError) into a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes can fail in many ways; all are input errors
        raise DataError(f"cannot read {what} {path}: {describe(exc)}") from exc


def resolve(text: str) -> Path:
    """A path from a config string, with ``~`` expanded."""
    return Path(text).expanduser()


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is an existing, non-empty file; otherwise DataError naming it."""
    with reading(path, what):
        if not path.exists():
            raise DataError(f"{what} {path} does not exist")
        if path.is_dir():
            raise DataError(f"{what} {path} is a folder, expected a file")
        if path.stat().st_size == 0:
            raise DataError(f"{what} {path} is empty")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is an existing folder; otherwise DataError naming it."""
    with reading(path, what):
        if not path.exists():
            raise DataError(f"{what} {path} does not exist")
        if not path.is_dir():
            raise DataError(f"{what} {path} is not a folder")
    return path


def open_maybe_gzip(path: Path) -> BinaryIO:
    """``path`` opened for reading bytes, transparently gunzipped when it starts with the gzip magic."""
    with open(path, "rb") as probe:
        compressed = probe.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]


def read_at_most(stream: BinaryIO, count: int) -> bytearray:
    """Up to ``count`` bytes from ``stream`` (fewer at end of file), read in bounded chunks."""
    out = bytearray()
    while len(out) < count:
        piece = stream.read(min(CHUNK_BYTES, count - len(out)))
        if not piece:
            break
        out += piece
    return out
