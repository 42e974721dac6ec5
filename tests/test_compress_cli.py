"""``mulan compress`` / ``mulan decompress``: round trips through files, inputs, and every bad input refused with one
line, exit 2 and nothing written.

An untrained network's bound is far above log2 V per pixel, so the planner would store almost every image
uniformly and these tests would exercise only that path. Here the network is replaced by the exact denoiser of
the images' own distribution (pixels i.i.d., 85% zeros; ``conftest.iid_denoiser``), a model far better than
uniform, as a trained one is: the planner codes most images by bits-back, and each test that depends on it
asserts so. What the tests check (files, order, determinism, refusals) does not depend on which network it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import iid_denoiser, model_that_matters, tiny
from conftest import run_here as cli
from mulan.checkpoint import save_checkpoint
from mulan.cli import main
from mulan.coding import api, container
from mulan.diffusion import Diffusion
from mulan.images import save_png_folder

V, SHAPE = 17, (1, 8, 8)  # the digits presets'
PRIOR = torch.full((V,), 0.15 / (V - 1), dtype=torch.float64).index_fill_(0, torch.tensor([0]), 0.85)
UNIFORM_BITS = 64 * math.log2(V)  # an image stored uniformly
FAST = ("--timesteps", "10", "--no-progress")


def draw_images(count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(PRIOR, count * 64, replacement=True, generator=gen).reshape(count, *SHAPE).to(torch.uint8)


@pytest.fixture(scope="module", autouse=True)
def exact_network():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Diffusion, "eps_hat", iid_denoiser(PRIOR.log()))
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny MuLAN model (k-hot latent, per-pixel schedule) with non-zero output layers; the same model with one
    weight changed (b); the same weights under another model config (c); and 6 images as .npz, IDX and PNGs."""
    root = tmp_path_factory.mktemp("compress")
    cfg = tiny("digits-mulan")
    sd = {k: v.clone() for k, v in model_that_matters("digits-mulan", scale=0.02).state_dict().items()}
    save_checkpoint(root / "a.pt", {"config": cfg, "ema": sd, "model": sd, "step": 0})
    sd2 = {k: v.clone() for k, v in sd.items()}
    sd2["denoiser.conv_out.weight"].view(-1)[0] += 1e-3
    save_checkpoint(root / "b.pt", {"config": cfg, "ema": sd2, "model": sd2, "step": 0})
    other = tiny("digits-mulan", "model.prediction=v")
    save_checkpoint(root / "c.pt", {"config": other, "ema": sd, "model": sd, "step": 0})
    images = draw_images(6, 0)
    np.savez(root / "in.npz", images=images.numpy())
    (root / "in.idx").write_bytes(struct.pack(">IIII", 0x803, 6, 8, 8) + images.numpy().tobytes())
    save_png_folder(images, root / "pngs")
    return root, images


@pytest.fixture(scope="module")
def compressed(checkpoints):
    root, _ = checkpoints
    out = root / "test.mlz"
    main(["compress", str(root / "a.pt"), str(root / "in.npz"), "--out", str(out), "--report",
          str(root / "report.json"), "--threads", "1", *FAST])
    return out


def bits_back_images(path: Path) -> int:
    """How many images a file codes by bits-back (the rest are stored uniformly first)."""
    header, _ = container.unpack(path.read_bytes(), str(path))
    return header.images - header.seed_images


def test_most_images_are_coded_by_bits_back(checkpoints, compressed):
    root, _ = checkpoints
    assert bits_back_images(compressed) >= 4
    report = json.loads((root / "report.json").read_text())
    m = report["seed_images"]
    assert report["coded_bits"]["reverse"] > 0 and report["coded_bits"]["draws"] < 0  # chains pushed and popped
    ideal = report["ideal_bits_per_image"]
    assert all(b == pytest.approx(UNIFORM_BITS) for b in ideal[:m])
    chains = ideal[m:]
    assert sum(chains) < 0.85 * len(chains) * UNIFORM_BITS  # chains cost far less than storing uniformly
    assert report["net_bits"] < 0.8 * 6 * UNIFORM_BITS


