"""Evaluation reports: per-image results (CSV) and one summary (JSON + a printed block).

Every reported bits/dim says which estimator and settings, which split and how many images (with the
dataset's fingerprint), which latent KL it charges, and carries a 95% confidence interval over images.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mulan import distributed
from mulan.checkpoint import atomic_write, refuse_existing
from mulan.config import EvalConfig
from mulan.data import ImageDataset
from mulan.diffusion import Diffusion, bits_per_dim
from mulan.likelihood.elbo import elbo_per_image


@dataclass
class EvalSummary:
    """One evaluation: what was measured, on what, how."""

    estimator: str  # 'elbo' or 'ode'
    settings: dict  # the estimator's settings (time points, tolerances, ...)
    split: str
    images: int  # how many images were evaluated
    subset: bool  # True when fewer than the whole split
    dataset: dict  # the split's fingerprint
    bpd: float  # mean bits/dim over images
    ci95: float  # half-width of the 95% confidence interval of the mean
    terms_bpd: dict  # mean of each term, bits/dim
    latent_kl: str  # which latent KL is charged in `bpd`
    latent_bpd: float  # its mean cost, bits/dim
    wall_s: float
    checkpoint: str = ""
    step: int = 0
    weights: str = ""  # 'ema' or 'raw' ('' when not from a checkpoint)
    extra: dict = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """The file name (without suffix) of this evaluation's CSV and JSON: see :func:`report_stem`."""
        return report_stem(self.estimator, self.split, self.images, self.subset, self.settings, self.weights,
                           self.step if self.checkpoint else None)

    def lines(self) -> list[str]:
        part = f"{self.images} images ({'subset of' if self.subset else 'whole'} {self.split} split)"
        return [
            f"{self.estimator.upper()} bound: {self.bpd:.4f} ± {self.ci95:.4f} bits/dim (95% CI over images)",
            f"  data      : {self.dataset.get('name')} {part}, sha256 {str(self.dataset.get('sha256'))[:16]}…",
            f"  estimator : {self.estimator} {json.dumps(self.settings, sort_keys=True)}",
            "  terms     : " + ", ".join(f"{k} {v:.4f}" for k, v in self.terms_bpd.items()) + " bits/dim",
            f"  latent KL : {self.latent_kl} ({self.latent_bpd:.4f} bits/dim charged)",
            f"  wall time : {self.wall_s:.1f} s" + (f", checkpoint {self.checkpoint} (step {self.step}, "
                                                   f"{_WEIGHTS.get(self.weights, self.weights)} weights)"
                                                   if self.checkpoint else ""),
        ] + ([f"  solver    : {self.extra['mean_nfe']:.1f} function evaluations per solve (mean), "
              f"{self.extra['images_per_s']:.2f} images/s"] if "mean_nfe" in self.extra else [])


_WEIGHTS = {"ema": "EMA", "raw": "raw"}


def report_stem(estimator: str, split: str, images: int, subset: bool, settings: dict, weights: str = "",
                step: int | None = None) -> str:
    """``eval-<estimator>-<split>-<all|firstN>-<settings>-seed<S>[-<weights>-step<N>]``: what the numbers are.

    The settings that change the number: ELBO ``S<time points>`` and ``T<steps>`` for the discrete-time bound;
    ODE ``<method>-rtol<r>-atol<a>-<exact|hutchinson<probes>[gaussian]>-<truncnorm|uniform>K<K>[-float64]``;
    ``ranks<R>`` when several ranks shared the draws. The CSV (one row per image) and the JSON summary share it.
    """
    parts = ["eval", estimator, split, f"first{images}" if subset else "all"]
    if estimator == "elbo":
        parts.append(f"S{settings['time_points']}")
        if settings.get("timesteps"):
            parts.append(f"T{settings['timesteps']}")
    else:
        div = (f"hutchinson{settings['probes']}{'gaussian' if settings['probe_dist'] == 'gaussian' else ''}"
               if settings["divergence"] == "hutchinson" else settings["divergence"])
        parts += [settings["method"], f"rtol{settings['rtol']:g}", f"atol{settings['atol']:g}", div,
                  f"{settings['dequantization']}K{settings['dequant_samples']}"]
        if settings["dtype"] != "float32":
            parts.append(settings["dtype"])
    if "ranks" in settings:
        parts.append(f"ranks{settings['ranks']}")
    parts.append(f"seed{settings['seed']}")
    if weights:
        parts.append(weights)
    if step is not None:
        parts.append(f"step{step}")
    return "-".join(parts)


def _outputs(out_dir: Path | None, stem: str, overwrite: bool) -> tuple[Path, Path] | None:
    """The CSV and JSON paths of an evaluation (None off the main rank, which writes nothing); refused before any
    work when they exist, unless ``overwrite`` (checked on every rank, so all stop together)."""
    if out_dir is None:
        return None
    paths = (out_dir / f"{stem}.csv", out_dir / f"{stem}.json")
    refuse_existing(paths, overwrite)
    return paths if distributed.world().main else None


