"""``mulan.load``: a checkpoint, a run folder and an exported .safetensors give back the same trained model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
import mulan
from mulan.checkpoint import save_checkpoint
from mulan.errors import CheckpointError
from mulan.export import export
from mulan.train import build_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose checkpoint holds distinct raw and EMA weights (both non-trivial) at step 7."""
    cfg = tiny("digits-mulan")
    torch.manual_seed(1)
    raw, ema = build_model(cfg), build_model(cfg)
    with torch.no_grad():
        for p, q in zip(raw.parameters(), ema.parameters()):
            p.add_(0.05 * torch.randn_like(p))
            q.copy_(p + 0.01 * torch.randn_like(p))
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
