"""Figures that inform: what each one states or marks, checked against numbers computed here."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import perturb, tiny
from mulan.images import SEPARATOR, make_grid
from mulan.plots import (heatmap_figure, samples_per_z_figure, snr_extremes, snr_figure, training_figure,
                         variance_figure)
from mulan.diffusion import build_model


def texts(fig) -> str:
    """Every title, label and text of a figure, joined."""
    parts = [fig._suptitle.get_text()] if fig._suptitle else []
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
        parts += [t.get_text() for t in ax.get_yticklabels()]
        if ax.get_legend() is not None:
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def mulan_model():
    """A MuLAN model whose per-pixel schedule really differs between pixels (perturbed z-decoder)."""
    torch.manual_seed(3)
    model = build_model(tiny("digits-mulan")).eval()
    perturb(model.schedule, 0.3)
    return model


def digits(n=4):
    from mulan.data import load_splits

    return load_splits(tiny("digits-mulan").data)[1].images[:n]


def test_a_scalar_schedule_is_stated_instead_of_a_heat_map():
    model = build_model(tiny("digits-vdm")).eval()
    with torch.no_grad():
        model.schedule.b.fill_(-11.5)
        model.schedule.w.fill_(17.0)
    fig = heatmap_figure(model, digits())
    assert all(not ax.images for ax in fig.axes)  # no heat map, no colour bar on a zero-width range
    assert "scalar schedule: gamma(t) = -11.50 + 17.00 t" in texts(fig)
    assert "every pixel has this log SNR" in texts(snr_figure(model, digits()))


def test_variance_across_z_says_a_model_without_latent_has_nothing_to_vary(mulan_model):
    no_latent = build_model(tiny("digits-mulan-ends-map")).eval()
    assert "no latent: every image gets the same schedule" in texts(variance_figure(no_latent, digits()))
    assert "no latent" not in texts(variance_figure(mulan_model, digits()))


def test_heat_maps_state_the_learned_ends_and_whether_gamma_depends_on_z(mulan_model):
    no_latent = build_model(tiny("digits-mulan-ends-map")).eval()
    with torch.no_grad():
        no_latent.schedule.b.fill_(-7.25)
        no_latent.schedule.w.fill_(12.75)
    title = texts(heatmap_figure(no_latent, digits()))
    assert "gamma(t), the same for every image" in title
    assert "learned ends gamma(0) = -7.25, gamma(1) = 5.50" in title
    assert "gamma(z(x), t); ends fixed at -13.3, 5.0" in texts(heatmap_figure(mulan_model, digits()))


def test_snr_figure_marks_the_pixels_with_the_lowest_and_highest_gamma_at_mid_time(mulan_model):
    x = digits(1)
    with torch.no_grad():
        g = mulan_model.condition(x).bound(torch.tensor([0.5])).gamma[0, 0]  # (H, W)
    lo, hi = divmod(int(g.argmin()), 8), divmod(int(g.argmax()), 8)
    assert lo != hi
    fig = snr_figure(mulan_model, x)
    image_ax = fig.axes[2]
    marks = {tuple(int(v) for v in (line.get_ydata()[0], line.get_xdata()[0])) for line in image_ax.lines}
    assert marks == {lo, hi}  # (row, col) of both pixels, marked on the image
    assert f"pixel (row {lo[0]}, col {lo[1]})" in texts(fig) and f"pixel (row {hi[0]}, col {hi[1]})" in texts(fig)
    e = snr_extremes(mulan_model, x)
    # The polynomial's ends are fixed for every pixel: no spread at t = 0 and 1, some in between.
    assert e.spread_hi[[0, -1]].abs().max() < 1e-4 and e.spread_lo[[0, -1]].abs().max() < 1e-4
    assert float(e.spread_hi.max()) > 0.01 and float(e.spread_lo.min()) < -0.01
    mid = len(e.times) // 2  # t = 0.5: the marked pixels are the extremes there
    torch.testing.assert_close(e.lowest[mid] - e.mean[mid], e.spread_hi[mid])
    torch.testing.assert_close(e.highest[mid] - e.mean[mid], e.spread_lo[mid])


def test_samples_per_z_has_a_title_and_one_labelled_row_per_z(mulan_model):
    fig = samples_per_z_figure(mulan_model, num_z=3, per_z=2, steps=2, seed=5)
    z = mulan_model.latent.sample_prior(3, generator=torch.Generator().manual_seed(5))  # the figure's draw
    expected = ["z = {" + ", ".join(map(str, row.nonzero().flatten().tolist())) + "}" for row in z]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == expected
    assert "each row: 2 samples sharing one z" in ax.get_title()


def test_training_curves_with_a_single_point_say_so(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "train", "step": 1, "loss_bpd": 2.5}) + "\n")
    assert "only one logged point (step 1: 2.500 bits/dim)" in texts(training_figure(metrics))
    metrics.write_text("".join(json.dumps({"kind": "train", "step": s, "loss_bpd": 3.0 - s / 10}) + "\n"
                               for s in (1, 2, 3)))
    fig = training_figure(metrics)
    assert "one logged point" not in texts(fig) and len(fig.axes[0].lines[0].get_xdata()) == 3


def test_grid_tiles_are_separated_by_a_colour_no_pixel_has():
    images = torch.zeros(4, 1, 3, 3, dtype=torch.uint8)  # black tiles: a black separator would vanish
    images[3] = 16
    grid = make_grid(images, 17, nrow=2, pad=1)
    assert grid.shape == (3, 9, 9)
    sep = torch.tensor(SEPARATOR, dtype=torch.uint8)
    for k in (0, 4, 8):  # the separator rows and columns
        assert (grid[:, k, :] == sep[:, None]).all() and (grid[:, :, k] == sep[:, None]).all()
    assert (grid[:, 1:4, 1:4] == 0).all() and (grid[:, 5:8, 5:8] == 255).all()
