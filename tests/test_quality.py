"""The quality score: the Fréchet distance against scipy's matrix square root on known Gaussians, a set scored
against itself, a shifted set, precision/recall on a known geometry, and one-line errors of `mulan score`."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import run_here
from mulan.quality import metrics
from mulan.quality.score import reference_of, score_features
from test_cli import assert_clean_error

F64 = torch.float64


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=F64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


def scipy_fd(mu1, cov1, mu2, cov2) -> float:
    """The closed form written from the equation, with scipy's general matrix square root."""
    root = scipy.linalg.sqrtm(cov1.numpy() @ cov2.numpy())
    return float(np.sum((mu1 - mu2).numpy() ** 2) + np.trace(cov1.numpy() + cov2.numpy() - 2 * root.real))


@pytest.mark.parametrize("d", [1, 3, 16])
def test_frechet_distance_equals_the_closed_form_with_scipy_sqrtm(d):
    gen = torch.Generator().manual_seed(d)
    mu1, mu2 = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    cov1, cov2 = _spd(d, gen), _spd(d, gen)
    assert metrics.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(scipy_fd(mu1, cov1, mu2, cov2), rel=1e-8)
    # equal covariances: the trace terms cancel, leaving the squared distance of the means
    assert metrics.frechet_distance(mu1, cov1, mu2, cov1) == pytest.approx(float((mu1 - mu2).square().sum()), abs=1e-8)


def test_frechet_distance_of_samples_approaches_that_of_the_gaussians_they_come_from():
    d, n = 4, 40000
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.zeros(d, dtype=F64), torch.full((d,), 0.5, dtype=F64)
    cov1, cov2 = _spd(d, gen), _spd(d, gen)
    a = mu1 + torch.randn(n, d, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov1).T
    b = mu2 + torch.randn(n, d, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov2).T
    estimate = metrics.frechet_distance(*metrics.gaussian_fit(a), *metrics.gaussian_fit(b))
    assert estimate == pytest.approx(scipy_fd(mu1, cov1, mu2, cov2), rel=0.03)


def _features(n: int = 300, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=F64), torch.randint(10, (n,), generator=gen)


def test_a_set_scored_against_itself_is_perfect():
    feats, labels = _features()
    result = score_features(feats, labels, reference_of(feats, labels, 10, k=3), bootstrap=20,
                            generator=torch.Generator().manual_seed(0))
    m = result.metrics
    assert m["fd"].value == pytest.approx(0.0, abs=1e-8)
    assert m["precision"].value == 1.0 and m["recall"].value == 1.0 and m["class_tv"].value == pytest.approx(0.0)


def test_a_shifted_set_scores_worse_by_the_squared_shift():
    feats, labels = _features()
    ref = reference_of(feats, labels, 10, k=3)
    other, other_labels = _features(seed=1)  # an independent draw of the same distribution: near the floor
    near = score_features(other, other_labels, ref, bootstrap=50, generator=torch.Generator().manual_seed(0))
    shift = torch.zeros(8, dtype=F64)
    shift[0] = 2.0
    far = score_features(other + shift, torch.zeros_like(other_labels), ref, bootstrap=50,
                         generator=torch.Generator().manual_seed(0))
    assert far.metrics["fd"].value > near.metrics["fd"].value + 3.0  # the shift adds |shift|^2 = 4
    assert far.metrics["fd"].value == pytest.approx(near.metrics["fd"].value + 4.0, abs=1.0)
    assert far.metrics["precision"].value < near.metrics["precision"].value - 0.2
    assert far.metrics["class_tv"].value > 0.8  # every sample in one class of ten
    for result in (near, far):  # the FD's percentile interval leans above it (module docstring of score.py)
        for name, est in result.metrics.items():
            assert est.lo <= est.hi and (name == "fd" or est.lo <= est.value <= est.hi), name


def test_precision_and_recall_of_a_set_covering_half_the_reference():
    """Reference: points on a line at 0..99; scored: the first half. Every scored point is on the reference
    manifold (precision 1); about half the reference lies on the scored one (recall ~ 0.5)."""
    ref_feats = torch.arange(100, dtype=F64)[:, None]
    ref = reference_of(ref_feats, torch.zeros(100, dtype=torch.long), 10, k=3)
    half = score_features(ref_feats[:50] + 0.25, torch.zeros(50, dtype=torch.long), ref, bootstrap=10,
                          generator=torch.Generator().manual_seed(0))
    assert half.metrics["precision"].value == 1.0
    assert half.metrics["recall"].value == pytest.approx(0.53, abs=0.03)


@pytest.mark.parametrize("args,words", [
    (["--data", "cifar10"], ["--data", "cifar10"]),
    (["--bootstrap", "0"], ["--bootstrap 0"]),
    (["--k", "0"], ["--k 0"]),
    ([], ["--data"]),
    (["--data", "digits", "--sampler", "ddim"], ["checkpoint"]),
])
def test_bad_score_settings_are_one_line_errors(args, words, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 1, 8, 8), np.uint8), num_values=np.int64(17))
    assert_clean_error(run_here(capsys, "score", str(samples), *args), *words)


def test_samples_that_do_not_fit_the_dataset_are_one_line_errors(tmp_path, capsys):
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, images=np.zeros((4, 1, 5, 5), np.uint8), num_values=np.int64(17))
    assert_clean_error(run_here(capsys, "score", str(wrong_shape), "--data", "digits"), "shape")
    wrong_values = tmp_path / "values.npz"
    np.savez(wrong_values, images=np.zeros((4, 1, 8, 8), np.uint8), num_values=np.int64(256))
    assert_clean_error(run_here(capsys, "score", str(wrong_values), "--data", "digits"), "num_values=256")
    assert_clean_error(run_here(capsys, "score", str(tmp_path / "missing.npz"), "--data", "digits"), "missing.npz")
