"""Checkpoints: whole or absent, never code.

A checkpoint is a dict of tensors and plain data written with :func:`torch.save` to a temporary file in the
same folder, flushed, fsynced and renamed over the target, so a crash leaves either the old or the new file.
It is read with ``torch.load(weights_only=True)``, which refuses pickles that would build arbitrary objects.
It holds the whole :class:`~mulan.config.Config`, so it alone is enough to evaluate or sample.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from mulan.config import Config, from_dict, to_dict, validate
from mulan.errors import CheckpointError, ConfigError, MulanError, OutputError

FORMAT = "mulan-checkpoint"
VERSION = 1


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"could not write {path}: {e.strerror or e} (the previous file is untouched)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (which must hold 'config' as a :class:`Config`) atomically."""
    payload = dict(state, format=FORMAT, version=VERSION, config=to_dict(state["config"]))
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely; returns its dict with 'config' rebuilt as a validated :class:`Config`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = _load_safetensors(path, map_location)
    else:
        state = _load_torch(path, map_location)
    try:
        state["config"] = validate(from_dict(Config, state["config"]))
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path} holds an invalid config: {e}") from None
    return state


def _load_safetensors(path: Path, map_location) -> dict:
    """A file written by ``mulan export``: tensors plus config, step and which weights in the metadata."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({str(e)[:120]})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file without mulan's metadata (use `mulan export`)")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its config metadata is not valid JSON") from None
    return {"format": FORMAT, "version": VERSION, "config": config, "step": int(meta.get("step", 0)),
            meta.get("weights", "ema"): tensors}


def _load_torch(path: Path, map_location) -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(f"refusing to load {path}: it holds more than weights and plain data ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a mulan checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mulan checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this mulan reads version {VERSION}")
    return state


def load_weights(module: torch.nn.Module, weights: dict, path: Path | str, what: str = "model") -> None:
    """Load a state dict, turning a mismatch into a one-line :class:`CheckpointError`."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as e:
        detail = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path}: the {what} weights do not fit the model its config describes ({detail})") from None


def require(state: dict, *keys: str, path: Path | str = "") -> None:
    """Raise if the checkpoint lacks any of ``keys``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")


__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "load_weights", "require", "MulanError"]
