"""Paired evaluation: per-image draws that depend on the image alone, and `mulan compare`'s statistics."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from scipy import stats

from conftest import model_that_matters, perturb, tiny
from mulan.cli import main
from mulan.compare import PerImage, check_pairable, paired_difference, read_per_image
from mulan.data import load_splits
from mulan.errors import ConfigError, DataError
from mulan.likelihood.elbo import elbo_per_image
from mulan.report import evaluate_elbo
from mulan.rng import PerExample, example_seeds


def test_per_example_draws_depend_only_on_seed_and_index():
    a = PerExample.seeded(3, [5, 9, 2])
    b = PerExample.seeded(3, [9])
    from mulan import rng

    whole = rng.randn((3, 4), a)
    alone = rng.randn((1, 4), b)
    assert torch.equal(whole[1], alone[0])  # index 9 draws the same, wherever it sits in the batch
    assert not torch.equal(whole[0], whole[1])
    assert len(set(example_seeds(0, range(1000)) + example_seeds(1, range(1000)))) == 2000  # no collisions


@pytest.mark.parametrize("preset", ["digits-mulan", "digits-vdm"])
def test_per_image_bound_does_not_depend_on_batch_size(preset):
    model = model_that_matters(preset)
    x = torch.randint(0, 17, (16, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    b7 = elbo_per_image(model, x, time_points=3, batch_size=7, seed=4)
    b16 = elbo_per_image(model, x, time_points=3, batch_size=16, seed=4)
    torch.testing.assert_close(b7.total, b16.total, rtol=1e-6, atol=1e-6)
    # an image evaluated alone, under its own index, gets the same bound as inside the batch
    one = elbo_per_image(model, x[5:6], time_points=3, batch_size=1, seed=4, indices=torch.tensor([5]))
    torch.testing.assert_close(one.total, b16.total[5:6], rtol=1e-6, atol=1e-6)
    # and another seed draws other times and noise
    other = elbo_per_image(model, x, time_points=3, batch_size=16, seed=5)
    assert not torch.allclose(other.total, b16.total)


def _rows(path) -> dict[str, list[float]]:
    """The columns of a per-image CSV, read with the csv module alone."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0] if k != "index"}


def test_a_model_compared_with_itself_differs_by_exactly_zero(tmp_path):
    """Evaluated twice with one seed, a model gets the same per-image bounds, which are the bounds the estimator
    gives when called directly (another batch size); against a nearby model, the comparison is the paired
    t-interval of A - B computed here from the numbers the two evaluations wrote (scipy), term by term."""
    model = model_that_matters("digits-mulan")
    nearby = perturb(model_that_matters("digits-mulan"), 0.01, seed=1)
    _, test = load_splits(tiny("digits-mulan").data)
    for name, m in (("a", model), ("a2", model), ("b", nearby)):
        evaluate_elbo(m, test, time_points=2, batch_size=16, seed=0, limit=20, out_dir=tmp_path / name)
    a_csv, a2_csv, b_csv = (next((tmp_path / name).glob("eval-elbo-test-first20-S2-seed0*.csv")) for name in ("a", "a2", "b"))
    a, a2, b = read_per_image(a_csv), read_per_image(a2_csv), read_per_image(b_csv)

    check_pairable(a, a2)
    d = paired_difference(a, a2)
    assert d.mean == 0.0 and d.ci95 == 0.0 and d.images == 20 and d.a_lower == 0.0
    assert all(m == 0.0 and h == 0.0 for m, h in d.terms.values())
    direct = elbo_per_image(model, test.images[:20], time_points=2, batch_size=7, seed=0).bpd(64).double()
    torch.testing.assert_close(a.bpd, direct, rtol=1e-6, atol=5e-7)  # float32 sums; the CSV keeps 6 decimals

    check_pairable(a, b)
    d = paired_difference(a, b)
    by_hand = {k: [x - y for x, y in zip(va, _rows(b_csv)[k])] for k, va in _rows(a_csv).items()}
    diff = by_hand["bpd"]
    assert any(x != 0.0 for x in diff)  # the two models differ image by image
    half = stats.t.ppf(0.975, len(diff) - 1) * stats.sem(diff)
    assert d.mean == pytest.approx(sum(diff) / len(diff), abs=1e-9)
    assert d.ci95 == pytest.approx(half, rel=1e-9)
    assert d.a_lower == pytest.approx(sum(x < 0 for x in diff) / len(diff))
    for term in ("recon", "prior", "diffusion", "latent"):
        assert d.terms[term][0] == pytest.approx(sum(by_hand[term]) / len(diff), abs=1e-9), term