def _elbo_settings(model: Diffusion, time_points: int, seed: int) -> dict:
    # Per-image draws: the batch size and the rank count do not change the number, so they are not settings.
    return {"time_points": time_points, "time_sampling": "stratified",
            "diffusion_loss": "discrete" if model.cfg.timesteps else "continuous",
            "timesteps": model.cfg.timesteps, "seed": seed, "draws": "per image (seed, index)"}


def measure_elbo(model: Diffusion, data: ImageDataset, *, time_points: int, batch_size: int, seed: int = 0,
                 limit: int = 0, callback=None, checkpoint: str = "", step: int = 0,
                 weights: str = "") -> tuple[EvalSummary, dict[str, torch.Tensor]]:
    """Negative ELBO of (the first ``limit`` images of, or all of) ``data``: the summary and the per-image
    columns in bits/dim ('bpd' and each term), with per-image draws seeded by (``seed``, image index).
    ``callback(images_done, images_total)`` after each batch."""
    from mulan.likelihood.stats import mean_ci

    model = _in_eval_mode(model, model.dtype)
    images = data.images[:limit] if 0 < limit < len(data) else data.images
    t0 = time.perf_counter()
    res = elbo_per_image(model, images, time_points=time_points, batch_size=batch_size, seed=seed,
                         callback=callback)
    wall = time.perf_counter() - t0
    columns = {"bpd": res.bpd(model.n), **{k: bits_per_dim(v, model.n) for k, v in
                                           {"recon": res.recon, "prior": res.prior, "diffusion": res.diffusion,
                                            "latent": res.latent}.items()}}
    mean, half = mean_ci(columns["bpd"])
    terms = {k: float(v.mean()) for k, v in columns.items() if k != "bpd"}
    summary = EvalSummary(
        estimator="elbo", settings=_elbo_settings(model, time_points, seed), split=data.split,
        images=int(images.shape[0]), subset=int(images.shape[0]) < len(data), dataset=_fingerprint(data, images),
        bpd=float(mean), ci95=float(half), terms_bpd=terms, latent_kl=res.latent_kl, latent_bpd=terms["latent"],
        wall_s=wall, checkpoint=checkpoint, step=step, weights=weights)
    return summary, columns


def evaluate_elbo(model: Diffusion, data: ImageDataset, *, time_points: int, batch_size: int, seed: int = 0,
                  limit: int = 0, out_dir: Path | None = None, callback=None, checkpoint: str = "", step: int = 0,
                  weights: str = "", overwrite: bool = False) -> EvalSummary:
    """:func:`measure_elbo`, and with ``out_dir`` its files ``<stem>.csv`` (one row per image) and
    ``<stem>.json`` (the summary), ``stem`` from :func:`report_stem`; existing files are refused before any
    work unless ``overwrite``. ``checkpoint``, ``step`` and ``weights`` say which model this is (they go into
    the summary and the name)."""
    images = min(limit, len(data)) if limit > 0 else len(data)
    stem = report_stem("elbo", data.split, images, images < len(data), _elbo_settings(model, time_points, seed),
                       weights, step if checkpoint else None)
    paths = _outputs(out_dir, stem, overwrite)
    summary, columns = measure_elbo(model, data, time_points=time_points, batch_size=batch_size, seed=seed,
                                    limit=limit, callback=callback, checkpoint=checkpoint, step=step,
                                    weights=weights)
    if paths is not None:
        write_per_image(paths[0], columns)
        write_summary(paths[1], summary)
    return summary


