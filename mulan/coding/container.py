"""The compressed file: a small binary header, then the ANS words.

Layout (little-endian), 115 bytes of header:

    magic "MLNZ" | format version u8 | weights sha256 (32 bytes) | config hash (8 bytes) |
    C, H, W u16 | V u32 | T u32 | images u32 | seed images u32 | grid bits u8 | batch u16 | threads u8 |
    initial-message seed u32 | initial-message words u32 | shared words u32 | budget, need, gain f32 |
    payload words u32 | images hash (8 bytes) | checksum (8 bytes)

The weights hash identifies the model (the checkpoint holds its config; only a hash of the config is
kept). The checksum is the first 8 bytes of the sha256 of everything before it plus the payload; the
images hash (of the raw pixels, in order) checks the decoded result end to end.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch

from mulan.config import Config, to_dict
from mulan.errors import MulanError

MAGIC = b"MLNZ"
VERSION = 1
_FIELDS = "<4sB32s8s3HIIIIBHBIII3fI8s"
_BODY = struct.calcsize(_FIELDS)
HEADER_BYTES = _BODY + 8


class FileFormatError(MulanError):
    """A compressed file that is not ours, truncated, altered, too new, or of another model."""


@dataclass
class Header:
    """Everything the decoder needs besides the model and the payload."""

    weights_sha256: bytes
    config_hash: bytes
    shape: tuple[int, int, int]
    num_values: int
    timesteps: int
    images: int
    seed_images: int
    grid_bits: int
    batch: int
    threads: int
    seed: int
    initial_words: int
    shared_words: int
    budget: float
    need: float
    gain: float
    payload_words: int
    images_hash: bytes
    version: int = VERSION

    def _body(self) -> bytes:
        return struct.pack(_FIELDS, MAGIC, self.version, self.weights_sha256, self.config_hash, *self.shape,
                           self.num_values, self.timesteps, self.images, self.seed_images, self.grid_bits,
                           self.batch, self.threads, self.seed, self.initial_words, self.shared_words,
                           self.budget, self.need, self.gain, self.payload_words, self.images_hash)


def f32(value: float) -> float:
    """``value`` as the header stores it (float32), so encoder and decoder plan with the same numbers."""
    return float(np.float32(value))


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> bytes:
    """sha256 over the weights' names, dtypes, shapes and bytes in name order (container independent:
    a training checkpoint and its ``mulan export`` give the same hash)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.digest()


def config_hash(cfg: Config) -> bytes:
    """8 bytes of the sha256 of the model config and the data's shape and V (what decoding depends on)."""
    key = {"model": to_dict(cfg.model), "shape": list(cfg.data.shape), "num_values": cfg.data.num_values}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()[:8]


def images_hash(images: torch.Tensor) -> bytes:
    """8 bytes of the sha256 of the images' pixels (as int64, C order) and their shape."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.to(torch.int64).contiguous().numpy().tobytes())
    return h.digest()[:8]


def pack(header: Header, words: np.ndarray) -> bytes:
    """Header + payload (uint32 little-endian) as the file's bytes."""
    payload = np.ascontiguousarray(words, dtype="<u4").tobytes()
    body = header._body()
    return body + hashlib.sha256(body + payload).digest()[:8] + payload


def unpack(data: bytes, name: str) -> tuple[Header, np.ndarray]:
    """Parse and check a compressed file's bytes; :class:`FileFormatError` names what is wrong."""
    if len(data) < 5 or data[:4] != MAGIC:
        raise FileFormatError(f"{name} is not a mulan compressed file")
    if data[4] > VERSION:
        raise FileFormatError(f"{name} has format version {data[4]}; this mulan reads version {VERSION} "
                              "(a newer mulan wrote it)")
    if data[4] != VERSION:
        raise FileFormatError(f"{name} has format version {data[4]}, which this mulan cannot read")
    if len(data) < HEADER_BYTES:
        raise FileFormatError(f"{name} is truncated: {len(data)} bytes, shorter than its {HEADER_BYTES}-byte header")
    fields = struct.unpack(_FIELDS, data[:_BODY])
    (_, version, w_sha, c_hash, c, h, w, v, t, n, m, k, batch, threads, seed, init_words, shared,
     budget, need, gain, payload_words, img_hash) = fields
    header = Header(w_sha, c_hash, (c, h, w), v, t, n, m, k, batch, threads, seed, init_words, shared, budget,
                    need, gain, payload_words, img_hash, version)
    payload = data[HEADER_BYTES:]
    if len(payload) != 4 * payload_words:
        what = "truncated" if len(payload) < 4 * payload_words else "corrupt (bytes follow its payload)"
        raise FileFormatError(f"{name} is {what}: its header announces {4 * payload_words} payload bytes, "
                              f"{len(payload)} follow")
    if hashlib.sha256(data[:_BODY] + payload).digest()[:8] != data[_BODY:HEADER_BYTES]:
        raise FileFormatError(f"{name} is corrupt: its checksum does not match its contents")
    if not (0 < n and 0 <= m <= n and t >= 1 and batch >= 1 and shared <= init_words and v >= 2):
        raise FileFormatError(f"{name} is corrupt: its header holds impossible values")
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)
