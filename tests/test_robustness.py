"""Kill anywhere and resume exactly; checkpoints are whole or absent, even on a full disk."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, tiny
from mulan.checkpoint import load_checkpoint, save_checkpoint
from mulan.errors import OutputError
from mulan.train import train

STEPS = 14
SETTINGS = [*TINY, f"train.steps={STEPS}", "train.checkpoint_every=1", "model.denoiser.dropout=0.1"]


def start(out: Path, resume: bool) -> subprocess.Popen:
    args = ["--resume"] if resume else ["--preset", "digits-mulan"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mulan", "train", *args, "--out", str(out), "--no-progress",
                             "--quick", *SETTINGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def kill_when(proc: subprocess.Popen, ready) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it finished first."""
    while proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def weights(path: Path) -> dict:
    state = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def test_kill_9_anywhere_then_resume_gives_bitwise_identical_weights(tmp_path):
    rng = random.Random(0)
    out = tmp_path / "killed"
    ckpt = out / "checkpoints"
    kills, during_write = 0, 0
    moments = ["write", "time", "write", "time", "time"]
    done = False
    for moment in moments:
        proc = start(out, resume=(ckpt / "last.pt").exists())
        t0, delay = time.monotonic(), rng.uniform(0.5, 4.0)
        if moment == "write":  # as soon as a checkpoint is being written
            ready = lambda: any(ckpt.glob(".last.pt.*.tmp")) if ckpt.exists() else False  # noqa: E731
        else:
            ready = lambda: time.monotonic() - t0 > delay  # noqa: E731
        if not kill_when(proc, ready):
            assert proc.returncode == 0, proc.stderr.read().decode()
            done = True
            break
        kills += 1
        during_write += moment == "write"
        if (ckpt / "last.pt").exists():
            load_checkpoint(ckpt / "last.pt")  # always whole: loads, or the previous one is still there
    while not done:
        proc = start(out, resume=(ckpt / "last.pt").exists())
        proc.wait()
        assert proc.returncode == 0, proc.stderr.read().decode()
        done = True
    assert kills >= 3 and during_write >= 1
    assert load_checkpoint(ckpt / "last.pt")["step"] == STEPS
    assert not any(ckpt.glob(".*.tmp"))

    straight = tmp_path / "straight"
    proc = start(straight, resume=False)
    proc.wait()
    assert proc.returncode == 0
    a, b = weights(ckpt / "last.pt"), weights(straight / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny("digits-vdm")
    train(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()

    def full_disk(obj, f, *a, **kw):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match="No space left on device.*previous file is untouched"):
        save_checkpoint(last, {"config": cfg, "step": 99})
    assert last.read_bytes() == before
    assert not any(last.parent.glob(".*.tmp"))


def test_keeps_last_k_periodic_checkpoints_besides_last_and_best(tmp_path):
    cfg = tiny("digits-vdm", "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2",
               "train.eval_every=1", "train.eval_images=8", "train.eval_time_points=1")
    train(cfg, tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "last.pt", "step-00000004.pt", "step-00000005.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] <= 5


def test_export_safetensors_round_trip_gives_identical_elbo(tmp_path):
    from mulan.checkpoint import load_weights
    from mulan.export import export
    from mulan.train import build_model

    cfg = tiny("digits-mulan")
    result = train(cfg, tmp_path)
    path = export(tmp_path / "checkpoints" / "last.pt", tmp_path / "model.safetensors")
    assert b"__reduce__" not in path.read_bytes()  # plain tensors and JSON, no pickle
    state = load_checkpoint(path)
    assert state["config"] == cfg and state["step"] == 3
    model = build_model(state["config"]).eval()
    load_weights(model, state["ema"], path)
    x = result.test_set.images[:8]
    a = result.model.elbo_terms(x, generator=torch.Generator().manual_seed(2)).total
    b = model.elbo_terms(x, generator=torch.Generator().manual_seed(2)).total
    assert torch.equal(a, b)


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    from mulan.errors import CheckpointError

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="without mulan's metadata"):
        load_checkpoint(tmp_path / "bare.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