def evaluate_ode(model: Diffusion, data: ImageDataset, ecfg: EvalConfig, *, seed: int = 0, limit: int = 0,
                 out_dir: Path | None = None, callback=None, checkpoint: str = "", step: int = 0,
                 weights: str = "", overwrite: bool = False) -> EvalSummary:
    """Exact likelihood bound from the probability-flow ODE with dequantization (SPEC "Exact NLL").

    Per image: -log P(x) <= -log mean_k [p_0(y_k) / q(y_k | x)] (K = ``dequant_samples``), y_k ~ q inside x's
    bin, log p_0 by the ODE with z fixed at the encoder's top-k; the strict latent KL is added.
    Files, names and provenance as :func:`evaluate_elbo`. ``callback(images_done, images_total)`` is called
    after every drift evaluation, ``images_done`` counting a batch in flight by how far its solves got in t.
    """
    from mulan.likelihood.dequantize import dequantized_nll
    from mulan.likelihood.ode import ode_log_likelihood
    from mulan.likelihood.stats import mean_ci

    dtype = torch.float64 if ecfg.ode_float64 else torch.float32
    model = _in_eval_mode(model, dtype)
    images = data.images[:limit] if 0 < limit < len(data) else data.images
    world = distributed.world()
    settings = {"rtol": ecfg.ode_rtol, "atol": ecfg.ode_atol, "method": ecfg.ode_method,
                "divergence": ecfg.ode_divergence, "dtype": str(dtype).removeprefix("torch."),
                "dequantization": ecfg.dequantization, "dequant_samples": ecfg.dequant_samples, "seed": seed,
                "batch_size": ecfg.batch_size, **_ranks()}
    if ecfg.ode_divergence == "hutchinson":
        settings.update(probes=ecfg.ode_probes, probe_dist=ecfg.ode_probe_dist)
    subset = int(images.shape[0]) < len(data)
    paths = _outputs(out_dir, report_stem("ode", data.split, int(images.shape[0]), subset, settings, weights,
                                          step if checkpoint else None), overwrite)
    # Under torchrun every rank solves its own shard with its own draws (so the draws depend on the rank count).
    gen = torch.Generator(model.device).manual_seed(seed + 1_000_003 * world.rank)
    nll, latent, nfes = [], [], []
    t0 = time.perf_counter()
    done = 0
    for idx, real in world.batches(images.shape[0], ecfg.batch_size):
        x = images[idx].to(model.device)
        with torch.no_grad():
            cond = model.condition(x, strict=True, generator=gen)

        draws, reached = [0], [0.0]  # dequantization draws finished for this batch; how far in t the solve got

        def on_eval(nfe: int, t: float, done=done, real=real, draws=draws, reached=reached) -> None:
            # The solve runs from t = 0 to 1: count the batch's images by the furthest t evaluated so far (an
            # adaptive solver also evaluates trial steps it then rejects; progress never goes backwards).
            reached[0] = max(reached[0], min(t, 1.0))
            if callback is not None:
                callback(done + real * (draws[0] + reached[0]) / ecfg.dequant_samples, images.shape[0])

        def log_density(y):
            res = ode_log_likelihood(y, cond.eps_fn, cond.bound, rtol=ecfg.ode_rtol, atol=ecfg.ode_atol,
                                     method=ecfg.ode_method, divergence=ecfg.ode_divergence, probes=ecfg.ode_probes,
                                     probe_dist=ecfg.ode_probe_dist, dtype=dtype, generator=gen, callback=on_eval)
            nfes.append(res.nfe)
            draws[0], reached[0] = draws[0] + 1, 0.0
            return res.logp

        batch_nll = dequantized_nll(x, model.num_values, log_density, cond.bound, kind=ecfg.dequantization,
                                    samples=ecfg.dequant_samples, generator=gen, dtype=dtype)
        nll.append(world.gather(batch_nll.double())[:real].cpu())
        latent.append(world.gather(cond.latent.kl.double())[:real].cpu())
        done += real
        if callback is not None:
            callback(done, images.shape[0])
    nfes = world.gather(torch.tensor(nfes, dtype=torch.float64, device=model.device)).tolist()
    wall = time.perf_counter() - t0
    flow, lat = bits_per_dim(torch.cat(nll), model.n), bits_per_dim(torch.cat(latent), model.n)
    bpd = flow + lat
    mean, half = mean_ci(bpd)
    summary = EvalSummary(
        estimator="ode", settings=settings, split=data.split, images=int(images.shape[0]), subset=subset,
        dataset=_fingerprint(data, images), bpd=float(mean), ci95=float(half),
        terms_bpd={"flow": float(flow.mean()), "latent": float(lat.mean())},
        latent_kl=cond.latent.kl_kind, latent_bpd=float(lat.mean()), wall_s=wall, checkpoint=checkpoint,
        step=step, weights=weights,
        extra={"mean_nfe": float(sum(nfes) / max(len(nfes), 1)), "images_per_s": images.shape[0] / wall})
    if paths is not None:
        write_per_image(paths[0], {"bpd": bpd, "flow": flow, "latent": lat})
        write_summary(paths[1], summary)
    return summary


def _in_eval_mode(model: Diffusion, dtype: torch.dtype) -> Diffusion:
    """``model`` itself when it is already in eval mode and ``dtype``, else a converted copy: an estimator
    never changes the mode or the dtype of the model it is given."""
    if not model.training and model.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype).eval()


def _ranks() -> dict:
    """The rank count, when several shared the evaluation (the Monte-Carlo draws depend on it)."""
    world = distributed.world()
    return {"ranks": world.size} if world.distributed else {}


def _fingerprint(data: ImageDataset, images: torch.Tensor) -> dict:
    """The fingerprint of the images actually evaluated (a subset gets its own count and sha256)."""
    if images.shape[0] == len(data):
        return data.fingerprint()
    sub = ImageDataset(images=images, num_values=data.num_values, name=data.name, split=data.split, source=data.source)
    return {**sub.fingerprint(), "subset_of": data.fingerprint()}


def write_per_image(path: Path, columns: dict[str, torch.Tensor]) -> None:
    """One row per image: its index and each column (bits/dim)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", *columns])
    rows = zip(*[c.tolist() for c in columns.values()])
    for i, row in enumerate(rows):
        w.writerow([i, *(f"{v:.6f}" for v in row)])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_summary(path: Path, summary: EvalSummary) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(asdict(summary), indent=2).encode()))