def test_common_random_numbers_make_the_paired_interval_much_narrower():
    """Two nearby models on the same images: with common draws the paired interval is far narrower than with
    independent draws (another seed for B), which is what makes 0.01 bits/dim visible."""
    a = model_that_matters("digits-mulan", seed=0)
    b = model_that_matters("digits-mulan", seed=0)
    perturb(b.denoiser, 0.01, seed=1)  # a nearby model
    x = load_splits(tiny("digits-mulan").data)[1].images[:48]

    def per_image(model, seed):
        r = elbo_per_image(model, x, time_points=4, batch_size=48, seed=seed)
        return PerImage(bpd=r.bpd(64).double(), terms={}, summary={}, source="")

    common = paired_difference(per_image(a, 0), per_image(b, 0))
    independent = paired_difference(per_image(a, 0), per_image(b, 1))
    assert common.ci95 < 0.25 * independent.ci95, (common.ci95, independent.ci95)


def _write(folder, bpd, *, seed=0, sha="abc", count=None, estimator="elbo"):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "eval-elbo-test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "bpd", "recon", "prior", "diffusion", "latent"])
        for i, v in enumerate(bpd):
            w.writerow([i, v, 0.1, 0.2, v - 0.3, 0.0])
    summary = {"estimator": estimator, "images": len(bpd), "split": "test", "subset": False,
               "dataset": {"name": "digits", "split": "test", "count": count or len(bpd), "sha256": sha},
               "settings": {"time_points": 4, "seed": seed, "draws": "per image (seed, index)"}, "latent_kl": "none"}
    (folder / "eval-elbo-test.json").write_text(json.dumps(summary))
    return folder / "eval-elbo-test.csv"


