"""Property tests: random and mutated bytes fed to the IDX, CIFAR and npz readers load valid images or raise
a one-line DataError naming the file, and never any other exception.

Run with ``--hypothesis-show-statistics`` to see how many examples each property tried;
``MULAN_FUZZ_EXAMPLES=5000`` runs a longer search.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mulan.data.cifar import read_cifar_bin, read_cifar_pickle
from mulan.data.idx import read_idx_images
from mulan.data.imagenet import read_npz_images
from mulan.errors import DataError

EXAMPLES = int(os.environ.get("MULAN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RNG = np.random.default_rng(0)
CIFAR_ROWS = RNG.integers(0, 256, size=(2, 3072), dtype=np.uint8)
IDX_SEED = struct.pack(">IIII", 0x803, 3, 4, 4) + RNG.integers(0, 256, size=48, dtype=np.uint8).tobytes()
PICKLE_SEED = pickle.dumps({b"data": CIFAR_ROWS, b"labels": [3, 7], b"batch_label": b"x"}, protocol=2)
PY2_PICKLE_SEED = PICKLE_SEED.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
BIN_SEED = np.hstack([np.zeros((2, 1), np.uint8), CIFAR_ROWS]).tobytes()


def npz_seed() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, data=CIFAR_ROWS, labels=np.array([3, 7]))
    return buffer.getvalue()


NPZ_SEED = npz_seed()


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                           st.sampled_from(["start", "end", "anywhere"]), st.integers(0, 1 << 20),
                           st.binary(min_size=1, max_size=8)), min_size=1, max_size=6)


def apply_edits(seed: bytes, edits: list[tuple[str, str, int, bytes]]) -> bytes:
    """``seed`` with a few bytes flipped, overwritten, inserted or deleted, or cut short.

    Positions favour the start and end of the file, where headers and pickle/zip structure live. (The edits
    are drawn independently of the data so that Hypothesis sees the same choices on every replay.)
    """
    data = bytearray(seed)
    for kind, region, number, payload in edits:
        n = len(data)
        where = {"start": number % (min(n, 256) + 1), "end": n - number % (min(n, 96) + 1),
                 "anywhere": number % (n + 1)}[region]
        if kind == "flip" and where < n:
            data[where] ^= 1 << (payload[0] % 8)
        elif kind == "set" and where < n:
            data[where] = payload[0]
        elif kind == "insert":
            data[where:where] = payload
        elif kind == "delete":
            del data[where : where + len(payload)]
        elif kind == "truncate":
            del data[where:]
    return bytes(data)


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Mutated copies of ``seed`` (see :func:`apply_edits`)."""
    return EDITS.map(lambda edits: apply_edits(seed, edits))


def loads_or_data_error(read: Callable[[Path], torch.Tensor], path: Path, data: bytes) -> None:
    """The property: ``read`` returns uint8 (N, C, H, W) images or raises a one-line DataError naming ``path``."""
    path.write_bytes(data)
    try:
        images = read(path)
    except DataError as err:
        message = str(err)
        assert "\n" not in message and path.name in message, message
        return
    assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[0] > 0


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def read_npz(path: Path) -> torch.Tensor:
    return read_npz_images(path, (3, 32, 32))


def test_seeds_are_valid(work):
    """The unmutated seeds load, so the mutation tests start from real files."""
    for name, read, data in [("seed.idx", read_idx_images, IDX_SEED), ("seed.pkl", read_cifar_pickle, PICKLE_SEED),
                             ("seed2.pkl", read_cifar_pickle, PY2_PICKLE_SEED), ("seed.bin", read_cifar_bin, BIN_SEED),
                             ("seed.npz", read_npz, NPZ_SEED)]:
        (work / name).write_bytes(data)
        assert read(work / name).shape[0] > 0


@FUZZ
@given(data=st.one_of(mutations(IDX_SEED), st.binary(max_size=80), st.binary(max_size=64).map(IDX_SEED[:4].__add__)))
def test_idx_mutations(work, data):
    loads_or_data_error(read_idx_images, work / "fuzz.idx", data)


@FUZZ
@given(data=st.one_of(mutations(IDX_SEED).map(gzip.compress), mutations(gzip.compress(IDX_SEED))))
def test_idx_gzip_mutations(work, data):
    loads_or_data_error(read_idx_images, work / "fuzz.idx.gz", data)


@FUZZ
@given(data=st.one_of(mutations(PICKLE_SEED), mutations(PY2_PICKLE_SEED), st.binary(max_size=64),
                      st.binary(max_size=64).map(b"\x80\x02".__add__)))
def test_cifar_pickle_mutations(work, data):
    loads_or_data_error(read_cifar_pickle, work / "data_batch_fuzz", data)


NAME = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), min_size=1, max_size=20)
DANGEROUS = st.sampled_from([("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                             ("subprocess", "Popen"), ("numpy", "load"), ("builtins", "getattr"),
                             ("numpy.core.multiarray", "_reconstruct"), ("_codecs", "encode")])


@FUZZ
@given(target=st.one_of(DANGEROUS, st.tuples(NAME, NAME)), args=st.binary(max_size=16))
def test_cifar_pickle_globals_are_refused(work, target, args):
    """A pickle calling any global with arbitrary bytes: refused, or a failed call to an allowed one."""
    module, name = target
    data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nC" + bytes([len(args)]) + args + b"\x85R."
    loads_or_data_error(read_cifar_pickle, work / "data_batch_global", data)


@FUZZ
@given(data=st.one_of(mutations(BIN_SEED), st.binary(max_size=7000)))
def test_cifar_bin_mutations(work, data):
    loads_or_data_error(read_cifar_bin, work / "data_batch_fuzz.bin", data)


@FUZZ
@given(data=st.one_of(mutations(NPZ_SEED), st.binary(max_size=64), st.binary(max_size=64).map(b"PK\x03\x04".__add__)))
def test_npz_mutations(work, data):
    loads_or_data_error(read_npz, work / "fuzz.npz", data)
