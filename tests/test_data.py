"""The data module: every format round-trips pixel-exactly, splits are fixed, bad input is a one-line DataError."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mulan.config import DataConfig
from mulan.data import FASHION_MNIST_DIR, ImageDataset, load_splits
from mulan.errors import DataError

RNG = np.random.default_rng(0)


def random_images(n: int, shape: tuple[int, ...], num_values: int = 256) -> np.ndarray:
    return RNG.integers(0, num_values, size=(n, *shape), dtype=np.uint8)


def data_error(cfg: DataConfig, *fragments: str) -> str:
    """Load ``cfg``, expecting a one-line DataError that mentions every fragment."""
    with pytest.raises(DataError) as info:
        load_splits(cfg)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def rows(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


# ---------------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_values_and_split_sizes():
    train, test = load_splits(DataConfig())
    assert (len(train), len(test)) == (1797 - 359, 359)  # round(0.2 * 1797) = 359
    for ds, split in ((train, "train"), (test, "test")):
        assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
        assert tuple(ds.images.shape[1:]) == (1, 8, 8)
        assert ds.num_values == 17 and int(ds.images.max()) == 16
        assert (ds.name, ds.split, ds.source) == ("digits", split, "sklearn digits")


def test_digits_split_is_a_fixed_partition():
    from sklearn.datasets import load_digits

    train, test = load_splits(DataConfig())
    again_train, again_test = load_splits(DataConfig())
    assert train.fingerprint() == again_train.fingerprint() and test.fingerprint() == again_test.fingerprint()
    other_train, other_test = load_splits(DataConfig(split_seed=1))
    assert other_train.fingerprint()["sha256"] != train.fingerprint()["sha256"]
    assert other_test.fingerprint()["sha256"] != test.fingerprint()["sha256"]
    assert not set(rows(train.images)) & set(rows(test.images))  # the digits hold no duplicate images
    everything = load_digits().images.astype(np.uint8).reshape(-1, 1, 8, 8)
    assert Counter(rows(train.images)) + Counter(rows(test.images)) == Counter(rows(torch.from_numpy(everything)))


def test_limit_keeps_the_first_images_of_each_split():
    train, test = load_splits(DataConfig())
    small_train, small_test = load_splits(DataConfig(limit=10))
    assert torch.equal(small_train.images, train.images[:10]) and torch.equal(small_test.images, test.images[:10])


def test_validation_names_expected_and_found():
    data_error(DataConfig(shape=(1, 9, 9)), "(1, 9, 9)", "(1, 8, 8)", "sklearn digits")
    data_error(DataConfig(num_values=16), "16", "num_values=16")


# ---------------------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_identifies_the_images():
    images = torch.from_numpy(random_images(5, (3, 4, 4)))
    a = ImageDataset(images.clone(), 256, "x", "test", "here")
    b = ImageDataset(images.clone(), 256, "x", "test", "there")
    assert a.fingerprint()["sha256"] == b.fingerprint()["sha256"]
    fp = a.fingerprint()
    assert {"name", "split", "count", "shape", "num_values", "sha256"} <= set(fp)
    assert (fp["count"], fp["shape"], fp["num_values"]) == (5, [3, 4, 4], 256)
    changed = images.clone()
    changed[4, 2, 3, 1] ^= 1
    assert ImageDataset(changed, 256, "x", "test", "here").fingerprint() != fp
    fp["shape"].append(0)  # the cached fingerprint is not mutable from outside
    assert a.fingerprint()["shape"] == [3, 4, 4]


# ---------------------------------------------------------------------------------------------------------
# idx and fashion-mnist


def idx_bytes(images: np.ndarray) -> bytes:
    n, _, h, w = images.shape
    return struct.pack(">IIII", 0x803, n, h, w) + images.tobytes()


def write_idx(path: Path, images: np.ndarray) -> Path:
    data = idx_bytes(images)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    train, test = random_images(7, (1, 5, 6)), random_images(3, (1, 5, 6))
    train_path = write_idx(tmp_path / f"train{suffix}", train)
    test_path = write_idx(tmp_path / f"test{suffix}", test)
    cfg = DataConfig(name="idx", path=str(train_path), test_path=str(test_path), shape=(1, 5, 6), num_values=256)
    got_train, got_test = load_splits(cfg)
    assert np.array_equal(got_train.images.numpy(), train) and np.array_equal(got_test.images.numpy(), test)
    assert got_train.source == str(train_path) and got_test.source == str(test_path)


def test_idx_without_test_file_is_split_by_fraction(tmp_path):
    images = random_images(10, (1, 2, 2))
    cfg = DataConfig(name="idx", path=str(write_idx(tmp_path / "all", images)), shape=(1, 2, 2), num_values=256)
    train, test = load_splits(cfg)
    assert (len(train), len(test)) == (8, 2)
    assert sorted(rows(train.images) + rows(test.images)) == sorted(rows(torch.from_numpy(images)))


def test_idx_bad_inputs(tmp_path):
    good = idx_bytes(random_images(4, (1, 3, 3)))
    cases = {
        "truncated": (good[:-1], "truncated"),
        "header": (good[:10], "truncated"),
        "extra": (good + b"\x00", "corrupt"),
        "labels": (struct.pack(">II", 0x801, 4) + bytes(4), "label file"),
        "magic": (b"\x00\x00\x09\x03" + good[4:], "magic"),
        "empty": (b"", "empty"),
        "none": (struct.pack(">IIII", 0x803, 0, 3, 3), "no images"),
        "badgz.gz": (b"\x1f\x8b" + good, "cannot read"),
    }
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
        cfg = DataConfig(name="idx", path=str(tmp_path / name), shape=(1, 3, 3), num_values=256)
        data_error(cfg, name, fragment)
    data_error(DataConfig(name="idx", path=str(tmp_path / "missing")), "missing", "does not exist")
    data_error(DataConfig(name="idx", path=str(tmp_path)), "folder")
    (tmp_path / "ok").write_bytes(good)
    data_error(DataConfig(name="idx", path=str(tmp_path / "ok"), num_values=256), "(1, 3, 3)", "(1, 8, 8)")
    small = DataConfig(name="idx", path=str(tmp_path / "ok"), shape=(1, 3, 3), num_values=2)
    data_error(small, "num_values=2", "ok")


def test_fashion_mnist_folder(tmp_path):
    train, test = random_images(6, (1, 28, 28)), random_images(2, (1, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    cfg = DataConfig(name="fashion-mnist", path=str(tmp_path), shape=(1, 28, 28), num_values=256)
    got_train, got_test = load_splits(cfg)
    assert np.array_equal(got_train.images.numpy(), train) and np.array_equal(got_test.images.numpy(), test)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    data_error(cfg, "t10k-images-idx3-ubyte.gz", "apt-get install dataset-fashion-mnist")


def test_fashion_mnist_debian_package():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR})")
    train, test = load_splits(DataConfig(name="fashion-mnist", shape=(1, 28, 28), num_values=256))
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.float().std() > 50  # real photographs, not blank


# ---------------------------------------------------------------------------------------------------------
# cifar10


def py2_pickle(rows: np.ndarray) -> bytes:
    """What Python 2's cPickle (protocol 2) wrote for a CIFAR batch: str keys/bytes as BINSTRING, numpy.core."""

    def binstring(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b

    n, d = rows.shape
    return (b"\x80\x02}q\x00(" + binstring(b"data")
            + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + binstring(b"b") + b"\x87R("
            + b"K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", d) + b"\x86"
            + b"cnumpy\ndtype\n" + binstring(b"u1") + b"\x89\x88\x87R(K\x03" + binstring(b"|")
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            + b"\x89" + binstring(rows.tobytes()) + b"tb"
            + binstring(b"labels") + b"](" + b"K\x01" * n + b"eu.")