def test_cli_round_trip_restores_the_images_in_order(checkpoints, compressed, tmp_path, capsys):
    root, images = checkpoints
    proc = cli(capsys, "decompress", str(root / "a.pt"), str(compressed), "--out", str(tmp_path / "pngs"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    from mulan.data.png import read_png_folder

    assert torch.equal(read_png_folder(tmp_path / "pngs", SHAPE), images)
    proc = cli(capsys, "decompress", str(root / "a.pt"), str(compressed), "--out", str(tmp_path / "x.npz"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "x.npz")["images"]), images)


def test_compressing_twice_gives_the_same_bytes(checkpoints, compressed, tmp_path, capsys):
    root, _ = checkpoints
    again = tmp_path / "again.mlz"
    proc = cli(capsys, "compress", str(root / "a.pt"), str(root / "in.npz"), "--out", str(again), "--threads", "1", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert again.read_bytes() == compressed.read_bytes()


def test_the_python_api_writes_the_bytes_the_command_does(checkpoints, compressed):
    root, images = checkpoints
    coder = api.load_model(root / "a.pt")
    result = api.compress_images(coder, images, timesteps=10, threads=1)
    assert result.data == compressed.read_bytes()
    assert torch.equal(api.decompress_bytes(coder, result.data), images)


@pytest.mark.parametrize("source", ["in.idx", "pngs", "in.npz"])
def test_cli_reads_png_folders_idx_and_npz_and_leaves_the_thread_count(checkpoints, source, tmp_path, capsys):
    root, images = checkpoints
    out, back = tmp_path / "x.mlz", tmp_path / "back.npz"
    threads = torch.get_num_threads()
    proc = cli(capsys, "compress", str(root / "a.pt"), str(root / source), "--out", str(out), "--limit", "3",
               "--threads", str(threads + 1), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert bits_back_images(out) >= 2
    assert container.unpack(out.read_bytes(), "x")[0].threads == threads + 1  # decoding runs with the same count
    assert torch.get_num_threads() == threads  # ... and both give the count back afterwards
    assert cli(capsys, "decompress", str(root / "a.pt"), str(out), "--out", str(back), "--no-progress").returncode == 0
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.from_numpy(np.load(back)["images"]), images[:3])


# --- refusals ---------------------------------------------------------------------------------------------------

def one_line_error(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mulan: error:") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def _variant(path: Path, tmp_path: Path, name: str, edit) -> Path:
    data = bytearray(path.read_bytes())
    out = tmp_path / name
    out.write_bytes(bytes(edit(data)))
    return out


def _rewritten(path: Path, tmp_path: Path, name: str, *, word: int | None = None, **fields) -> Path:
    """The file with header ``fields`` changed (or payload ``word`` altered) and its checksum recomputed, as a
    careful forger, or an unlucky disk with a matching checksum, would leave it."""
    header, words = container.unpack(path.read_bytes(), str(path))
    words = words.copy()
    if word is not None:
        words[word] ^= np.uint32(0x00100000)
    out = tmp_path / name
    out.write_bytes(container.pack(dataclasses.replace(header, **fields), words))
    return out


def test_bad_files_and_models_are_one_line_errors_with_nothing_written(checkpoints, compressed, tmp_path, capsys):
    root, _ = checkpoints
    a, b, c = str(root / "a.pt"), str(root / "b.pt"), str(root / "c.pt")
    out = tmp_path / "out"

    def refuse(args, *words):
        one_line_error(cli(capsys, *args), *words)
        assert not out.exists()

    refuse(["decompress", b, str(compressed), "--out", str(out)], "another model")
    refuse(["decompress", c, str(compressed), "--out", str(out)], "same weights but another model config")
    refuse(["decompress", a, str(_variant(compressed, tmp_path, "t.mlz", lambda d: d[:-5])), "--out", str(out)],
           "truncated")
    refuse(["decompress", a, str(_variant(compressed, tmp_path, "h.mlz", lambda d: d[:40])), "--out", str(out)],
           "truncated")
    refuse(["decompress", a, str(_variant(compressed, tmp_path, "x.mlz", lambda d: d + b"\0\0\0\0")), "--out", str(out)],
           "corrupt", "bytes follow its payload")

    def flip(d):
        d[-3] ^= 0x10
        return d

    refuse(["decompress", a, str(_variant(compressed, tmp_path, "c.mlz", flip)), "--out", str(out)], "checksum")

    def newer(d):
        d[4] = 2
        return d

    refuse(["decompress", a, str(_variant(compressed, tmp_path, "v.mlz", newer)), "--out", str(out)], "version 2")
    refuse(["decompress", a, str(_variant(compressed, tmp_path, "n.mlz", lambda d: b"PNG" + d)), "--out", str(out)],
           "not a mulan compressed file")
    refuse(["decompress", a, str(tmp_path / "missing.mlz"), "--out", str(out)], "not found")
    refuse(["compress", a, str(tmp_path / "missing.idx"), "--out", str(out), *FAST], "does not exist")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 1, 4, 4), dtype=np.uint8))
    refuse(["compress", a, str(wrong), "--out", str(out), *FAST], "shape")


