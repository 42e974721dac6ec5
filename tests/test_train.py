"""Training: determinism, save/load round trips, exact resume, non-finite steps never reach the weights."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny
from mulan.checkpoint import load_checkpoint, load_weights
from mulan.diffusion import build_model
from mulan.errors import MulanError
from mulan.train import batch_indices, lr_at, train


def losses(run_dir):
    return [r["loss_bpd"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.mark.parametrize("preset", ["digits-vdm", "digits-mulan"])
def test_same_seed_same_losses_and_weights(tmp_path, preset):
    cfg = tiny(preset, "model.denoiser.dropout=0.1")
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(p, q)
    c = train(tiny(preset, "train.seed=1"), tmp_path / "c")
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_periodic_evaluation_does_not_change_training(tmp_path):
    # The digits presets evaluate only twice per run to keep the main job short; that is safe only because an
    # evaluation draws from its own streams and leaves the model, EMA and the training draws alone.
    cfg = "model.denoiser.dropout=0.1", "train.steps=4", "train.eval_images=8", "train.eval_time_points=2"
    a = train(tiny("digits-mulan", *cfg, "train.eval_every=0"), tmp_path / "a")
    b = train(tiny("digits-mulan", *cfg, "train.eval_every=1"), tmp_path / "b")
    evals = [r for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert len(evals) == 4
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(p, q)


def test_save_load_gives_identical_elbo(tmp_path):
    cfg = tiny("digits-mulan")
    result = train(cfg, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    model = build_model(state["config"]).eval()
    load_weights(model, state["ema"], "last.pt")
    x = result.test_set.images[:8]
    a = result.model.elbo_terms(x, generator=torch.Generator().manual_seed(5)).total
    b = model.elbo_terms(x, generator=torch.Generator().manual_seed(5)).total
    assert torch.equal(a, b)
    assert state["step"] == 3 and state["config"] == cfg


def test_resume_continues_exactly(tmp_path):
    full = train(tiny("digits-mulan", "train.steps=4", "model.denoiser.dropout=0.1"), tmp_path / "full")
    train(tiny("digits-mulan", "train.steps=2", "model.denoiser.dropout=0.1"), tmp_path / "part")
    resumed = train(tiny("digits-mulan", "train.steps=4", "model.denoiser.dropout=0.1"), tmp_path / "part", resume=True)
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_resume_refuses_another_model(tmp_path):
    train(tiny("digits-vdm"), tmp_path)
    with pytest.raises(MulanError, match="model config differs"):
        train(tiny("digits-vdm", "model.denoiser.channels=8"), tmp_path, resume=True)


def test_nonfinite_loss_skips_steps_then_stops(tmp_path, monkeypatch):
    from mulan import diffusion

    real = diffusion.Diffusion.elbo_terms
    calls = {"n": 0}

    def poisoned(self, x, **kw):
        terms = real(self, x, **kw)
        calls["n"] += 1
        if self.training and calls["n"] >= 2:
            terms.diffusion = terms.diffusion * float("nan")
        return terms

    monkeypatch.setattr(diffusion.Diffusion, "elbo_terms", poisoned)
    cfg = tiny("digits-vdm", "train.steps=10", "train.max_nonfinite=3", "train.checkpoint_every=1",
               "train.keep_checkpoints=10", "train.weight_decay=0.1")
    with pytest.raises(MulanError, match=r"step 4: 3 consecutive non-finite.*last.pt"):
        train(cfg, tmp_path)
    # step 1 was good; steps 2 and 3 were skipped: what they saved is bitwise what step 1 saved. AdamW's
    # momentum and weight decay would have moved the weights even with zeroed gradients.
    good = load_checkpoint(tmp_path / "checkpoints" / "step-00000001.pt")
    for step in (2, 3):
        skipped = load_checkpoint(tmp_path / "checkpoints" / f"step-{step:08d}.pt")
        for part in ("model", "ema"):
            assert good[part].keys() == skipped[part].keys()
            for k, v in good[part].items():
                assert torch.equal(skipped[part][k], v), (step, part, k)
        assert_same_optimizer_state(skipped["optimizer"], good["optimizer"])
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    nonfinite = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r.get("nonfinite")]
    assert len(nonfinite) == 3


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    """Every tensor and number of two optimizer state dicts equal, bitwise."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for i, state in a["state"].items():
        assert state.keys() == b["state"][i].keys()
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k])), (i, k)


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    n, b = 50, 10
    epoch = torch.cat([batch_indices(n, b, seed=0, step=s) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(n))
    assert torch.equal(batch_indices(n, b, 0, 7), batch_indices(n, b, 0, 7))
    assert not torch.equal(batch_indices(n, b, 0, 5), batch_indices(n, b, 1, 5))


def test_warmup_is_linear_then_constant():
    cfg = tiny("digits-vdm", "train.warmup_steps=10", "train.lr=0.001")
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == lr_at(500, cfg) == pytest.approx(1e-3)
