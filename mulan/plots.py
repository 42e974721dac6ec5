"""Figures of what the learned schedule does (matplotlib, Agg backend), and of training.

``schedule_figures`` writes the PNGs of ``mulan plot-schedule``: per-pixel gamma heat maps at several t for a
few test images (a scalar schedule: gamma(t) stated and drawn), the log SNR of one image's pixel mean, its
extreme pixels and the spread over pixels against t, the pixel-wise variance of gamma across z against t (the
paper's figure), and samples for a few fixed z (one row per z).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mulan.checkpoint import atomic_write
from mulan.diffusion import Diffusion

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


@torch.no_grad()
def gamma_grid(model: Diffusion, x: Tensor | None, times: Tensor, *, z: Tensor | None = None) -> Tensor:
    """gamma(z(x), t) for every image and time: (B, len(times), C, H, W) (scalar schedules broadcast)."""
    cond = model.condition(x, z=z, batch=None if x is not None else z.shape[0])
    b = (x if x is not None else z).shape[0]
    out = [cond.bound(torch.full((b,), float(t), device=times.device)).gamma.expand(b, *model.shape)
           for t in times]
    return torch.stack(out, 1)


def heatmaps(model: Diffusion, x: Tensor, path: Path, times=TIMES) -> None:
    """Rows: images; columns: the image, then the channel-mean of gamma(z(x), t) at each t."""
    save_figure(heatmap_figure(model, x, times), path)


def ends_text(model: Diffusion) -> str:
    """How a per-pixel schedule's end points are set: fixed, learned (scalars), or learned per pixel (ranges)."""
    s = model.cfg.schedule
    if s.learn_ends == "none":
        return f"ends fixed at {s.gamma_min}, {s.gamma_max}"
    g0, g1 = (torch.as_tensor(v).detach().float() for v in model.schedule.ends())
    if g0.numel() == 1:
        return f"learned ends gamma(0) = {g0.item():.2f}, gamma(1) = {g1.item():.2f}"
    return (f"learned per-pixel ends: gamma(0) in [{g0.min():.2f}, {g0.max():.2f}], "
            f"gamma(1) in [{g1.min():.2f}, {g1.max():.2f}]")


def heatmap_figure(model: Diffusion, x: Tensor, times=TIMES):
    """The matplotlib figure of :func:`heatmaps` (also logged to TensorBoard during training).

    A scalar schedule has one gamma for every pixel, so instead of heat maps the figure states gamma(t) and
    draws it against t (one curve per image when it depends on z).
    """
    if not model.schedule.per_pixel:
        return scalar_schedule_figure(model, x)
    plt = _plt()
    g = gamma_grid(model, x, torch.tensor(times)).mean(2).cpu().numpy()  # (B, T, H, W)
    fig, axes = plt.subplots(x.shape[0], len(times) + 1, figsize=(1.6 * (len(times) + 1), 1.6 * x.shape[0]),
                             squeeze=False)
    for i in range(x.shape[0]):
        img = x[i].float().mean(0).cpu().numpy()
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=model.num_values - 1)
        for j, t in enumerate(times):
            # one colour scale per column (per t), shared by the images, so rows can be compared
            im = axes[i, j + 1].imshow(g[i, j], cmap="viridis", vmin=float(g[:, j].min()), vmax=float(g[:, j].max()))
            if i == 0:
                axes[i, j + 1].set_title(f"gamma, t={t}", fontsize=8)
            if i == x.shape[0] - 1:
                cb = fig.colorbar(im, ax=axes[:, j + 1].tolist(), orientation="horizontal", pad=0.02, shrink=0.9)
                cb.ax.tick_params(labelsize=6)
                cb.ax.locator_params(nbins=3)
        for ax in axes[i]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=8)
    fig.suptitle(f"per-pixel {'gamma(z(x), t)' if model.cfg.latent.kind != 'none' else 'gamma(t), the same for every image'}; "
                 f"{ends_text(model)}", fontsize=9)
    return fig


