"""``mulan export``: weights and config as safetensors, for sharing (no pickle anywhere).

The file holds the EMA weights (or the raw ones) as tensors and, in its metadata, the whole config as JSON,
the step and which weights these are. :func:`mulan.checkpoint.load_checkpoint` and :func:`mulan.load` read it
back, so ``mulan eval/sample/plot-schedule model.safetensors`` work.
"""

from __future__ import annotations

import json
from pathlib import Path

from mulan.checkpoint import FORMAT, atomic_write, load_checkpoint, refuse_existing, require, resolve_checkpoint
from mulan.config import to_dict


def export(checkpoint: str | Path, out: str | Path | None = None, *, raw: bool = False,
           overwrite: bool = False) -> Path:
    """Write a .safetensors file from a training checkpoint (or run folder); returns its path.

    ``out`` defaults to ``<checkpoint stem>-<ema|raw>-step<N>.safetensors`` beside the checkpoint. An existing
    file is refused unless ``overwrite``.
    """
    from safetensors.torch import save

    file, _ = resolve_checkpoint(checkpoint)
    state = load_checkpoint(file)
    which = "model" if raw else "ema"
    require(state, which, path=file)
    step = int(state.get("step", 0))
    out = Path(out) if out else file.with_name(f"{file.stem}-{'raw' if raw else 'ema'}-step{step}.safetensors")
    refuse_existing([out], overwrite)
    tensors = {k: v.contiguous() for k, v in state[which].items()}
    meta = {"format": FORMAT, "config": json.dumps(to_dict(state["config"])), "step": str(step), "weights": which}
    data = save(tensors, metadata=meta)
    atomic_write(out, lambda f: f.write(data))
    return out


def register(sub) -> None:
    """Add the ``export`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("export", help="write a checkpoint's weights and config as one .safetensors file")
    p.add_argument("checkpoint", help="a checkpoint (.pt) or a run folder (uses its checkpoints/last.pt)")
    p.add_argument("--out", help="output file (default: beside the checkpoint, "
                                 "<checkpoint name>-<ema|raw>-step<N>.safetensors)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an --out file that already exists")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    out = export(args.checkpoint, args.out, raw=args.raw, overwrite=args.overwrite)
    print(f"wrote {out} ({'raw' if args.raw else 'EMA'} weights + config)")
