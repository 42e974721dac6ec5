"""A restricted unpickler for CIFAR-10 batches: it rebuilds uint8 numpy arrays and nothing else.

Restricting ``find_class`` to numpy's array globals is not enough on its own: numpy's real
``ndarray.__setstate__`` trusts its state (numpy 2.4 segfaults on an object array whose list is shorter
than its shape), and CPython's C unpickler allocates its memo up to any index a PUT names. So:

* the allowed globals resolve to inert stand-ins that only record their arguments and state; after
  loading, :func:`to_uint8_array` checks a recorded array (uint8, 2-D, exactly the announced bytes) and
  builds it with ``np.frombuffer``. No numpy code ever sees pickle-controlled state.
* :func:`check_memo` rejects, before unpickling, memo indices larger than the number of opcodes read.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mulan.data.files import one_line
from mulan.errors import DataError

MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
UINT8_CODES = {"u1", "|u1", "uint8", "B"}


class Recorded:
    """Arguments of an allowed call, then the state a BUILD opcode gives it (once)."""

    __slots__ = ("args", "state")

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise ValueError("state set twice")
        self.state = state


class DtypeSpec(Recorded):
    """Stands in for ``numpy.dtype(code, align, copy)``."""

    __slots__ = ()

    def code(self) -> str:
        code = self.args[0] if self.args else None
        return code.decode("latin-1") if isinstance(code, bytes) else str(code)


class ArraySpec(Recorded):
    """Stands in for ``_reconstruct(ndarray, (0,), b'b')``; BUILD records (version, shape, dtype, fortran, bytes)."""

    __slots__ = ()


class ScalarSpec(Recorded):
    """Stands in for a numpy scalar (e.g. a label); never turned into anything."""

    __slots__ = ()


class Global:
    """What an allowed global resolves to: a slotless callable, so BUILD opcodes cannot modify it."""

    __slots__ = ()
    makes: type[Recorded] = Recorded

    def __call__(self, *args: Any) -> Recorded:
        return self.makes(*args)


class MakeDtype(Global):
    __slots__ = ()
    makes = DtypeSpec


class MakeArray(Global):
    __slots__ = ()
    makes = ArraySpec


class MakeScalar(Global):
    __slots__ = ()
    makes = ScalarSpec


class Latin1Encode(Global):
    """``_codecs.encode`` as protocol-2 pickles use it to store bytes, restricted to latin-1 text."""

    __slots__ = ()

    def __call__(self, text: Any, encoding: Any = "latin1") -> bytes:  # type: ignore[override]
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise ValueError(f"refusing _codecs.encode to {one_line(repr(encoding), 40)}")
        return text.encode("latin-1")


NDARRAY = Global()  # stands in for the class numpy.ndarray (only ever an argument of _reconstruct)
ALLOWED_GLOBALS: dict[tuple[str, str], Global] = {
    ("numpy.core.multiarray", "_reconstruct"): MakeArray(),
    ("numpy._core.multiarray", "_reconstruct"): MakeArray(),
    ("numpy.core.multiarray", "scalar"): MakeScalar(),
    ("numpy._core.multiarray", "scalar"): MakeScalar(),
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): MakeDtype(),
    ("_codecs", "encode"): Latin1Encode(),
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`, refusing anything else with a DataError."""

    def __init__(self, data: bytes, source: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            target = one_line(f"{module}.{name}", 80)
            raise DataError(f"refusing to unpickle {target} from {self.source}: CIFAR-10 batches hold only arrays")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing a persistent id in {self.source}: CIFAR-10 batches hold only arrays")


def check_memo(data: bytes, source: Path) -> None:
    """DataError if a memo index exceeds the opcodes before it (a pickler numbers its memo 0, 1, 2, ...)."""
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
        if opcode.name in MEMO_PUTS and arg > count:
            raise DataError(f"{source} is corrupt: pickle memo index {arg} at opcode {count}")


def safe_load(data: bytes, source: Path) -> Any:
    """Unpickle ``data`` (a CIFAR-10 python batch from ``source``) with the stand-ins above."""
    with warnings.catch_warnings():  # odd escapes in corrupt STRING opcodes warn; they are errors or harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        check_memo(data, source)
        return CifarUnpickler(data, source).load()


def to_uint8_array(value: Any, source: Path, what: str) -> np.ndarray:
    """The uint8 2-D array a recorded ``value`` describes; DataError naming ``source`` otherwise."""
    if not isinstance(value, ArraySpec):
        raise DataError(f"{source}: {what} is a {type(value).__name__}, expected a numpy array")
    if value.args[:1] != (NDARRAY,) or not isinstance(value.state, tuple) or len(value.state) not in (4, 5):
        raise DataError(f"{source}: {what} is not a well-formed numpy array")
    shape, dtype, fortran, raw = value.state[-4:]
    if not isinstance(dtype, DtypeSpec) or dtype.code() not in UINT8_CODES:
        code = dtype.code() if isinstance(dtype, DtypeSpec) else type(dtype).__name__
        raise DataError(f"{source}: {what} has dtype {one_line(repr(code), 40)}, expected uint8")
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(type(s) is int and s >= 0 for s in shape)):
        raise DataError(f"{source}: {what} has shape {one_line(repr(shape), 60)}, expected (N, pixels)")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape):
        size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
        raise DataError(f"{source}: {what} announces shape {shape} but holds {size} bytes")
    array = np.frombuffer(raw, dtype=np.uint8).reshape(shape, order="F" if fortran else "C")
    return np.array(array, order="C")  # a writable C-contiguous copy
