"""Figures of what the learned schedule does (matplotlib, Agg backend), and of training.

``schedule_figures`` writes the PNGs of ``mulan plot-schedule``: per-pixel gamma heat maps at several t for a
few test images, -gamma (log SNR) against t for several pixels, the pixel-wise variance of gamma across z
against t (the paper's figure), and samples for a few fixed z.
"""

from __future__ import annotations

import io
import json
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


def heatmap_figure(model: Diffusion, x: Tensor, times=TIMES):
    """The matplotlib figure of :func:`heatmaps` (also logged to TensorBoard during training)."""
    plt = _plt()
    g = gamma_grid(model, x, torch.tensor(times)).mean(2).cpu().numpy()  # (B, T, H, W)
    s = model.cfg.schedule
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
    fig.suptitle(f"per-pixel gamma(z(x), t); ends fixed at {s.gamma_min}, {s.gamma_max}" if model.schedule.per_pixel
                 else "gamma(t) (scalar schedule: one value per t)", fontsize=9)
    return fig


def snr_curves(model: Diffusion, x: Tensor, path: Path, pixels: int = 8) -> None:
    """log SNR = -gamma against t for several pixels of the first image."""
    plt = _plt()
    times = torch.linspace(0, 1, 101)
    g = gamma_grid(model, x[:1], times)[0].flatten(1).cpu()  # (T, n)
    idx = torch.linspace(0, g.shape[1] - 1, pixels).long()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i in idx.tolist():
        ax.plot(times, -g[:, i], lw=1, label=f"pixel {i}")
    ax.set_xlabel("t"), ax.set_ylabel("log SNR = -gamma")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("log SNR of several pixels of one test image", fontsize=9)
    save_figure(fig, path)


@torch.no_grad()
def variance_across_z(model: Diffusion, x: Tensor) -> tuple[Tensor, Tensor]:
    """(times, mean over pixels of Var_z gamma(z, t)) with z = z(x) over the given images."""
    times = torch.linspace(0, 1, 51)
    g = gamma_grid(model, x, times).flatten(2)  # (B, T, n)
    return times, g.var(0, unbiased=False).mean(-1).cpu()


def variance_plot(model: Diffusion, x: Tensor, path: Path) -> None:
    plt = _plt()
    times, var = variance_across_z(model, x)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(times, var)
    ax.set_xlabel("t"), ax.set_ylabel("pixel-mean of Var_z gamma(z, t)")
    ax.set_title(f"how much the schedule adapts to the image ({x.shape[0]} test images)", fontsize=9)
    save_figure(fig, path)


def samples_per_z(model: Diffusion, path: Path, *, num_z: int = 4, per_z: int = 8, steps: int = 250,
                  seed: int = 0) -> None:
    """Rows: a fixed z drawn from the prior; columns: samples given that z."""
    from mulan.images import save_grid
    from mulan.sampling import ancestral_sample

    device = model.device
    gen = torch.Generator(device).manual_seed(seed)
    z = model.latent.sample_prior(num_z, generator=gen, device=device)
    z = z.repeat_interleave(per_z, 0) if z is not None else None
    images = ancestral_sample(model, num_z * per_z, steps=steps, z=z, generator=gen)
    save_grid(images, model.num_values, path, nrow=per_z)


def schedule_figures(model: Diffusion, test_images: Tensor, out_dir: Path, *, sample_steps: int = 250,
                     seed: int = 0) -> list[Path]:
    """All schedule figures for a model, written to ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = test_images[:64].to(model.device)
    paths = [out_dir / n for n in ("gamma_heatmaps.png", "snr_curves.png", "gamma_variance_across_z.png",
                                   "samples_per_z.png")]
    heatmaps(model, x[:4], paths[0])
    snr_curves(model, x, paths[1])
    variance_plot(model, x, paths[2])
    samples_per_z(model, paths[3], steps=sample_steps, seed=seed)
    return paths


def training_curves(metrics: Path, path: Path) -> None:
    """Training loss and held-out bound (bits/dim) against step, from ``metrics.jsonl``."""
    plt = _plt()
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss_bpd"]) for r in records if r.get("kind") == "train" and "loss_bpd" in r]
    ev = [(r["step"], r["test_bpd"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if tr:
        ax.plot(*zip(*tr), lw=1, label="train batch (ELBO, bits/dim)")
    if ev:
        ax.plot(*zip(*ev), "o-", label="test subset (EMA, ELBO, bits/dim)")
    ax.set_xlabel("step"), ax.set_ylabel("bits/dim")
    lo = min([v for _, v in tr + ev] or [0])
    ax.set_ylim(lo - 0.1, lo + 3.0)
    ax.legend(fontsize=7)
    save_figure(fig, path)