def cifar_pickle(images: np.ndarray, style: str = "py3") -> bytes:
    """A python-version batch pickled by numpy 2 ("py3"), the same naming numpy.core ("py3-core"), or Python 2."""
    rows = images.reshape(len(images), -1)
    if style == "py2":
        return py2_pickle(rows)
    data = pickle.dumps({b"data": rows, b"labels": [0] * len(images)}, protocol=2)
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if style == "py3-core" else data


def write_cifar(folder: Path, version: str, style: str = "py3") -> tuple[np.ndarray, np.ndarray]:
    """Five training batches of 2 images and a test batch of 3, in the given version's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = [random_images(2, (3, 32, 32)) for _ in range(5)] + [random_images(3, (3, 32, 32))]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, images in zip(names, batches, strict=True):
        if version == "py":
            (folder / name).write_bytes(cifar_pickle(images, style))
        else:
            labels = np.arange(len(images), dtype=np.uint8)[:, None]
            (folder / f"{name}.bin").write_bytes(np.hstack([labels, images.reshape(len(images), -1)]).tobytes())
    return np.concatenate(batches[:5]), batches[5]


def cifar_cfg(path: Path) -> DataConfig:
    return DataConfig(name="cifar10", path=str(path), shape=(3, 32, 32), num_values=256)


@pytest.mark.parametrize("version,style,parent", [
    ("py", "py3", False), ("py", "py3-core", True), ("py", "py2", False), ("bin", "", False), ("bin", "", True)])
def test_cifar_round_trip(tmp_path, version, style, parent):
    folder = tmp_path / f"cifar-10-batches-{version}" if parent else tmp_path
    train, test = write_cifar(folder, version, style)
    got_train, got_test = load_splits(cifar_cfg(tmp_path))
    assert np.array_equal(got_train.images.numpy(), train) and np.array_equal(got_test.images.numpy(), test)


class Exploit:
    """Unpickling this would run a shell command that creates the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path, "py")
    canary = tmp_path / "canary"
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": Exploit(canary)}, protocol=2))
    data_error(cifar_cfg(tmp_path), "refusing to unpickle", "system", "data_batch_2", "hold only arrays")
    assert not canary.exists()
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps([eval, "1"], protocol=4))
    data_error(cifar_cfg(tmp_path), "refusing to unpickle builtins.eval")
    (tmp_path / "data_batch_2").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.")
    data_error(cifar_cfg(tmp_path), "data_batch_2", "refusing _codecs.encode")


