"""Evaluation reports: per-image rows agree with the summary, intervals shrink with more images, ODE path."""

from __future__ import annotations

import csv
import json

import torch

from conftest import tiny
from mulan.data import load_splits
from mulan.likelihood.stats import mean_ci
from mulan.report import evaluate_elbo, evaluate_ode
from mulan.train import build_model


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ci_shrinks_with_more_images_and_matches_the_t_interval():
    cfg = tiny("digits-vdm", "data.limit=0")
    model = build_model(cfg).eval()
    _, test = load_splits(cfg.data)
    small = evaluate_elbo(model, test, time_points=2, batch_size=128, limit=16)
    large = evaluate_elbo(model, test, time_points=2, batch_size=128, limit=256)
    assert small.subset and large.subset and small.images == 16 and large.images == 256
    assert large.ci95 < small.ci95
    assert small.dataset["count"] == 16 and small.dataset["subset_of"]["count"] == len(test)


def test_ode_report_rows_average_to_the_summary(tmp_path):
    cfg = tiny("digits-mulan", "eval.ode_rtol=1e-3", "eval.ode_atol=1e-3", "eval.batch_size=4")
    model = build_model(cfg).eval()
    with torch.no_grad():  # a non-trivial network
        for p in model.denoiser.parameters():
            p.add_(0.02 * torch.randn_like(p))
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