def test_constructed_paired_difference_and_its_t_interval(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = 2.0 + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
    delta = -0.02 + 0.01 * torch.randn(200, generator=g, dtype=torch.float64)
    a = read_per_image(_write(tmp_path / "a", (base + delta).tolist()))
    b = read_per_image(_write(tmp_path / "b", base.tolist()))
    d = paired_difference(a, b)
    dd = (a.bpd - b.bpd).numpy()  # what the CSVs hold (6 significant digits survive the round trip)
    half = stats.t.ppf(0.975, len(dd) - 1) * dd.std(ddof=1) / math.sqrt(len(dd))
    assert d.mean == pytest.approx(float(delta.mean()), abs=1e-9 + 1e-5)
    assert d.ci95 == pytest.approx(half, rel=1e-9)
    assert d.a_lower == pytest.approx(float((delta < 0).double().mean()))
    assert abs(d.mean) > d.ci95  # -0.02 with sd 0.01 over 200 images: resolved
    assert d.terms["diffusion"][0] == pytest.approx(d.mean, abs=1e-9)
    assert d.terms["recon"] == (0.0, 0.0)


@pytest.mark.parametrize("change, error, words", [
    ({"sha": "other"}, DataError, "not the same images"),
    ({"seed": 1}, ConfigError, "different seeds"),
    ({"estimator": "ode"}, ConfigError, "different estimators"),
])
def test_results_that_are_not_paired_are_refused(tmp_path, change, error, words):
    a = read_per_image(_write(tmp_path / "a", [1.0, 2.0, 3.0]))
    b = read_per_image(_write(tmp_path / "b", [1.5, 2.5, 3.5], **change))
    with pytest.raises(error, match=words):
        check_pairable(a, b)


def test_compare_cli_on_files_and_its_one_line_refusals(tmp_path, capsys):
    a = _write(tmp_path / "a", [1.0, 2.0, 3.0, 4.0])
    b = _write(tmp_path / "b", [1.1, 2.2, 2.9, 4.2])
    main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp.json")])
    out = capsys.readouterr().out
    assert "A - B: -0.1000 ±" in out and "A lower on 75.0% of images" in out and "4 images" in out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["mean"] == pytest.approx(-0.1) and saved["images"] == 4
    c = _write(tmp_path / "c", [1.0, 2.0, 3.0], count=3, sha="zzz")
    for argv, words in (([str(a), str(c)], "not the same images"),
                        ([str(a), str(b), "--out", str(tmp_path / "cmp.json")], "exists"),
                        ([str(a), str(tmp_path / "missing.csv")], "not found")):
        with pytest.raises(SystemExit) as e:
            main(["compare", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mulan: error:") and words in err[0]
    assert json.loads((tmp_path / "cmp.json").read_text()) == saved  # the refused run wrote nothing


def test_compare_two_checkpoints_evaluates_both_with_common_draws(tmp_path, capsys):
    from mulan.train import train

    train(tiny("digits-vdm"), tmp_path / "v")
    train(tiny("digits-fixed"), tmp_path / "f")
    main(["compare", str(tmp_path / "v" / "checkpoints" / "last.pt"), str(tmp_path / "f" / "checkpoints" / "last.pt"),
          "--limit", "12", "--time-points", "2", "--out", str(tmp_path / "cmp.json")])
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["images"] == 12 and saved["settings"]["seed"] == 0
    # the same numbers as two `mulan eval` runs compared as files
    for name in ("v", "f"):
        main(["eval", str(tmp_path / name / "checkpoints" / "last.pt"), "--limit", "12", "--time-points", "2",
              "--out", str(tmp_path / f"e{name}")])
    files = sorted((tmp_path / "ev").glob("*.csv")), sorted((tmp_path / "ef").glob("*.csv"))
    d = paired_difference(read_per_image(files[0][0]), read_per_image(files[1][0]))
    assert d.mean == pytest.approx(saved["mean"], abs=2e-6)


def test_seed_level_interval_is_a_t_interval_over_the_runs_mean_differences(tmp_path, capsys):
    """Three pairs of runs whose per-run differences are -0.03, -0.01 and +0.01 (each resolved over its images):
    the recipe's interval is scipy's t-interval over those three means (2 degrees of freedom), so it includes 0
    even though every run's own interval over images excludes it."""
    from mulan.compare import seed_level_difference

    g = torch.Generator().manual_seed(1)
    pairs, a_files, b_files = [], [], []
    for i, shift in enumerate((-0.03, -0.01, 0.01)):
        base = 2.0 + 0.3 * torch.randn(300, generator=g, dtype=torch.float64)
        noise = 0.002 * torch.randn(300, generator=g, dtype=torch.float64)
        a_files.append(_write(tmp_path / f"a{i}", (base + shift + noise - noise.mean()).tolist()))
        b_files.append(_write(tmp_path / f"b{i}", base.tolist()))
        pairs.append((read_per_image(a_files[-1]), read_per_image(b_files[-1])))
    d = seed_level_difference(pairs)
    means = [float((a.bpd - b.bpd).mean()) for a, b in pairs]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(means) / 3, scale=stats.sem(means))
    assert d.mean == pytest.approx(-0.01, abs=1e-5)
    assert d.ci95 == pytest.approx((hi - lo) / 2, rel=1e-9)
    assert all(abs(r.mean) > r.ci95 for r in d.runs) and not d.excludes_zero
    main(["compare", *map(str, a_files), "--vs", *map(str, b_files)])
    out = capsys.readouterr().out
    assert f"A - B: {d.mean:+.4f} ± {d.ci95:.4f} bits/dim (95% t-interval over 3 pairs of runs" in out
    assert "includes 0" in out and out.count("  run ") == 3 and "A3" in out and "B3" in out
    with pytest.raises(SystemExit) as e:
        main(["compare", *map(str, a_files), "--vs", *map(str, b_files[:2])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 run(s) of A against 2 of B" in err[0]