def test_cifar_pickle_cannot_exhaust_memory_crash_or_tamper(tmp_path):
    """Pickles that only use allowed globals but would blow up CPython's memo, crash numpy or modify globals."""
    write_cifar(tmp_path, "py")
    batch = tmp_path / "data_batch_4"
    batch.write_bytes(b"\x80\x02Nr\xff\xff\xff\x7f.")  # LONG_BINPUT 2**31-1: a 16 GiB memo in the C unpickler
    data_error(cifar_cfg(tmp_path), "data_batch_4", "memo index 2147483647")
    # an object array whose state announces 10 items but holds 3: numpy 2.4's own __setstate__ segfaults on it
    short = pickle.dumps({b"data": np.array([1, 2, 3], dtype=object)}, protocol=2).replace(b"K\x01K\x03\x85",
                                                                                          b"K\x01K\x0a\x85")
    batch.write_bytes(short)
    data_error(cifar_cfg(tmp_path), "data_batch_4", "dtype 'O8'")
    # BUILD opcodes aimed at the allowed globals themselves (would persist into later loads)
    for target in (b"cnumpy\ndtype\n", b"c_codecs\nencode\n", b"cnumpy\nndarray\n"):
        batch.write_bytes(b"\x80\x02" + target + b"N}X\x04\x00\x00\x00codeK\x01s\x86b.")
        data_error(cifar_cfg(tmp_path), "data_batch_4", "cannot read")
    write_cifar(tmp_path, "py")
    assert len(load_splits(cifar_cfg(tmp_path))[0]) == 10


