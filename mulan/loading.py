"""``mulan.load``: a trained model from a checkpoint, a run folder or an exported .safetensors file.

One entry point for Python users and the command line alike, so both read the same files the same way: the
commands that read a trained model (eval, sample, plot-schedule, compare) share :func:`load_with_overrides` and
their options (:func:`add_load_options`) from here. Loading builds the model without the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mulan import distributed
from mulan.checkpoint import load_checkpoint, load_weights, resolve_checkpoint
from mulan.config import Config, apply_overrides
from mulan.diffusion import Diffusion, build_model
from mulan.distributed import resolve_device
from mulan.errors import CheckpointError, ConfigError

Weights = Literal["ema", "raw"]
_KEY = {"ema": "ema", "raw": "model"}  # the checkpoint's key of each kind of weights
# What eval, sample, plot-schedule and compare accept as overrides: settings that leave the trained model as it is.
LOAD_OVERRIDES = ("data.", "eval.", "train.device", "train.threads")
LOAD_OVERRIDES_TEXT = "data.*, eval.*, train.device and train.threads"
CHECKPOINT_HELP = "a checkpoint (.pt), a run folder (uses its checkpoints/last.pt) or a `mulan export` .safetensors file"


@dataclass
class Loaded:
    """A model read back from disk, with what identifies it."""

    model: Diffusion  # in eval mode, on the requested device
    config: Config  # the whole configuration it was trained with
    step: int  # training steps done when the checkpoint was written
    weights: Weights  # 'ema' (the exponential moving average) or 'raw' (the optimiser's weights)
    path: Path  # the file read (a run folder resolves to its checkpoints/last.pt)
    note: str = ""  # how a folder was resolved to ``path`` ('' when a file was given)

    @property
    def run_dir(self) -> Path:
        """The run folder the file belongs to (its ``checkpoints/`` parent), else the file's folder."""
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent


def load(path: str | Path, weights: Weights = "ema", device: str | torch.device = "cpu") -> Loaded:
    """Load a trained model for evaluation or sampling.

    Args:
        path: a training checkpoint (``.pt``), a run folder (uses ``checkpoints/last.pt``) or a file written by
            ``mulan export`` (``.safetensors``).
        weights: ``"ema"`` (default; what every reported number uses) or ``"raw"``.
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"auto"``, a :class:`torch.device`).

    Returns a :class:`Loaded`: ``.model`` (eval mode), ``.config``, ``.step``, ``.weights`` and ``.path``.
    Raises :class:`~mulan.errors.CheckpointError` for anything that is not a readable checkpoint of its model.
    """
    file, note = resolve_checkpoint(path)
    state = load_checkpoint(file)
    return from_state(state, file, weights=weights, device=device, note=note)


def from_state(state: dict, path: Path, *, weights: Weights = "ema", device: str | torch.device = "cpu",
               config: Config | None = None, note: str = "") -> Loaded:
    """Build the model of a checkpoint dict (from :func:`~mulan.checkpoint.load_checkpoint`) and load its weights.

    ``config`` replaces the checkpoint's own (e.g. with data paths overridden); its model must be the same.
    """
    if weights not in _KEY:
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    key = _KEY[weights]
    if key not in state:
        have = [w for w, k in _KEY.items() if k in state]
        raise CheckpointError(f"{path} holds no {weights} weights (it has: {', '.join(have) or 'none'})")
    cfg = config or state["config"]
    model = build_model(cfg)
    load_weights(model, state[key], path, "EMA" if weights == "ema" else "raw")
    dev = resolve_device(device) if isinstance(device, str) else device
    return Loaded(model=model.to(dev).eval(), config=cfg, step=int(state.get("step", 0)), weights=weights,
                  path=Path(path), note=note)


def set_flag(cfg: Config, flag: str, key: str, value) -> Config:
    """A command-line flag that sets a config field passes the field's own checks (named after the flag);
    ``value`` None leaves ``cfg`` as it is."""
    if value is None:
        return cfg
    try:
        return apply_overrides(cfg, [f"{key}={value}"])
    except ConfigError as e:
        raise ConfigError(f"{flag} {value}: {e}") from None


def load_with_overrides(checkpoint: str | Path, overrides: list[str] = (), flags: tuple = (), *,
                        weights: Weights = "ema", join_ranks: bool = False) -> Loaded:
    """What a command that reads a trained model loads: the model of ``checkpoint`` (a file or a run folder) with
    its config under the user's ``overrides`` (:data:`LOAD_OVERRIDES` only: the model stays as trained) and the
    ``flags`` ((flag, key, value), ...) applied; ``train.threads`` > 0 sets torch's thread count, and
    ``join_ranks`` puts this process on its rank's device of a torchrun job. Prints how a folder was resolved."""
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(LOAD_OVERRIDES)]
    if bad:
        raise ConfigError(f"only {LOAD_OVERRIDES_TEXT} can be overridden here, not {bad[0]!r}")
    file, note = resolve_checkpoint(checkpoint)
    state = load_checkpoint(file)
    cfg = apply_overrides(state["config"], list(overrides))
    for flag, key, value in flags:
        cfg = set_flag(cfg, flag, key, value)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = distributed.setup(cfg.train.device)[1] if join_ranks else resolve_device(cfg.train.device)
    if note and distributed.world().main:
        print(note)
    return from_state(state, file, weights=weights, device=device, config=cfg, note=note)


def load_from_args(args, flags: tuple = (), *, join_ranks: bool = False) -> Loaded:
    """:func:`load_with_overrides` of a command's parsed ``args`` (``checkpoint``, ``overrides``, ``raw``; see
    :func:`add_load_options`)."""
    weights = "raw" if getattr(args, "raw", False) else "ema"
    return load_with_overrides(args.checkpoint, args.overrides, flags, weights=weights, join_ranks=join_ranks)


def add_load_options(parser, what: str) -> None:
    """The options shared by the commands that read a trained model (``what``: what --overwrite replaces)."""
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is "
                                                                       "not a terminal)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} already there")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"config overrides, {LOAD_OVERRIDES_TEXT} only (the model stays as trained), "
                             "e.g. data.path=... eval.batch_size=64")
