"""``mulan compress`` and ``mulan decompress``: images to one file at about the model's bound, and back.

Compress reads a split of the checkpoint's configured data (``--split``) or a file/folder the data
readers know (PNG folder, IDX file, .npz), codes it (``mulan.coding.codec``) and writes the file
(``mulan.coding.container``) atomically. Decompress checks the file against the checkpoint before any
work and writes the images, in their original order, to a PNG folder or an .npz file. Neither ever
overwrites an existing output. Decoding repeats the encoder's network calls and needs bit-identical
results: decompress on the same machine type with the same torch build (see docs/robustness.md).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mulan.checkpoint import atomic_write, load_checkpoint
from mulan.progress import bar, wanted
from mulan.coding import container
from mulan.coding.ans import CodingError
from mulan.coding.codec import Encoded, decode, encode
from mulan.coding.container import FileFormatError, Header
from mulan.coding.planning import Estimates, estimate
from mulan.coding.schedule import Plan
from mulan.config import Config
from mulan.data import load_split
from mulan.data.dataset import check_split
from mulan.data.files import describe
from mulan.errors import DataError, MulanError, OutputError

DEFAULT_TIMESTEPS = 1000
DEFAULT_GRID_BITS = 4
DEFAULT_BATCH = 64
INITIAL_WORDS = 1 << 16  # 256 KiB of pseudo-random words to borrow from; only the consumed part is stored


@dataclass
class Compressed:
    """What ``compress`` wrote and what it cost."""

    path: Path
    header: Header
    encoded: Encoded
    estimates: Estimates
    file_bytes: int
    seconds: float

    @property
    def payload_bits(self) -> int:
        return 32 * len(self.encoded.words)


def load_model(checkpoint: str | Path, device: str = "cpu"):
    """(model in eval mode, config, sha256 of its EMA weights) from a checkpoint, run folder or exported file."""
    from mulan.loading import from_state

    state = load_checkpoint(checkpoint)
    loaded = from_state(state, Path(checkpoint), weights="ema", device=device)
    return loaded.model, loaded.config, container.weights_sha256(state["ema"])


def read_images(cfg: Config, source: str | None, split: str, limit: int = 0) -> Tensor:
    """Images (N, C, H, W) uint8 from a split of the configured data, or from a file/folder."""
    if source is None:
        images = load_split(cfg.data, split).images
        where = f"{cfg.data.name} {split} split"
    else:
        path = Path(source).expanduser()
        images, where = _read_path(path, tuple(cfg.data.shape)), str(path)
        check_split(images, cfg.data, "input", where)
    return images[:limit] if limit > 0 else images


def _read_path(path: Path, shape: tuple[int, ...]) -> Tensor:
    from mulan.data.idx import read_idx_images
    from mulan.data.imagenet import read_npz_images
    from mulan.data.png import read_png_folder

    if path.is_dir():
        return read_png_folder(path, shape)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "images" in archive.files:
                    data = archive["images"]
                    if data.dtype != np.uint8 or data.ndim != 4:
                        raise DataError(f"npz file {path}: 'images' is a {data.dtype} array {data.shape}, "
                                        "expected uint8 (N, C, H, W)")
                    return torch.from_numpy(np.ascontiguousarray(data).copy())
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read npz file {path}: {describe(e)}") from None
        return read_npz_images(path, shape)
    return read_idx_images(path)


def _check_output(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise OutputError(f"{out} already exists; choose another --out (nothing was written)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: folder {parent} does not exist")


def compress(checkpoint: str | Path, out: str | Path, *, source: str | None = None, split: str = "test",
             limit: int = 0, timesteps: int = DEFAULT_TIMESTEPS, grid_bits: int = DEFAULT_GRID_BITS,
             batch: int = DEFAULT_BATCH, seed_images: int = -1, seed: int = 0, device: str = "cpu",
             threads: int = 0, progress: bool = False, ledger: bool = False) -> Compressed:
    """Code images into ``out``; see the module docstring. ``seed_images`` -1 chooses it; ``threads`` 0 keeps
    torch's thread count (the file records it: decompress runs the network with the same count)."""
    out = Path(out)
    _check_output(out)
    if threads < 0 or threads > 255:
        raise MulanError("--threads must be in 0..255")
    if threads:
        torch.set_num_threads(threads)
    if timesteps < 1 or not 0 <= grid_bits <= 12 or batch < 1 or batch > 65535:
        raise MulanError("--timesteps must be >= 1, --grid-bits in 0..12 and --batch in 1..65535")
    model, cfg, sha = load_model(checkpoint, device)
    images = read_images(cfg, source, split, limit)
    if images.shape[0] == 0:
        raise DataError("no images to compress")
    t0 = time.perf_counter()
    est = estimate(model, images, timesteps, generator=torch.Generator().manual_seed(seed))
    m = est.seed_images if seed_images < 0 else min(seed_images, images.shape[0])
    budget = container.f32(m * model.n * np.log2(model.num_values))
    plan = Plan(chains=images.shape[0] - m, timesteps=timesteps, batch=batch, budget=budget,
                need=container.f32(est.need), gain=container.f32(est.gain), grid_bits=grid_bits, pixels=model.n)
    with bar("compress", "ticks", wanted(not progress)) as update:
        enc = encode(model, images, plan, seed_images=m, seed=seed, initial_words=INITIAL_WORDS, ledger=ledger,
                     callback=update)
    header = Header(sha, container.config_hash(cfg), tuple(cfg.data.shape), model.num_values, timesteps,
                    images.shape[0], m, grid_bits, batch, torch.get_num_threads(), seed, INITIAL_WORDS,
                    enc.shared_words, plan.budget, plan.need, plan.gain, len(enc.words),
                    container.images_hash(images))
    data = container.pack(header, enc.words)
    seconds = time.perf_counter() - t0
    atomic_write(out, lambda f: f.write(data))
    return Compressed(out, header, enc, est, len(data), seconds)