def test_cifar_bad_inputs(tmp_path):
    write_cifar(tmp_path, "py")
    cases = {
        "not a pickle": (b"hello world", "cannot read"),
        "wrong keys": (pickle.dumps({b"pixels": np.zeros((1, 3072), np.uint8)}, protocol=2), "b'data'"),
        "wrong dtype": (pickle.dumps({b"data": np.zeros((1, 3072), np.float32)}, protocol=2), "dtype 'f4'"),
        "wrong width": (pickle.dumps({b"data": np.zeros((1, 100), np.uint8)}, protocol=2), "(N, 3072)"),
        "not a dict": (pickle.dumps([1, 2], protocol=2), "list"),
        "truncated": (cifar_pickle(random_images(2, (3, 32, 32)))[:-20], "cannot read"),
    }
    for data, fragment in cases.values():
        (tmp_path / "test_batch").write_bytes(data)
        data_error(cifar_cfg(tmp_path), "test_batch", fragment)
    os.remove(tmp_path / "data_batch_3")
    data_error(cifar_cfg(tmp_path), "data_batch_3", "does not exist")
    data_error(cifar_cfg(tmp_path / "nowhere"), "nowhere", "does not exist")
    data_error(cifar_cfg(tmp_path / "data_batch_1"), "data_batch_1", "not a folder")
    (tmp_path / "elsewhere").mkdir()
    data_error(cifar_cfg(tmp_path / "elsewhere"), "elsewhere", "no CIFAR-10 batches")


def test_cifar_binary_bad_inputs(tmp_path):
    write_cifar(tmp_path, "bin")
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    data_error(cifar_cfg(tmp_path), "test_batch.bin", "not a multiple of the 3073-byte record")
    path.write_bytes(b"")
    data_error(cifar_cfg(tmp_path), "test_batch.bin", "empty")
    write_cifar(tmp_path, "bin")
    data_error(DataConfig(name="cifar10", path=str(tmp_path)), "(1, 8, 8)", "(3, 32, 32)")


# ---------------------------------------------------------------------------------------------------------
# imagenet32


def write_npz(path: Path, images: np.ndarray) -> Path:
    np.savez(path, data=images.reshape(len(images), -1), labels=np.ones(len(images), np.int64))
    return path


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


@pytest.mark.parametrize("side", [32, 64])
def test_imagenet_folder_round_trip(tmp_path, side):
    shape = (3, side, side)
    batches = {i: random_images(2, shape) for i in (1, 2, 10)}  # batch 10 must come after batch 2
    for i, images in batches.items():
        write_npz(tmp_path / f"train_data_batch_{i}.npz", images)
    test = random_images(3, shape)
    write_npz(tmp_path / "val_data.npz", test)
    train, got_test = load_splits(DataConfig(name="imagenet32", path=str(tmp_path), shape=shape, num_values=256))
    assert np.array_equal(train.images.numpy(), np.concatenate([batches[1], batches[2], batches[10]]))
    assert np.array_equal(got_test.images.numpy(), test)
    limited, _ = load_splits(DataConfig(name="imagenet32", path=str(tmp_path), shape=shape, num_values=256, limit=3))
    assert np.array_equal(limited.images.numpy(), np.concatenate([batches[1], batches[2]])[:3])


def test_imagenet_single_file_is_split_by_fraction(tmp_path):
    images = random_images(10, (3, 32, 32))
    cfg = DataConfig(name="imagenet32", path=str(write_npz(tmp_path / "all.npz", images)), shape=(3, 32, 32),
                     num_values=256)
    train, test = load_splits(cfg)
    assert (len(train), len(test)) == (8, 2)
    assert sorted(rows(train.images) + rows(test.images)) == sorted(rows(torch.from_numpy(images)))