@torch.no_grad()
def scalar_formula(model: Diffusion, x: Tensor | None = None) -> str:
    """'scalar schedule: gamma(t) = ...' with the fitted numbers (linear kinds), else its end points."""
    kind = model.cfg.schedule.kind
    cond = model.condition(x[:1]) if x is not None else model.condition(batch=1)
    ends = [float(cond.bound(torch.full((1,), t, device=model.device)).gamma.flatten()[0]) for t in (0.0, 1.0)]
    if kind in ("fixed_linear", "learned_linear"):
        return f"scalar schedule: gamma(t) = {ends[0]:.2f} + {ends[1] - ends[0]:.2f} t ({kind.replace('_', ' ')})"
    what = {"monotone_net": "a learned monotone network"}.get(kind, f"the pixel-mean of a per-pixel {kind}")
    return f"scalar schedule: gamma(t) = {what}, from gamma(0) = {ends[0]:.2f} to gamma(1) = {ends[1]:.2f}"


@torch.no_grad()
def scalar_schedule_figure(model: Diffusion, x: Tensor):
    """gamma(t) of a scalar schedule, stated in the title and drawn against t (one curve per image if z-dependent)."""
    plt = _plt()
    times = torch.linspace(0, 1, 101)
    g = gamma_grid(model, x, times)[:, :, 0, 0, 0].cpu()  # (B, T): every pixel has the same value
    varies = bool((g - g[:1]).abs().max() > 1e-6)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i in range(g.shape[0] if varies else 1):
        ax.plot(times, g[i], lw=1, label=f"test image {i + 1}" if varies else None)
    ax.set_xlabel("t"), ax.set_ylabel("gamma(t), the same for every pixel")
    if varies:
        ax.legend(fontsize=7)
    note = "depends on the image through z" if varies else "the same for every pixel and every image"
    ax.set_title(f"{scalar_formula(model, x)}\n({note}: no heat map to draw)", fontsize=8)
    return fig


@dataclass
class SNRExtremes:
    """log SNR = -gamma(z(x), t) of one image: its pixel mean, its extreme pixels, and the spread over pixels."""

    times: Tensor  # (T,)
    mean: Tensor  # (T,) pixel mean of -gamma
    lowest: Tensor  # (T,) -gamma of the pixel with the lowest gamma at t = 0.5 (least noise at mid-time)
    highest: Tensor  # (T,) -gamma of the pixel with the highest gamma at t = 0.5
    spread_lo: Tensor  # (T,) min over pixels of -gamma minus the mean
    spread_hi: Tensor  # (T,) max over pixels of -gamma minus the mean
    lowest_at: tuple[int, int, int]  # (c, h, w) of the lowest-gamma pixel
    highest_at: tuple[int, int, int]


@torch.no_grad()
def snr_extremes(model: Diffusion, x: Tensor, points: int = 101) -> SNRExtremes:
    """:class:`SNRExtremes` of the image ``x`` (1, C, H, W); the extremes are chosen at t = 0.5."""
    times = torch.linspace(0, 1, points)
    mid = torch.tensor([0.5])
    g = gamma_grid(model, x[:1], torch.cat([times, mid]))[0].expand(points + 1, *model.shape).flatten(1).cpu().double()
    snr, at_mid = -g[:-1], g[-1]
    lo, hi = int(at_mid.argmin()), int(at_mid.argmax())
    mean = snr.mean(1)
    shape = model.shape

    def position(i: int) -> tuple[int, int, int]:
        c, rest = divmod(i, shape[1] * shape[2])
        return c, *divmod(rest, shape[2])

    return SNRExtremes(times=times, mean=mean, lowest=snr[:, lo], highest=snr[:, hi],
                       spread_lo=snr.min(1).values - mean, spread_hi=snr.max(1).values - mean,
                       lowest_at=position(lo), highest_at=position(hi))


def snr_curves(model: Diffusion, x: Tensor, path: Path) -> None:
    """See :func:`snr_figure`."""
    save_figure(snr_figure(model, x), path)