def read_file(path: str | Path) -> tuple[Header, np.ndarray]:
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
    """Restore the images of ``file`` into ``out`` (a PNG folder, or .npz); returns them."""
    out = Path(out)
    _check_output(out)
    header, words = read_file(file)
    model, cfg, sha = load_model(checkpoint, device)
    if sha != header.weights_sha256:
        raise FileFormatError(f"{file} was compressed with another model (weights sha256 "
                              f"{header.weights_sha256.hex()[:16]}..., {checkpoint} has {sha.hex()[:16]}...)")
    if container.config_hash(cfg) != header.config_hash or tuple(cfg.data.shape) != header.shape:
        raise FileFormatError(f"{file} was compressed with the same weights but another model config")
    if out.suffix != ".npz" and (header.shape[0] not in (1, 3) or header.num_values > 256):
        raise OutputError(f"PNG output needs 1 or 3 channels and V <= 256 (have {header.shape}, V="
                          f"{header.num_values}); write an .npz file instead")
    torch.set_num_threads(header.threads)
    plan = Plan(chains=header.images - header.seed_images, timesteps=header.timesteps, batch=header.batch,
                budget=header.budget, need=header.need, gain=header.gain, grid_bits=header.grid_bits,
                pixels=int(np.prod(header.shape)))
    try:
        with bar("decompress", "ticks", wanted(not progress)) as update:
            images = decode(model, words, header.shared_words, plan, shape=header.shape, count=header.images,
                            seed_images=header.seed_images, seed=header.seed,
                            initial_words=header.initial_words, callback=update)
    except (KeyboardInterrupt, SystemExit, MulanError):
        raise
    except BaseException as e:  # constriction signals an impossible stream with a Rust panic
        raise CodingError(f"decoding {file} failed ({describe(e)}): the file does not match this model, "
                          "or it was coded on another machine or torch build") from None
    if container.images_hash(images) != header.images_hash:
        raise CodingError(f"decoded images of {file} do not match their checksum: it was coded on another "
                          "machine or torch build (the network's results differ); nothing was written")
    write_images(images, out)
    return images


def write_images(images: Tensor, out: Path) -> None:
    """An .npz with 'images' (N, C, H, W) uint8, or a folder of PNGs named by index; never half-written."""
    if out.suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, images=images.numpy())
        atomic_write(out, lambda f: f.write(buf.getvalue()))
        return
    from PIL import Image

    width = max(6, len(str(images.shape[0] - 1)))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i, img in enumerate(images):
            arr = img.permute(1, 2, 0).numpy().astype(np.uint8)
            Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(tmp / f"{i:0{width}d}.png")
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not write {out}: {e.strerror or e} (nothing was written)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- command line ------------------------------------------------------------------------------------------

