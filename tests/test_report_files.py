"""Evaluation files: named by what they hold, never replaced silently; estimators and samplers report progress."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import perturb, tiny
from mulan.data import load_splits
from mulan.diffusion import build_model
from mulan.errors import OutputError
from mulan.report import evaluate_elbo, evaluate_ode, report_stem
from mulan.sampling import ancestral_sample, ode_sampler


@pytest.fixture(scope="module")
def model_and_data():
    cfg = tiny("digits-mulan", "eval.ode_rtol=1e-2", "eval.ode_atol=1e-2", "eval.batch_size=4")
    model = build_model(cfg).eval()
    perturb(model.denoiser, 0.02)  # a non-trivial network
    return model, load_splits(cfg.data)[1], cfg


def test_names_follow_the_documented_scheme():
    # docs/likelihood.md "Running an evaluation": eval-<estimator>-<split>-<all|firstN>-<settings>-seed<S>-<ema|raw>-step<N>
    elbo = {"time_points": 128, "timesteps": 0, "seed": 0}
    assert report_stem("elbo", "test", 359, False, elbo, "ema", 2500) == "eval-elbo-test-all-S128-seed0-ema-step2500"
    assert (report_stem("elbo", "train", 64, True, {**elbo, "timesteps": 1000, "seed": 3}, "raw", 10)
            == "eval-elbo-train-first64-S128-T1000-seed3-raw-step10")
    ode = {"rtol": 1e-5, "atol": 1e-4, "method": "dopri5", "divergence": "hutchinson", "probes": 2,
           "probe_dist": "gaussian", "dtype": "float64", "dequantization": "uniform", "dequant_samples": 4,
           "seed": 1, "ranks": 2}
    assert (report_stem("ode", "test", 16, True, ode, "ema", 5)
            == "eval-ode-test-first16-dopri5-rtol1e-05-atol0.0001-hutchinson2gaussian-uniformK4-float64-ranks2-seed1-ema-step5")
    assert report_stem("elbo", "test", 8, True, elbo) == "eval-elbo-test-first8-S128-seed0"  # not from a checkpoint


def test_csv_and_json_share_a_stem_and_an_existing_result_is_refused_before_any_work(model_and_data, tmp_path):
    model, test, _ = model_and_data
    calls = []
    s = evaluate_elbo(model, test, time_points=2, batch_size=4, limit=6, out_dir=tmp_path, checkpoint="c.pt",
                      step=9, weights="ema", callback=lambda done, total: calls.append((done, total)))
    assert s.stem == "eval-elbo-test-first6-S2-seed0-ema-step9"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{s.stem}.csv", f"{s.stem}.json"]
    saved = json.loads((tmp_path / f"{s.stem}.json").read_text())
    assert (saved["checkpoint"], saved["step"], saved["weights"]) == ("c.pt", 9, "ema")
    assert calls == [(4, 6), (6, 6)]  # the progress callback, once per batch of 4
    before = (tmp_path / f"{s.stem}.csv").read_bytes()
    calls.clear()
    with pytest.raises(OutputError, match="already exists"):
        evaluate_elbo(model, test, time_points=2, batch_size=4, limit=6, out_dir=tmp_path, checkpoint="c.pt", step=9,
                      weights="ema", seed=0, callback=lambda done, total: calls.append(done))
    assert calls == [] and (tmp_path / f"{s.stem}.csv").read_bytes() == before
    evaluate_elbo(model, test, time_points=2, batch_size=4, limit=6, out_dir=tmp_path, checkpoint="c.pt", step=9,
                  weights="ema", overwrite=True)


def test_ode_evaluation_reports_progress_within_a_batch(model_and_data):
    model, test, cfg = model_and_data
    seen = []
    ecfg = dataclasses.replace(cfg.eval, batch_size=2)
    s = evaluate_ode(model, test, ecfg, limit=3, callback=lambda done, total: seen.append((done, total)))
    assert s.images == 3 and all(total == 3 for _, total in seen)
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == 3  # never backwards, ends complete
    assert len(seen) > 4 and any(0 < d < 2 for d in done)  # many updates, some inside the first batch of 2


def test_samplers_call_their_progress_callback(model_and_data):
    model, _, _ = model_and_data
    steps = []
    ancestral_sample(model, 2, steps=5, generator=torch.Generator().manual_seed(0),
                     callback=lambda i, n: steps.append((i, n)))
    assert steps == [(i, 5) for i in range(1, 6)]
    nfe = []
    ode_sampler(model, 2, rtol=1e-2, atol=1e-2, generator=torch.Generator().manual_seed(0),
                callback=lambda i, n: nfe.append(i))
    assert nfe == list(range(1, len(nfe) + 1)) and len(nfe) >= 6  # one call per drift evaluation (dopri5: >= 6)