def snr_figure(model: Diffusion, x: Tensor):
    """What differs between pixels of one test image: log SNR of its pixel mean and of the pixels with the lowest
    and highest gamma at t = 0.5; their difference from the mean with the spread over all pixels; where they are."""
    plt = _plt()
    e = snr_extremes(model, x)
    if not model.schedule.per_pixel:  # one log SNR for every pixel: nothing differs between pixels
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(e.times, e.mean, "k", lw=1.2)
        ax.set_xlabel("t"), ax.set_ylabel("log SNR = -gamma")
        ax.set_title(f"{scalar_formula(model, x)}\nevery pixel has this log SNR: no pixel differs", fontsize=8)
        return fig
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]})
    lo_lab = f"lowest gamma at t=0.5, pixel (row {e.lowest_at[1]}, col {e.lowest_at[2]})"
    hi_lab = f"highest gamma at t=0.5, pixel (row {e.highest_at[1]}, col {e.highest_at[2]})"
    ax = axes[0]
    ax.fill_between(e.times, e.mean + e.spread_lo, e.mean + e.spread_hi, color="0.85", label="range over pixels")
    ax.plot(e.times, e.mean, "k", lw=1.2, label="pixel mean")
    ax.plot(e.times, e.lowest, color="tab:blue", lw=1, label=lo_lab)
    ax.plot(e.times, e.highest, color="tab:red", lw=1, label=hi_lab)
    ax.set_xlabel("t"), ax.set_ylabel("log SNR = -gamma")
    ax.legend(fontsize=6)
    ax.set_title("log SNR of one test image", fontsize=9)
    ax = axes[1]
    ax.fill_between(e.times, e.spread_lo, e.spread_hi, color="0.85", label="spread over pixels (min..max)")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.plot(e.times, e.lowest - e.mean, color="tab:blue", lw=1, label="lowest-gamma pixel")
    ax.plot(e.times, e.highest - e.mean, color="tab:red", lw=1, label="highest-gamma pixel")
    ax.set_xlabel("t"), ax.set_ylabel("log SNR minus the pixel mean")
    ax.legend(fontsize=6)
    ax.set_title("how far pixels stray from the mean", fontsize=9)
    ax = axes[2]
    ax.imshow(x[0].float().mean(0).cpu().numpy(), cmap="gray", vmin=0, vmax=model.num_values - 1)
    ax.plot([e.lowest_at[2]], [e.lowest_at[1]], "o", mfc="none", mec="tab:blue", ms=12, mew=2, label="lowest gamma")
    ax.plot([e.highest_at[2]], [e.highest_at[1]], "x", color="tab:red", ms=12, mew=2, label="highest gamma")
    ax.legend(fontsize=6, loc="lower center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("the image; the two pixels marked", fontsize=9)
    fig.tight_layout()
    return fig


@torch.no_grad()
def variance_across_z(model: Diffusion, x: Tensor) -> tuple[Tensor, Tensor]:
    """(times, mean over pixels of Var_z gamma(z, t)) with z = z(x) over the given images."""
    times = torch.linspace(0, 1, 51)
    g = gamma_grid(model, x, times).flatten(2)  # (B, T, n)
    return times, g.var(0, unbiased=False).mean(-1).cpu()


def variance_plot(model: Diffusion, x: Tensor, path: Path) -> None:
    save_figure(variance_figure(model, x), path)


def variance_figure(model: Diffusion, x: Tensor):
    """The pixel-mean of Var_z gamma(z, t) over t; a model without a latent says it has nothing to vary."""
    plt = _plt()
    times, var = variance_across_z(model, x)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(times, var)
    ax.set_xlabel("t"), ax.set_ylabel("pixel-mean of Var_z gamma(z, t)")
    ax.set_title(f"how much the schedule adapts to the image ({x.shape[0]} test images)", fontsize=9)
    if model.cfg.latent.kind == "none":
        ax.text(0.5, 0.6, "no latent: every image gets the same schedule\n(the variance across images is 0 by design)",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
    return fig


def samples_per_z(model: Diffusion, path: Path, *, num_z: int = 4, per_z: int = 8, steps: int = 250,
                  seed: int = 0, callback=None) -> None:
    """See :func:`samples_per_z_figure`."""
    save_figure(samples_per_z_figure(model, num_z=num_z, per_z=per_z, steps=steps, seed=seed, callback=callback),
                path)


def samples_per_z_figure(model: Diffusion, *, num_z: int = 4, per_z: int = 8, steps: int = 250, seed: int = 0,
                         callback=None):
    """Rows: a fixed z drawn from the prior, labelled; columns: samples given that z."""
    from mulan.images import make_grid
    from mulan.sampling import ancestral_sample

    plt = _plt()
    device = model.device
    gen = torch.Generator(device).manual_seed(seed)
    z = model.latent.sample_prior(num_z, generator=gen, device=device)
    zs = z.repeat_interleave(per_z, 0) if z is not None else None
    images = ancestral_sample(model, num_z * per_z, steps=steps, z=zs, generator=gen, callback=callback)
    scale = max(1, 32 // model.shape[1])  # small images enlarged, so the 2-pixel separators stay thin
    grid = make_grid(images.cpu(), model.num_values, nrow=per_z, scale=scale, pad=2)
    h = model.shape[1] * scale
    fig, ax = plt.subplots(figsize=(0.6 * per_z + 1.6, 0.6 * num_z + 0.8))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([2 + r * (h + 2) + h / 2 - 0.5 for r in range(num_z)])
    if z is not None:
        labels = [_z_label(z[r]) for r in range(num_z)]
        title = f"each row: {per_z} samples sharing one z drawn from p(z)\n({steps} ancestral steps)"
    else:
        labels = [f"row {r + 1}" for r in range(num_z)]
        title = f"no latent z: {num_z * per_z} independent samples\n({steps} ancestral steps)"
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_title(title, fontsize=8)
    return fig


def _z_label(z: Tensor) -> str:
    """'z = {2, 5}' for a k-hot z (its active units), else its first values."""
    flat = z.flatten()
    if bool(((flat == 0) | (flat == 1)).all()):
        return "z = {" + ", ".join(str(i) for i in flat.nonzero().flatten().tolist()) + "}"
    return "z = (" + ", ".join(f"{v:.1f}" for v in flat[:3].tolist()) + (", ...)" if flat.numel() > 3 else ")")


SCHEDULE_FIGURES = ("gamma_heatmaps.png", "snr_curves.png", "gamma_variance_across_z.png", "samples_per_z.png")


def schedule_figures(model: Diffusion, test_images: Tensor, out_dir: Path, *, sample_steps: int = 250,
                     seed: int = 0, callback=None) -> list[Path]:
    """All schedule figures for a model (:data:`SCHEDULE_FIGURES`), written to ``out_dir``; returns their paths.
    ``callback(step, steps)`` follows the ancestral sampling of the samples-per-z figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = test_images[:64].to(model.device)
    paths = [out_dir / n for n in SCHEDULE_FIGURES]
    heatmaps(model, x[:4], paths[0])
    snr_curves(model, x, paths[1])
    variance_plot(model, x, paths[2])
    samples_per_z(model, paths[3], steps=sample_steps, seed=seed, callback=callback)
    return paths


def training_curves(metrics: Path, path: Path) -> None:
    """See :func:`training_figure`."""
    save_figure(training_figure(metrics), path)


def training_figure(metrics: Path):
    """Training loss and held-out bound (bits/dim) against step, from ``metrics.jsonl``; a run with a single
    logged point says so (one point draws no curve)."""
    plt = _plt()
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss_bpd"]) for r in records if r.get("kind") == "train" and "loss_bpd" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    split = evals[-1].get("split", "test") if evals else "test"  # periodic evaluations read val when there is one
    ev = [(r["step"], r[f"{split}_bpd"]) for r in evals if f"{split}_bpd" in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if tr:
        ax.plot(*zip(*tr), "o-" if len(tr) == 1 else "-", lw=1, label="train batch (ELBO, bits/dim)")
    if ev:
        ax.plot(*zip(*ev), "o-", label=f"{split} subset (EMA, ELBO, bits/dim)")
    ax.set_xlabel("step"), ax.set_ylabel("bits/dim")
    values = [v for _, v in tr + ev]
    lo = min(values or [0])
    ax.set_ylim(lo - 0.1, lo + 3.0)
    if tr or ev:
        ax.legend(fontsize=7)
    if len(tr) <= 1 and len(ev) <= 1:
        what = (f"only one logged point (step {tr[0][0]}: {tr[0][1]:.3f} bits/dim)" if tr
                else "no training step was logged")
        ax.set_title(f"{what}: no curve to draw; lower train.log_every for more", fontsize=8)
        ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.3")
    return fig
