"""``mulan export``: weights and config as safetensors, for sharing (no pickle anywhere).

The file holds the EMA weights (or the raw ones) as tensors and, in its metadata, the whole config as JSON,
the step and which weights these are. :func:`mulan.checkpoint.load_checkpoint` reads it back, so
``mulan eval/sample/plot-schedule model.safetensors`` work.
"""

from __future__ import annotations

import json
from pathlib import Path

from mulan.checkpoint import FORMAT, atomic_write, load_checkpoint, require
from mulan.config import to_dict


def export(checkpoint: str | Path, out: str | Path, *, raw: bool = False) -> Path:
    """Write ``out`` (.safetensors) from a training checkpoint; returns its path."""
    from safetensors.torch import save

    state = load_checkpoint(checkpoint)
    which = "model" if raw else "ema"
    require(state, which, path=checkpoint)
    tensors = {k: v.contiguous() for k, v in state[which].items()}
    meta = {"format": FORMAT, "config": json.dumps(to_dict(state["config"])), "step": str(int(state.get("step", 0))),
            "weights": which}
    data = save(tensors, metadata=meta)
    atomic_write(Path(out), lambda f: f.write(data))
    return Path(out)


def register(sub) -> None:
    """Add the ``export`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("export", help="write a checkpoint's weights and config as one .safetensors file")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="output file (default: CHECKPOINT with suffix .safetensors)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".safetensors")
    print(f"wrote {export(args.checkpoint, out, raw=args.raw)} ({'raw' if args.raw else 'EMA'} weights + config)")