@pytest.mark.parametrize("fields, words", [
    ({"images": 0}, ("corrupt", "impossible values")),
    ({"seed_images": 7}, ("corrupt", "impossible values")),  # more images stored uniformly than the file holds
    ({"timesteps": 0}, ("corrupt", "impossible values")),
    ({"shared_words": 1 << 20}, ("corrupt", "impossible values")),  # more than the initial message has
    ({"num_values": 16}, ("another model config",)),
])
def test_impossible_or_contradictory_headers_are_refused(checkpoints, compressed, tmp_path, capsys, fields, words):
    root, _ = checkpoints
    bad = _rewritten(compressed, tmp_path, "bad.mlz", **fields)
    one_line_error(cli(capsys, "decompress", str(root / "a.pt"), str(bad), "--out", str(tmp_path / "out")), *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, words", [
    ({"word": 10}, ()),  # a payload word altered: the stream decodes into nonsense
    ({"seed": 1}, ("initial message",)),  # another initial message: the stream cannot end on it
    ({"images_hash": bytes(8)}, ("decoded images do not match their checksum",)),
    ({"grid_bits": 2}, ()),  # another plan: every grid differs
])
def test_the_checks_made_while_decoding_call_the_file_corrupt(checkpoints, compressed, tmp_path, capsys, change, words):
    """Files whose checksum matches but whose contents do not decode: found while decoding, reported as a corrupt
    file with one line and exit 2, never an internal error, and nothing written."""
    root, _ = checkpoints
    bad = _rewritten(compressed, tmp_path, "bad.mlz", **change)
    line = one_line_error(cli(capsys, "decompress", str(root / "a.pt"), str(bad), "--out", str(tmp_path / "out"),
                              "--no-progress"), "is corrupt", *words)
    assert "internal" not in line
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_never_overwritten(checkpoints, compressed, tmp_path, capsys):
    root, _ = checkpoints
    a = str(root / "a.pt")
    existing = tmp_path / "exists.mlz"
    existing.write_bytes(b"keep me")
    one_line_error(cli(capsys, "compress", a, str(root / "in.npz"), "--out", str(existing), *FAST), "already exists")
    assert existing.read_bytes() == b"keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"keep")
    one_line_error(cli(capsys, "decompress", a, str(compressed), "--out", str(folder)), "already exists")
    assert [p.name for p in folder.iterdir()] == ["x.png"] and (folder / "x.png").read_bytes() == b"keep"
