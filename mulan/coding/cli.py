"""``mulan compress`` and ``mulan decompress`` on the command line: options, printed summaries, the report file.

The work is :mod:`mulan.coding.api`'s; every error it raises is a :class:`~mulan.errors.MulanError`, which the
command line prints as one line and exits with status 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mulan.checkpoint import atomic_write
from mulan.coding import api, container


def register(sub) -> None:
    """Add ``compress`` and ``decompress`` to the CLI's subparsers."""
    c = sub.add_parser("compress", help="store images losslessly at about the model's bound (bits-back coding)",
                       epilog="Decompress with the same checkpoint on the same kind of machine and torch build.")
    c.add_argument("checkpoint")
    c.add_argument("input", nargs="?", help="a PNG folder, IDX file or .npz (default: --split of the configured data)")
    c.add_argument("--split", choices=["test", "train", "val"], default="test", help="split of the configured data "
                   "(val: the validation images carved by data.val_size)")
    c.add_argument("--out", required=True, help="the compressed file (must not exist)")
    c.add_argument("--timesteps", type=int, default=api.DEFAULT_TIMESTEPS, help="T: steps of the coded chain")
    c.add_argument("--grid-bits", type=int, default=api.DEFAULT_GRID_BITS,
                   help="latents on grids 2^-k of their standard deviations (finer: closer to the bound, "
                        "fewer images in flight); the first images use coarser grids until the stack holds "
                        "enough bits")
    c.add_argument("--batch", type=int, default=api.DEFAULT_BATCH, help="most images in flight (and per network call)")
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
    r = api.compress(args.checkpoint, args.out, source=args.input, split=args.split, limit=args.limit,
                     device=args.device, timesteps=args.timesteps, grid_bits=args.grid_bits, batch=args.batch,
                     seed_images=args.seed_images, threads=args.threads, progress=not args.no_progress,
                     ledger=bool(args.report))
    if args.report:
        report = r.accounting()
        atomic_write(Path(args.report), lambda f: f.write(json.dumps(report, indent=1).encode()))
    h, n = r.header, r.header.images * int(np.prod(r.header.shape))
    bpd = 8 * r.file_bytes / n
    print(f"compressed {h.images} images ({'x'.join(map(str, h.shape))}, V={h.num_values}) into {r.path}: "
          f"{r.file_bytes} bytes = {bpd:.4f} bits/dim (header {container.HEADER_BYTES} bytes)")
    print(f"payload {r.payload_bits} bits = {r.payload_bits / n:.4f} bits/dim, of which initial bits "
          f"{r.encoded.initial_bits}; without them {r.encoded.net_bits / n:.4f} bits/dim; "
          f"T={h.timesteps}, grid 2^-{h.grid_bits}, {h.seed_images} seed image(s); {h.images / r.seconds:.2f} images/s")


def cmd_decompress(args) -> None:
    t0 = time.perf_counter()
    images = api.decompress(args.checkpoint, args.file, args.out, device=args.device, progress=not args.no_progress)
    print(f"restored {images.shape[0]} images to {args.out} ({images.shape[0] / (time.perf_counter() - t0):.2f} images/s)")
