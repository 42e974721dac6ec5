"""Checkpoints: whole or absent, never code.

A checkpoint is a dict of tensors and plain data written with :func:`torch.save` to a temporary file in the
same folder, flushed, fsynced and renamed over the target, so a crash leaves either the old or the new file.
It is read with ``torch.load(weights_only=True)``, which refuses pickles that would build arbitrary objects.
It holds the whole :class:`~mulan.config.Config`, so it alone is enough to evaluate or sample.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
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


def refuse_existing(paths, overwrite: bool = False) -> None:
    """Raise :class:`OutputError` if any of ``paths`` exists, unless ``overwrite``: results are never replaced
    silently."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise OutputError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (which must hold 'config' as a :class:`Config`) atomically."""
    payload = dict(state, format=FORMAT, version=VERSION, config=to_dict(state["config"]))
    atomic_write(path, lambda f: torch.save(payload, f))


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """The checkpoint file ``path`` names, and a note when it was found inside a folder ('' otherwise).

    A run folder stands for its ``checkpoints/last.pt``, a ``checkpoints`` folder for its ``last.pt``.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate, f"{path} is a folder: using its checkpoint {candidate}"
        raise CheckpointError(f"{path} is a folder without a checkpoint (a run folder holds checkpoints/last.pt); "
                              "give a .pt or .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path, ""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely; returns its dict with 'config' rebuilt as a validated :class:`Config`.

    ``path`` is a training checkpoint (.pt), a ``mulan export`` file (.safetensors) or a run folder (its
    ``checkpoints/last.pt``; see :func:`resolve_checkpoint`).
    """
    path, _ = resolve_checkpoint(path)
    kind = _sniff(path)
    if kind == "safetensors":
        state = _load_safetensors(path, map_location)
    elif kind in ("zip", "pickle"):
        state = _load_torch(path, map_location)
    else:
        hint = ", e.g. RUN/checkpoints/last.pt, or the run folder" if path.name == "config.json" else ""
        raise CheckpointError(f"{path} is {kind}, not a checkpoint (give a mulan .pt or .safetensors file{hint})")
    try:
        state["config"] = validate(from_dict(Config, state["config"]))
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path} holds an invalid config: {e}") from None
    return state


def _sniff(path: Path) -> str:
    """What a file is, from its first bytes: 'zip' (torch.save), 'pickle' (legacy torch.save), 'safetensors',
    or a short description of anything else ("a PNG image", "JSON text", ...)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # safetensors: an 8-byte little-endian header length, then a JSON header. Checked before the pickle marker:
    # a header of 128 + 256 j bytes makes the first byte 0x80 too (a legacy pickle's 9th byte is inside its magic)
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2: torch.save(..., _use_new_zipfile_serialization=False)
        return "pickle"
    if path.suffix == ".safetensors":
        return "safetensors"  # a damaged one: its reader says why
    if not head:
        return "an empty file"
    for magic, what in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x1f\x8b", "a gzip file"),
                        (b"\x93NUMPY", "a NumPy array file")):
        if head.startswith(magic):
            return what
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "JSON text"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "binary data of an unknown kind"
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
        with warnings.catch_warnings():  # torch warns about e.g. pickle protocols; our own line says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: {_refusal_reason(str(e))}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a mulan checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mulan checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this mulan reads version {VERSION}")
    return state


def _refusal_reason(message: str) -> str:
    """Why torch's weights-only unpickler refused a file, in our words (its own message is a paragraph)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return (f"unpickling it would call {found.group(1)}, i.e. run code; a mulan checkpoint holds only "
                "weights and plain data")
    found = re.search(r"Unsupported operand (\d+)", message)
    detail = f" (pickle opcode {found.group(1)})" if found else ""
    return f"it is a pickle that torch's weights-only loader cannot read safely{detail}, not a mulan checkpoint"


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


__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "resolve_checkpoint", "refuse_existing", "load_weights", "require", "MulanError"]
