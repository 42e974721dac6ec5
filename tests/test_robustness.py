"""Kill anywhere and resume exactly; checkpoints are whole or absent, even on a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, tiny
from mulan.checkpoint import load_checkpoint, save_checkpoint
from mulan.config import Config, apply_overrides, from_dict
from mulan.presets import get_preset
from mulan.errors import OutputError
from mulan.train import train

STEPS = 8
SETTINGS = [*TINY, f"train.steps={STEPS}", "train.checkpoint_every=1", "model.denoiser.dropout=0.1"]
KILL_AT = Path(__file__).with_name("kill_at.py")


def run(out: Path, *, resume: bool, kill_at: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """`mulan train` on ``out``; with ``kill_at=(event, n)`` it is SIGKILLed at the n-th such event (kill_at.py)."""
    args = ["--resume"] if resume else ["--preset", "digits-mulan"]
    launch = [sys.executable, str(KILL_AT), *map(str, kill_at), "--"] if kill_at else [sys.executable, "-m", "mulan"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, "train", *args, "--out", str(out), "--no-progress", "--quick", *SETTINGS],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=300)


def weights(path: Path) -> dict:
    state = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def last_losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss, as logged."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss_bpd"] for r in records if r["kind"] == "train"}


def test_kill_9_anywhere_then_resume_gives_bitwise_identical_weights(tmp_path):
    """SIGKILL between steps, as a checkpoint's temporary file is created, and after it is written but before
    it replaces last.pt; each moment is an event of the run (never a delay), each kill is made, and each time
    last.pt is whole and exactly where the run's progress says it must be. Resumed to the end, the run's weights,
    EMA and logged losses equal bitwise those of a straight run."""
    out = tmp_path / "killed"
    last = out / "checkpoints" / "last.pt"
    # (event, n): the n-th occurrence in that process; then the step last.pt must hold, and what the kill leaves
    plan = [(("log", 3), 2, "nothing"),           # steps 1, 2 saved; step 3 computed, killed before its log line
            (("write", 2), 3, "empty temp"),      # resumed at 2: step 3 saved; killed creating step 4's file
            (("rename", 1), 3, "whole temp"),     # step 4's file written and fsynced, killed before the rename
            (("write", 5), 7, "empty temp")]      # steps 4-7 saved; killed creating the last step's file
    for i, (kill_at, step, leftover) in enumerate(plan):
        proc = run(out, resume=i > 0, kill_at=kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr)  # the kill was made
        assert load_checkpoint(last)["step"] == step, kill_at  # whole, and the last one completed
        temps = list(last.parent.glob(".last.pt.*.tmp"))
        if leftover == "nothing":
            assert not temps, kill_at
        else:  # the kill did land inside the write: its temporary file is there, last.pt untouched
            assert len(temps) == 1 and (temps[0].stat().st_size > 0) == (leftover == "whole temp"), (kill_at, temps)
    proc = run(out, resume=True)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(last)["step"] == STEPS
    assert not any(last.parent.glob(".*.tmp"))  # the resumed runs removed what the kills left

    straight = tmp_path / "straight"  # in this process: another way in, and no second start-up
    train(apply_overrides(get_preset("digits-mulan"), SETTINGS), straight)
    assert last_losses(out) == last_losses(straight) and sorted(last_losses(out)) == list(range(1, STEPS + 1))
    # each step logged once, in order; what the killed runs logged past their checkpoints is set aside, not lost
    logged = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert logged == list(range(1, STEPS + 1))
    aside = [json.loads(line)["step"] for line in (out / "metrics.discarded.jsonl").read_text().splitlines()]
    assert aside == [4, 4, 8]  # steps logged by the runs killed writing (or renaming) the next checkpoint
    a, b = weights(last), weights(straight / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_at_rejects_an_unknown_event():
    proc = subprocess.run([sys.executable, str(KILL_AT), "lunch", "1", "--", "presets"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "unknown event 'lunch'" in proc.stderr


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


def assert_plain_safetensors(path: Path, tensors: dict, cfg) -> None:
    """Parse ``path`` by the safetensors layout, without the safetensors library: an 8-byte little-endian
    header length, a JSON header, then raw tensor bytes. Every byte must belong to the header or to exactly
    one tensor, each equal to ``tensors``: the file holds no pickle, nor anything else."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in meta.values())
    assert from_dict(Config, json.loads(meta["config"])) == cfg
    body = data[8 + n:]
    spans = sorted(tuple(h["data_offsets"]) for h in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(body)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous: no byte outside a tensor
    assert header.keys() == tensors.keys()
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}
    for name, h in header.items():
        (start, stop), want = h["data_offsets"], tensors[name]
        assert dtypes[h["dtype"]] == want.dtype and stop - start == want.numel() * want.element_size(), name
        if stop > start:
            assert torch.equal(torch.frombuffer(bytearray(body[start:stop]), dtype=want.dtype).reshape(h["shape"]), want), name


def test_export_safetensors_round_trip_gives_identical_elbo(tmp_path):
    from mulan.checkpoint import load_weights
    from mulan.export import export
    from mulan.diffusion import build_model

    cfg = tiny("digits-mulan")
    result = train(cfg, tmp_path)
    path = export(tmp_path / "checkpoints" / "last.pt", tmp_path / "model.safetensors")
    assert_plain_safetensors(path, load_checkpoint(tmp_path / "checkpoints" / "last.pt")["ema"], cfg)
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
