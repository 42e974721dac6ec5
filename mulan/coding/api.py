"""Compress images to one file at about the model's bound, and back: the functions a Python user calls.

:func:`compress_images` codes a tensor of images with a loaded model (``mulan.coding.codec``) and returns the
file's bytes (``mulan.coding.container``); :func:`decompress_bytes` checks bytes against the model and decodes
them. :func:`compress` and :func:`decompress` do the same from and to paths (checkpoint, images, file), as
``mulan compress`` / ``mulan decompress`` do: they never overwrite an existing output and write atomically.
Image files are read by ``mulan.data`` and written by ``mulan.images``.

Decoding repeats the encoder's network calls and needs bit-identical results: decompress on the same machine
type with the same torch build and thread count (the file records the count; see docs/robustness.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mulan.checkpoint import atomic_write, load_checkpoint
from mulan.coding import container
from mulan.coding.ans import CodingError
from mulan.coding.codec import Encoded, decode, encode
from mulan.coding.container import FileFormatError, Header
from mulan.coding.planning import Estimates, estimate
from mulan.coding.schedule import Plan
from mulan.config import Config
from mulan.data import read_input
from mulan.data.files import describe
from mulan.diffusion import Diffusion
from mulan.errors import DataError, MulanError, OutputError
from mulan.images import save_npz, save_png_folder
from mulan.progress import bar, wanted

DEFAULT_TIMESTEPS = 1000
DEFAULT_GRID_BITS = 4
DEFAULT_BATCH = 64
INITIAL_WORDS = 1 << 16  # 256 KiB of pseudo-random words to borrow from; only the consumed part is stored


class CodingModel(NamedTuple):
    """A model as the codec needs it: the network, its configuration and what identifies its weights."""

    model: Diffusion  # in eval mode
    config: Config
    weights_sha256: bytes  # of the EMA weights (``container.weights_sha256``): the file records it


@dataclass
class Compressed:
    """What :func:`compress_images` coded and what it cost."""

    header: Header
    encoded: Encoded
    estimates: Estimates
    data: bytes  # the whole file: header, then payload
    seconds: float
    path: Path | None = None  # where :func:`compress` wrote ``data``

    @property
    def file_bytes(self) -> int:
        return len(self.data)

    @property
    def payload_bits(self) -> int:
        return 32 * len(self.encoded.words)

    def accounting(self) -> dict:
        """Plain numbers of this compression (bits unless stated), with the per-term ledger when it was kept."""
        h, led = self.header, self.encoded.ledger
        return {
            "images": h.images, "dims": h.images * int(np.prod(h.shape)), "timesteps": h.timesteps,
            "grid_bits": h.grid_bits, "batch": h.batch, "threads": h.threads, "seed_images": h.seed_images,
            "file_bytes": self.file_bytes, "header_bytes": container.HEADER_BYTES, "payload_bits": self.payload_bits,
            "net_bits": self.encoded.net_bits, "initial_bits": self.encoded.initial_bits, "seconds": self.seconds,
            "plan": {"budget": h.budget, "need": h.need, "gain": h.gain},
            "estimated_bits_per_image": self.estimates.bits_per_image,
            **(led.summary() if led is not None else {}),
            "ideal_bits_per_image": led.ideal_per_image.tolist() if led is not None else None,
            "expected_bits_per_image": ({k: v.tolist() for k, v in led.expected.items()} if led is not None else None),
        }


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``count`` (0: leave it), then restore it."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def load_model(checkpoint: str | Path, device: str = "cpu") -> CodingModel:
    """The EMA model of a checkpoint, run folder or exported file, in eval mode, with its config and weights hash."""
    from mulan.loading import from_state

    state = load_checkpoint(checkpoint)
    loaded = from_state(state, Path(checkpoint), weights="ema", device=device)
    return CodingModel(loaded.model, loaded.config, container.weights_sha256(state["ema"]))


def check_options(*, timesteps: int = DEFAULT_TIMESTEPS, grid_bits: int = DEFAULT_GRID_BITS,
                  batch: int = DEFAULT_BATCH, threads: int = 0, **_) -> None:
    """:class:`MulanError` for settings the file cannot record or the codec cannot run."""
    if threads < 0 or threads > 255:
        raise MulanError("--threads must be in 0..255")
    if timesteps < 1 or not 0 <= grid_bits <= 12 or batch < 1 or batch > 65535:
        raise MulanError("--timesteps must be >= 1, --grid-bits in 0..12 and --batch in 1..65535")


def compress_images(coder: CodingModel, images: Tensor, *, timesteps: int = DEFAULT_TIMESTEPS,
                    grid_bits: int = DEFAULT_GRID_BITS, batch: int = DEFAULT_BATCH, seed_images: int = -1,
                    seed: int = 0, threads: int = 0, progress: bool = False, ledger: bool = False) -> Compressed:
    """Code ``images`` (N, C, H, W) integers below V into a file's bytes (``.data``).

    The first ``seed_images`` images are stored uniformly to feed the first chains (-1: chosen from estimates),
    the rest by bits-back over the model's T-step chain. ``threads`` 0 keeps torch's thread count; the file
    records the count used (decoding runs the network with the same). ``ledger`` keeps the per-term accounting.
    """
    check_options(timesteps=timesteps, grid_bits=grid_bits, batch=batch, threads=threads)
    if images.shape[0] == 0:
        raise DataError("no images to compress")
    model, cfg = coder.model, coder.config
    with torch_threads(threads):
        t0 = time.perf_counter()
        est = estimate(model, images, timesteps, generator=torch.Generator().manual_seed(seed))
        m = est.seed_images if seed_images < 0 else min(seed_images, images.shape[0])
        budget = container.f32(m * model.n * np.log2(model.num_values))
        plan = Plan(chains=images.shape[0] - m, timesteps=timesteps, batch=batch, budget=budget,
                    need=container.f32(est.need), gain=container.f32(est.gain), grid_bits=grid_bits,
                    pixels=model.n)
        with bar("compress", "ticks", wanted(not progress)) as update:
            enc = encode(model, images, plan, seed_images=m, seed=seed, initial_words=INITIAL_WORDS, ledger=ledger,
                         callback=update)
        header = Header(coder.weights_sha256, container.config_hash(cfg), tuple(cfg.data.shape), model.num_values,
                        timesteps, images.shape[0], m, grid_bits, batch, torch.get_num_threads(), seed,
                        INITIAL_WORDS, enc.shared_words, plan.budget, plan.need, plan.gain, len(enc.words),
                        container.images_hash(images))
        data = container.pack(header, enc.words)
        return Compressed(header, enc, est, data, time.perf_counter() - t0)


def check_model(coder: CodingModel, header: Header, name: str, model_name: str = "this model") -> None:
    """:class:`FileFormatError` unless the file ``name`` was coded with ``coder``'s model (weights, config, shape, V)."""
    sha = coder.weights_sha256
    if sha != header.weights_sha256:
        raise FileFormatError(f"{name} was compressed with another model (weights sha256 "
                              f"{header.weights_sha256.hex()[:16]}..., {model_name} has {sha.hex()[:16]}...)")
    cfg = coder.config
    if (container.config_hash(cfg) != header.config_hash or tuple(cfg.data.shape) != header.shape
            or cfg.data.num_values != header.num_values):
        raise FileFormatError(f"{name} was compressed with the same weights but another model config")


