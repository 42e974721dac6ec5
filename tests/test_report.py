"""Evaluation reports: per-image rows agree with the summary, intervals shrink with more images, ODE path."""

from __future__ import annotations

import csv
import json

import torch

from conftest import perturb, tiny
from mulan.data import load_splits
from mulan.diffusion import build_model
from mulan.likelihood.stats import mean_ci
from mulan.report import evaluate_elbo, evaluate_ode


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ci_is_the_t_interval_of_the_per_image_rows_and_shrinks_with_more_images(tmp_path):
    from scipy import stats

    cfg = tiny("digits-vdm", "data.limit=0")
    model = build_model(cfg).eval()
    _, test = load_splits(cfg.data)
    summaries = {}
    for n in (16, 256):
        s = summaries[n] = evaluate_elbo(model, test, time_points=2, batch_size=128, limit=n, out_dir=tmp_path / str(n))
        bpd = [float(r["bpd"]) for r in _rows(tmp_path / str(n) / f"{s.stem}.csv")]
        assert s.subset and s.images == len(bpd) == n
        # the 95% interval of the mean of the rows, by scipy's one-sample t test (not the code under test)
        low, high = stats.ttest_1samp(bpd, 0.0).confidence_interval(0.95)
        assert abs(s.bpd - (low + high) / 2) < 1e-5 and abs(s.ci95 - (high - low) / 2) < 1e-5, (s.bpd, s.ci95, low, high)
    sem = torch.tensor([float(r["bpd"]) for r in _rows(tmp_path / "16" / f"{summaries[16].stem}.csv")]).std() / 4
    assert abs(summaries[16].ci95 / float(sem) - 2.1314) < 1e-3  # t_{0.975, 15} from a printed table
    assert summaries[256].ci95 < summaries[16].ci95
    assert summaries[16].dataset["count"] == 16 and summaries[16].dataset["subset_of"]["count"] == len(test)


def test_ode_report_rows_average_to_the_summary(tmp_path):
    cfg = tiny("digits-mulan", "eval.ode_rtol=1e-3", "eval.ode_atol=1e-3", "eval.batch_size=4")
    model = build_model(cfg).eval()
    perturb(model.denoiser, 0.02)  # a non-trivial network
    _, test = load_splits(cfg.data)
    s = evaluate_ode(model, test, cfg.eval, limit=6, out_dir=tmp_path)
    rows = _rows(tmp_path / f"{s.stem}.csv")
    assert len(rows) == 6 == s.images
    bpd = torch.tensor([float(r["bpd"]) for r in rows])
    mean, half = mean_ci(bpd)
    assert abs(mean - s.bpd) < 1e-5 and abs(half - s.ci95) < 1e-4
    for r in rows:  # each row's parts add up to its total
        assert abs(float(r["flow"]) + float(r["latent"]) - float(r["bpd"])) < 1e-5
    saved = json.loads((tmp_path / f"{s.stem}.json").read_text())
    assert saved["latent_kl"] == "strict" and saved["extra"]["mean_nfe"] > 0
    assert saved["settings"]["dequantization"] == "truncnorm" and saved["settings"]["rtol"] == 1e-3


def test_estimators_leave_the_callers_model_as_it_was():
    """evaluate_ode in float64 and evaluate_elbo work on the model they are given without converting it or
    switching its mode (the caller may go on training it)."""
    cfg = tiny("digits-mulan", "eval.ode_rtol=1e-2", "eval.ode_atol=1e-2", "eval.ode_float64=true", "eval.batch_size=2")
    model = build_model(cfg).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, test = load_splits(cfg.data)
    ode = evaluate_ode(model, test, cfg.eval, limit=2)
    elbo = evaluate_elbo(model, test, time_points=1, batch_size=2, limit=2)
    assert ode.settings["dtype"] == "float64" and ode.latent_kl == elbo.latent_kl == "strict"  # evaluated in eval mode
    assert model.training and model.dtype == torch.float32
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
