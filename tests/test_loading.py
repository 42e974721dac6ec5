"""``mulan.load``: a checkpoint, a run folder and an exported .safetensors give back the same trained model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import perturb, tiny
import mulan
from mulan.checkpoint import save_checkpoint
from mulan.errors import CheckpointError
from mulan.diffusion import build_model
from mulan.export import export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose checkpoint holds distinct raw and EMA weights (both non-trivial) at step 7."""
    cfg = tiny("digits-mulan")
    torch.manual_seed(1)
    raw, ema = perturb(build_model(cfg), 0.05, seed=1), build_model(cfg)
    ema.load_state_dict(raw.state_dict())
    perturb(ema, 0.01, seed=2)  # near the raw weights, as an average of recent ones is
    out = tmp_path_factory.mktemp("load") / "run"
    save_checkpoint(out / "checkpoints" / "last.pt",
                    {"config": cfg, "step": 7, "model": raw.state_dict(), "ema": ema.state_dict()})
    return out, cfg, raw.state_dict(), ema.state_dict()


def same_weights(model, state) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_checkpoint_run_folder_and_safetensors_load_the_same_model(run_dir, tmp_path):
    out, cfg, raw, ema = run_dir
    exported = export(out / "checkpoints" / "last.pt", tmp_path / "m.safetensors")
    x = torch.randint(0, 17, (4, 1, 8, 8))
    bounds = []
    for path in (out / "checkpoints" / "last.pt", out, exported):
        run = mulan.load(path)
        assert isinstance(run, mulan.Loaded)
        assert not run.model.training and run.weights == "ema" and run.step == 7
        assert run.config == cfg
        assert run.path == (exported if path == exported else out / "checkpoints" / "last.pt")
        assert same_weights(run.model, ema) and not same_weights(run.model, raw)
        with torch.no_grad():
            bounds.append(run.model.elbo_terms(x, generator=torch.Generator().manual_seed(0)).total)
    assert "checkpoints/last.pt" in mulan.load(out).note
    torch.testing.assert_close(bounds[1], bounds[0], rtol=0, atol=0)
    torch.testing.assert_close(bounds[2], bounds[0], rtol=0, atol=0)


def test_raw_weights_by_choice(run_dir, tmp_path):
    out, _, raw, ema = run_dir
    run = mulan.load(out, weights="raw", device="cpu")
    assert run.weights == "raw" and same_weights(run.model, raw) and not run.model.training
    ema_only = export(out, tmp_path / "ema.safetensors")
    with pytest.raises(CheckpointError, match="no raw weights"):
        mulan.load(ema_only, weights="raw")
    assert same_weights(mulan.load(export(out, tmp_path / "raw.safetensors", raw=True), weights="raw").model, raw)


def test_a_folder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="folder"):
        mulan.load(tmp_path)


def test_loading_and_evaluating_never_import_the_trainer(run_dir, tmp_path):
    """Inference sits below training: in a fresh interpreter, ``mulan.load`` and then `mulan eval` and `mulan
    compare` of a run leave ``mulan.train`` unimported."""
    out = str(run_dir[0])
    script = f"""
import contextlib, io, json, pathlib, sys
import mulan
run = mulan.load({out!r})
after_load = "mulan.train" in sys.modules
from mulan.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["eval", {out!r}, "--limit", "2", "--out", {str(tmp_path)!r}, "--no-progress", "train.threads=1"])
    main(["compare", {out!r}, {out!r}, "--limit", "2", "--no-progress", "train.threads=1"])
print(json.dumps({{"step": run.step, "after_load": after_load, "after_commands": "mulan.train" in sys.modules,
                  "results": len(list(pathlib.Path({str(tmp_path)!r}).glob("eval-elbo-*.csv")))}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"step": 7, "after_load": False, "after_commands": False, "results": 1}


def test_a_safetensors_header_whose_length_starts_with_0x80_is_not_taken_for_a_pickle(run_dir, tmp_path):
    """Files are told apart by their first bytes: a safetensors header of 128 + 256 j bytes puts 0x80, a legacy
    pickle's first byte, at the start of the file (it happened to an export once main's config grew)."""
    out, _, _, ema = run_dir
    data = export(out, tmp_path / "m.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n] + b" " * ((0x80 - n) % 256)  # safetensors pads its JSON header with spaces
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])
    assert padded.read_bytes()[0] == 0x80
    assert same_weights(mulan.load(padded).model, ema)
    legacy = tmp_path / "legacy.pt"  # and a legacy pickle, which starts with 0x80 too, still loads as one
    torch.save(torch.load(out / "checkpoints" / "last.pt", weights_only=True), legacy,
               _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[0] == 0x80
    assert same_weights(mulan.load(legacy).model, ema)