def decode_payload(coder: CodingModel, header: Header, words: np.ndarray, name: str, *,
                   progress: bool = False) -> Tensor:
    """The images of a checked file (:func:`check_model`), decoded and checked against their hash.

    Whatever goes wrong while decoding (a value outside its range, a stream that does not end on its initial
    message, images that do not match their hash) is a :class:`CodingError` calling the file corrupt."""
    plan = Plan(chains=header.images - header.seed_images, timesteps=header.timesteps, batch=header.batch,
                budget=header.budget, need=header.need, gain=header.gain, grid_bits=header.grid_bits,
                pixels=int(np.prod(header.shape)))
    why = ("{name} is corrupt, or was coded on another machine or torch build (the network's results differ): "
           "{what}; nothing was written")
    with torch_threads(header.threads):
        try:
            with bar("decompress", "ticks", wanted(not progress)) as update:
                images = decode(coder.model, words, header.shared_words, plan, shape=header.shape,
                                count=header.images, seed_images=header.seed_images, seed=header.seed,
                                initial_words=header.initial_words, callback=update)
        except CodingError as e:
            raise CodingError(why.format(name=name, what=f"decoding failed ({e})")) from None
        except (KeyboardInterrupt, SystemExit, MulanError):
            raise
        except BaseException as e:  # constriction signals an impossible stream with a Rust panic
            raise CodingError(why.format(name=name, what=f"decoding failed ({describe(e)})")) from None
    if container.images_hash(images) != header.images_hash:
        raise CodingError(why.format(name=name, what="the decoded images do not match their checksum"))
    return images


