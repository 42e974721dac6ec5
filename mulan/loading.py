"""``mulan.load``: a trained model from a checkpoint, a run folder or an exported .safetensors file.

One entry point for Python users and the command line alike, so both read the same files the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mulan.checkpoint import load_checkpoint, load_weights, resolve_checkpoint
from mulan.config import Config
from mulan.diffusion import Diffusion
from mulan.errors import CheckpointError, ConfigError

Weights = Literal["ema", "raw"]
_KEY = {"ema": "ema", "raw": "model"}  # the checkpoint's key of each kind of weights


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
    from mulan.train import build_model, resolve_device

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