def test_imagenet_bad_inputs(tmp_path):
    cfg = DataConfig(name="imagenet32", path=str(tmp_path / "x.npz"), test_path=str(tmp_path / "x.npz"),
                     shape=(3, 32, 32), num_values=256)
    path = tmp_path / "x.npz"
    cases = {
        "not a zip": lambda: path.write_bytes(b"PK not really"),
        "no data": lambda: np.savez(path, pixels=np.zeros((1, 3072), np.uint8)),
        "wrong dtype": lambda: np.savez(path, data=np.zeros((1, 3072), np.int16)),
        "object array": lambda: np.savez(path, data=np.array([[1], "a"], dtype=object)),
        "not square": lambda: np.savez(path, data=np.zeros((1, 3000), np.uint8)),
        "truncated": lambda: path.write_bytes(write_npz(path, random_images(2, (3, 32, 32))).read_bytes()[:-30]),
        "corrupt": lambda: path.write_bytes(flip_byte(write_npz(path, random_images(2, (3, 32, 32))).read_bytes())),
    }
    fragments = {"not a zip": "not a zip", "no data": "'data'", "wrong dtype": "int16", "object array": "cannot read",
                 "not square": "square", "truncated": "not a zip", "corrupt": "CRC"}
    for what, write in cases.items():
        write()
        data_error(cfg, "x.npz", fragments[what])
    write_npz(path, random_images(2, (3, 64, 64)))
    data_error(cfg, "(3, 64, 64)", "(3, 32, 32)")
    data_error(DataConfig(name="imagenet32", path=str(tmp_path / "gone")), "gone", "does not exist")
    (tmp_path / "folder").mkdir()
    data_error(DataConfig(name="imagenet32", path=str(tmp_path / "folder")), "folder", "train_data_batch_*.npz")


# ---------------------------------------------------------------------------------------------------------
# png


def write_pngs(folder: Path, images: np.ndarray, names: list[str]) -> None:
    for name, image in zip(names, images, strict=True):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        array = image.transpose(1, 2, 0)
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(folder / name)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(tmp_path, channels):
    shape = (channels, 5, 7)
    names = ["b.png", "a/z.png", "a/b.PNG", "c/d/e.png"]  # sorted by relative path: a/b, a/z, b, c/d/e
    train, test = random_images(4, shape), random_images(2, shape)
    write_pngs(tmp_path / "train", train, names)
    write_pngs(tmp_path / "test", test, ["1.png", "2.png"])
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    cfg = DataConfig(name="png", path=str(tmp_path / "train"), test_path=str(tmp_path / "test"), shape=shape,
                     num_values=256)
    got_train, got_test = load_splits(cfg)
    assert np.array_equal(got_train.images.numpy(), train[[2, 1, 0, 3]])
    assert np.array_equal(got_test.images.numpy(), test)


def test_png_converts_modes_and_splits_by_fraction(tmp_path):
    grey = random_images(5, (1, 4, 4))
    write_pngs(tmp_path, np.repeat(grey, 3, axis=1), [f"{i}.png" for i in range(5)])  # RGB files with R=G=B
    train, test = load_splits(DataConfig(name="png", path=str(tmp_path), shape=(1, 4, 4), num_values=256))
    assert (len(train), len(test)) == (4, 1)
    assert sorted(rows(train.images) + rows(test.images)) == sorted(rows(torch.from_numpy(grey)))


def test_png_bad_inputs(tmp_path):
    cfg = DataConfig(name="png", path=str(tmp_path), shape=(1, 4, 4), num_values=256)
    data_error(cfg, str(tmp_path), "no .png files")
    write_pngs(tmp_path, random_images(3, (1, 4, 4)), ["a.png", "b.png", "c.png"])
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "b.png")
    data_error(cfg, "b.png", "5x4", "expected 4x4")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data_error(cfg, "b.png", "cannot read")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "b.png")
    data_error(cfg, "b.png", "8-bit")
    (tmp_path / "b.png").unlink()
    data_error(DataConfig(name="png", path=str(tmp_path), shape=(2, 4, 4)), "1 (grey) or 3 (RGB)")
    data_error(DataConfig(name="png", path=str(tmp_path), shape=(1, 4, 4), num_values=17), "num_values=17")
    data_error(DataConfig(name="png", path=str(tmp_path / "none"), shape=(1, 4, 4)), "none", "does not exist")