def decompress_bytes(coder: CodingModel, data: bytes, name: str = "the data", *, progress: bool = False) -> Tensor:
    """The images (N, C, H, W) of a compressed file's bytes, after checking them against ``coder``'s model."""
    header, words = container.unpack(data, name)
    check_model(coder, header, name)
    return decode_payload(coder, header, words, name, progress=progress)


# --- from and to paths ------------------------------------------------------------------------------------------

def check_output(out: Path) -> None:
    """:class:`OutputError` if ``out`` exists (nothing is ever overwritten) or its folder does not."""
    if out.exists() or out.is_symlink():
        raise OutputError(f"{out} already exists; choose another --out (nothing was written)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: folder {parent} does not exist")


def compress(checkpoint: str | Path, out: str | Path, *, source: str | Path | None = None, split: str = "test",
             limit: int = 0, device: str = "cpu", **options) -> Compressed:
    """Code the images of ``source`` (a PNG folder, IDX file or .npz; None: ``split`` of the checkpoint's
    configured data), the first ``limit`` (> 0) only, into a new file ``out``; ``options`` are
    :func:`compress_images`'s."""
    out = Path(out)
    check_output(out)
    check_options(**options)
    coder = load_model(checkpoint, device)
    images = read_input(coder.config.data, source, split, limit)
    result = compress_images(coder, images, **options)
    atomic_write(out, lambda f: f.write(result.data))
    result.path = out
    return result


def read_file(path: str | Path) -> tuple[Header, np.ndarray]:
    """The checked header and payload words of a compressed file."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"compressed file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read {path}: {e.strerror or e}") from None
    return container.unpack(data, str(path))


def decompress(checkpoint: str | Path, file: str | Path, out: str | Path, *, device: str = "cpu",
               progress: bool = False) -> Tensor:
    """Restore the images of ``file`` into ``out`` (a new PNG folder, or an .npz with 'images'); returns them.

    The whole file is checked against the checkpoint before any decoding."""
    out = Path(out)
    check_output(out)
    header, words = read_file(file)
    coder = load_model(checkpoint, device)
    check_model(coder, header, str(file), str(checkpoint))
    if out.suffix != ".npz" and (header.shape[0] not in (1, 3) or header.num_values > 256):
        raise OutputError(f"PNG output needs 1 or 3 channels and V <= 256 (have {header.shape}, V="
                          f"{header.num_values}); write an .npz file instead")
    images = decode_payload(coder, header, words, str(file), progress=progress)
    if out.suffix == ".npz":
        save_npz(out, images=images.numpy())
    else:
        save_png_folder(images, out)
    return images