def register(sub) -> None:
    """Add ``compress`` and ``decompress`` to the CLI's subparsers."""
    c = sub.add_parser("compress", help="store images losslessly at about the model's bound (bits-back coding)",
                       epilog="Decompress with the same checkpoint on the same kind of machine and torch build.")
    c.add_argument("checkpoint")
    c.add_argument("input", nargs="?", help="a PNG folder, IDX file or .npz (default: --split of the configured data)")
    c.add_argument("--split", choices=["test", "train", "val"], default="test", help="split of the configured data "
                   "(val: the validation images carved by data.val_size)")
    c.add_argument("--out", required=True, help="the compressed file (must not exist)")
    c.add_argument("--timesteps", type=int, default=DEFAULT_TIMESTEPS, help="T: steps of the coded chain")
    c.add_argument("--grid-bits", type=int, default=DEFAULT_GRID_BITS,
                   help="latents on grids 2^-k of their standard deviations (finer: closer to the bound, "
                        "fewer images in flight); the first images use coarser grids until the stack holds "
                        "enough bits")
    c.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="most images in flight (and per network call)")
    c.add_argument("--seed-images", type=int, default=-1,
                   help="images stored uniformly first to feed the first chains (default: chosen)")
    c.add_argument("--limit", type=int, default=0, help="only the first N images")
    c.add_argument("--report", help="also write the per-term accounting (coded, ideal and expected bits) to "
                                    "this JSON file (slower)")
    c.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: torch's); decompress uses the same count")
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help="restore images from a `mulan compress` file, bit-exactly")
    d.add_argument("checkpoint")
    d.add_argument("file")
    d.add_argument("--out", required=True, help="a new PNG folder, or a .npz file")
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_decompress)


def cmd_compress(args) -> None:
    r = compress(args.checkpoint, args.out, source=args.input, split=args.split, limit=args.limit,
                 timesteps=args.timesteps, grid_bits=args.grid_bits, batch=args.batch, seed_images=args.seed_images,
                 device=args.device, threads=args.threads, progress=not args.no_progress, ledger=bool(args.report))
    if args.report:
        write_report(r, Path(args.report))
    h, n = r.header, r.header.images * int(np.prod(r.header.shape))
    bpd = 8 * r.file_bytes / n
    print(f"compressed {h.images} images ({'x'.join(map(str, h.shape))}, V={h.num_values}) into {r.path}: "
          f"{r.file_bytes} bytes = {bpd:.4f} bits/dim (header {container.HEADER_BYTES} bytes)")
    print(f"payload {r.payload_bits} bits = {r.payload_bits / n:.4f} bits/dim, of which initial bits "
          f"{r.encoded.initial_bits}; without them {r.encoded.net_bits / n:.4f} bits/dim; "
          f"T={h.timesteps}, grid 2^-{h.grid_bits}, {h.seed_images} seed image(s); {h.images / r.seconds:.2f} images/s")


def write_report(r: Compressed, path: Path) -> None:
    """The accounting of one compression as JSON (bits unless stated)."""
    import json

    h, led = r.header, r.encoded.ledger
    report = {
        "images": h.images, "dims": h.images * int(np.prod(h.shape)), "timesteps": h.timesteps,
        "grid_bits": h.grid_bits, "batch": h.batch, "threads": h.threads, "seed_images": h.seed_images,
        "file_bytes": r.file_bytes, "header_bytes": container.HEADER_BYTES, "payload_bits": r.payload_bits,
        "net_bits": r.encoded.net_bits, "initial_bits": r.encoded.initial_bits, "seconds": r.seconds,
        "plan": {"budget": h.budget, "need": h.need, "gain": h.gain},
        "estimated_bits_per_image": r.estimates.bits_per_image,
        **(led.summary() if led is not None else {}),
        "ideal_bits_per_image": led.ideal_per_image.tolist() if led is not None else None,
        "expected_bits_per_image": ({k: v.tolist() for k, v in led.expected.items()} if led is not None else None),
    }
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))


def cmd_decompress(args) -> None:
    t0 = time.perf_counter()
    images = decompress(args.checkpoint, args.file, args.out, device=args.device, progress=not args.no_progress)
    print(f"restored {images.shape[0]} images to {args.out} ({images.shape[0] / (time.perf_counter() - t0):.2f} images/s)")