# ---------------------------------------------------------------------------------------------------------
# synthetic


@pytest.mark.parametrize("shape,num_values", [((1, 8, 8), 17), ((3, 16, 12), 256), ((2, 5, 5), 2)])
def test_synthetic_is_deterministic_structured_and_in_range(shape, num_values):
    cfg = DataConfig(name="synthetic", shape=shape, num_values=num_values)
    train, test = load_splits(cfg)
    assert (len(train), len(test)) == (512, 128)
    assert tuple(train.images.shape[1:]) == shape and int(train.images.max()) < num_values
    assert load_splits(cfg)[0].fingerprint() == train.fingerprint()
    assert load_splits(DataConfig(name="synthetic", shape=shape, num_values=num_values, split_seed=3))[1] \
        .fingerprint()["sha256"] != test.fingerprint()["sha256"]
    x = train.images.double()
    right = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    assert right > 0.5  # neighbouring pixels are correlated: smooth images, not uniform noise
    assert len(set(rows(train.images))) > 500  # and varied


# ---------------------------------------------------------------------------------------------------------
# the validation split


def test_validation_is_carved_from_train_and_never_overlaps():
    """val + train is exactly the old training split (as multisets of images, each in file order), test is
    untouched, and the carve depends only on split_seed."""
    from mulan.data import load_all_splits

    full_train, full_test = load_splits(DataConfig())
    splits = load_all_splits(DataConfig(val_size=200))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert (len(train), len(val)) == (len(full_train) - 200, 200)
    assert torch.equal(test.images, full_test.images)
    assert Counter(rows(train.images)) + Counter(rows(val.images)) == Counter(rows(full_train.images))
    assert (val.split, val.source) == ("val", train.source)
    again = load_all_splits(DataConfig(val_size=200))["val"]
    assert torch.equal(again.images, val.images)
    other = load_all_splits(DataConfig(val_size=200, split_seed=1))["val"]
    assert not torch.equal(other.images, val.images)
    assert val.fingerprint()["sha256"] != train.fingerprint()["sha256"]


def test_validation_split_of_a_file_with_its_own_test_split(tmp_path):
    """IDX files come with a test file: val comes out of the training file only, and both parts keep the file's
    order (the random images are distinct, so an image's position in the file identifies it)."""
    from mulan.data import load_all_splits

    imgs, tests = random_images(50, (1, 6, 6)), random_images(9, (1, 6, 6))
    write_idx(tmp_path / "train.idx", imgs)
    write_idx(tmp_path / "test.idx", tests)
    cfg = DataConfig(name="idx", path=str(tmp_path / "train.idx"), test_path=str(tmp_path / "test.idx"),
                     shape=(1, 6, 6), num_values=256, val_size=10)
    splits = load_all_splits(cfg)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 10, 9]
    assert Counter(rows(splits["train"].images)) + Counter(rows(splits["val"].images)) == \
        Counter(rows(torch.from_numpy(imgs)))
    assert torch.equal(splits["test"].images, torch.from_numpy(tests))
    where = {r: i for i, r in enumerate(rows(torch.from_numpy(imgs)))}
    assert len(where) == 50
    for part in ("train", "val"):
        order = [where[r] for r in rows(splits[part].images)]
        assert order == sorted(order)


def test_validation_errors_are_one_line():
    from mulan.data import load_split

    data_error(DataConfig(val_size=1438), "data.val_size=1438", "1438")
    with pytest.raises(DataError) as info:
        load_split(DataConfig(), "val")
    assert "data.val_size" in str(info.value) and "\n" not in str(info.value)
