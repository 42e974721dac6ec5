"""Paired comparison of two models on the same images with common random numbers (``mulan compare``).

Two bounds measured on the same images with the same per-image times and noise (``elbo_per_image`` seeds every
image's draws from (seed, image index)) differ image by image far less than either varies across images: most
of the Monte-Carlo noise and all of the between-image spread cancel in the per-image difference d_i = A_i - B_i.
The paired 95% interval is the Student-t interval of the mean of the d_i, so it can resolve differences of a few
thousandths of a bit per dimension where the unpaired intervals of the two bounds (+-0.02 on digits) cannot.

``A`` and ``B`` are checkpoints (both evaluated here, with one seed) or per-image CSV files of ``mulan eval``
with their JSON summaries beside them (same stem). Files from different splits, image sets, estimators,
settings or seeds are refused: their differences would not be paired.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mulan.errors import ConfigError, DataError
from mulan.likelihood.stats import mean_ci
from mulan.loading import add_load_options, load_with_overrides

TERMS = ("recon", "prior", "diffusion", "latent")


@dataclass
class PerImage:
    """Per-image bits/dim of one model on one image set, and what produced them."""

    bpd: Tensor  # (N,) float64
    terms: dict[str, Tensor]  # each (N,) float64, bits/dim
    summary: dict  # the evaluation's JSON summary (estimator, settings, dataset fingerprint, checkpoint, ...)
    source: str  # where they came from (a path)


@dataclass
class PairedDifference:
    """Mean of A - B over images with its paired 95% interval, per term too; bits/dim."""

    images: int
    mean: float
    ci95: float
    terms: dict[str, tuple[float, float]]  # term -> (mean difference, half-width)
    a_lower: float  # share of images where A's bound is lower
    a: tuple[float, float]  # A's mean and unpaired half-width
    b: tuple[float, float]
    extra: dict = field(default_factory=dict)

    def lines(self, a_name: str = "A", b_name: str = "B") -> list[str]:
        sig = "excludes 0" if abs(self.mean) > self.ci95 else "includes 0"
        return [
            f"{a_name} - {b_name}: {self.mean:+.4f} ± {self.ci95:.4f} bits/dim (paired 95% CI over {self.images} "
            f"images, {sig}); {a_name} lower on {100 * self.a_lower:.1f}% of images",
            "  per term  : " + ", ".join(f"{k} {m:+.4f} ± {h:.4f}" for k, (m, h) in self.terms.items()),
            f"  {a_name:<9} : {self.a[0]:.4f} ± {self.a[1]:.4f} bits/dim (unpaired 95% CI)",
            f"  {b_name:<9} : {self.b[0]:.4f} ± {self.b[1]:.4f} bits/dim (unpaired 95% CI)",
        ]


def paired_difference(a: PerImage, b: PerImage) -> PairedDifference:
    """A - B image by image; the two must hold the same images in the same order."""
    if a.bpd.shape != b.bpd.shape:
        raise DataError(f"the two results hold {a.bpd.numel()} and {b.bpd.numel()} images: not the same image set")
    d = a.bpd - b.bpd
    mean, half = mean_ci(d)
    half = 0.0 if bool((d == d[0]).all()) else half  # identical differences: a zero-width interval, not NaN
    terms = {}
    for k in TERMS:
        if k in a.terms and k in b.terms:
            dk = a.terms[k] - b.terms[k]
            m, h = mean_ci(dk)
            terms[k] = (m, 0.0 if bool((dk == dk[0]).all()) else h)
    return PairedDifference(images=int(d.numel()), mean=mean, ci95=half, terms=terms,
                            a_lower=float((d < 0).double().mean()), a=mean_ci(a.bpd), b=mean_ci(b.bpd))


@dataclass
class SeedLevelDifference:
    """A configuration against another over training seeds: one paired difference per pair of runs (run i of A
    against run i of B, the same images and draws), and the Student-t interval over the runs' mean differences.

    The interval's unit is the training run, not the image: it carries the between-seed spread, so it is a
    statement about the recipes, where each run's interval over images is one about two trained networks."""

    runs: list[PairedDifference]
    mean: float  # mean over runs of the per-run mean difference, bits/dim
    ci95: float  # t-interval half-width over runs (k - 1 degrees of freedom); inf for one run
    sd: float  # standard deviation of the per-run mean differences (0 for one run)

    @property
    def excludes_zero(self) -> bool:
        return abs(self.mean) > self.ci95

    def lines(self, a_name: str = "A", b_name: str = "B") -> list[str]:
        k = len(self.runs)
        head = (f"{a_name} - {b_name}: {self.mean:+.4f} ± {self.ci95:.4f} bits/dim (95% t-interval over {k} "
                f"pairs of runs, sd {self.sd:.4f}; {'excludes' if self.excludes_zero else 'includes'} 0)"
                if k > 1 else f"{a_name} - {b_name}: {self.mean:+.4f} bits/dim from one pair of runs: no interval "
                              "over training seeds (give several runs per side)")
        return [head] + [f"  run {i + 1}: {d.mean:+.4f} ± {d.ci95:.4f} (paired over {d.images} images), A lower on "
                         f"{100 * d.a_lower:.1f}%" for i, d in enumerate(self.runs)]


def seed_level_difference(pairs: list[tuple[PerImage, PerImage]]) -> SeedLevelDifference:
    """:class:`SeedLevelDifference` of (A_i, B_i) pairs of per-image results (one pair per training seed)."""
    if not pairs:
        raise ConfigError("no pairs of runs to compare")
    runs = [paired_difference(a, b) for a, b in pairs]
    means = torch.tensor([d.mean for d in runs], dtype=torch.float64)
    mean, half = mean_ci(means)
    sd = float(means.std()) if len(runs) > 1 else 0.0
    return SeedLevelDifference(runs=runs, mean=mean, ci95=0.0 if sd == 0.0 and len(runs) > 1 else half, sd=sd)


# --- per-image results from files ---------------------------------------------------------------------------

def read_per_image(csv_path: str | Path) -> PerImage:
    """A per-image CSV of ``mulan eval`` and the JSON summary with the same stem beside it."""
    path = Path(csv_path)
    summary_path = path.with_suffix(".json")
    if not path.is_file():
        raise DataError(f"result file not found: {path}")
    if not summary_path.is_file():
        raise DataError(f"{path} has no summary {summary_path.name} beside it (written by `mulan eval` with the CSV)")
    try:
        summary = json.loads(summary_path.read_text())
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = {k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64)
                   for k in ("bpd", *TERMS) if rows and k in rows[0]}
        index = [int(r["index"]) for r in rows]
    except (json.JSONDecodeError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a per-image result of `mulan eval` ({type(e).__name__}: {str(e)[:80]})") from None
    if not rows or "bpd" not in columns:
        raise DataError(f"{path} holds no per-image bits/dim")
    if index != list(range(len(rows))):
        raise DataError(f"{path}: rows are not images 0..{len(rows) - 1} in order")
    if not isinstance(summary, dict) or summary.get("images") != len(rows) or "dataset" not in summary:
        raise DataError(f"{summary_path} does not describe the {len(rows)} rows of {path.name}")
    return PerImage(bpd=columns.pop("bpd"), terms=columns, summary=summary, source=str(path))


def check_pairable(a: PerImage, b: PerImage) -> None:
    """Refuse results that are not the same images under the same estimator, settings and seed."""
    sa, sb = a.summary, b.summary
    da, db = sa.get("dataset", {}), sb.get("dataset", {})
    if da.get("sha256") != db.get("sha256") or da.get("count") != db.get("count"):
        raise DataError(f"not the same images: {a.source} has {da.get('count')} images of "
                        f"{da.get('name')}/{da.get('split')} (sha256 {str(da.get('sha256'))[:12]}…), {b.source} "
                        f"{db.get('count')} of {db.get('name')}/{db.get('split')} (sha256 {str(db.get('sha256'))[:12]}…)")
    if sa.get("estimator") != sb.get("estimator"):
        raise ConfigError(f"different estimators: {sa.get('estimator')} and {sb.get('estimator')}")
    set_a, set_b = dict(sa.get("settings", {})), dict(sb.get("settings", {}))
    if set_a.get("seed") != set_b.get("seed"):
        raise ConfigError(f"evaluated with different seeds ({set_a.get('seed')} and {set_b.get('seed')}): the draws "
                          "are not common; evaluate both with the same --seed")
    if sa.get("estimator") == "elbo" and "draws" not in set_a | set_b:
        raise ConfigError("these results predate per-image draws (their noise depends on the batch): evaluate again")
    differ = sorted(k for k in set(set_a) | set(set_b) if set_a.get(k) != set_b.get(k))
    if differ:
        k = differ[0]
        raise ConfigError(f"the evaluations differ in {k} ({set_a.get(k)} and {set_b.get(k)}): not paired")


# --- the command ------------------------------------------------------------------------------------------

def _evaluate(path: str, args) -> PerImage:
    """Evaluate a checkpoint's ELBO on the chosen images, per image, with the shared seed."""
    from mulan import progress
    from mulan.data import load_split
    from mulan.report import measure_elbo

    run = load_with_overrides(path, args.overrides, (("--time-points", "eval.time_points", args.time_points),
                                                     ("--timesteps", "model.timesteps", args.timesteps)),
                              weights="raw" if args.raw else "ema")
    data = load_split(run.config.data, args.split)
    total = min(args.limit or len(data), len(data))
    with progress.bar(f"ELBO of {Path(path).name}", "images", progress.wanted(args.no_progress), total=total) as cb:
        summary, columns = measure_elbo(run.model, data, time_points=run.config.eval.time_points,
                                        batch_size=run.config.eval.batch_size, seed=args.seed, limit=args.limit or 0,
                                        callback=cb, checkpoint=str(run.path), step=run.step, weights=run.weights)
    columns = {k: v.double() for k, v in columns.items()}
    return PerImage(bpd=columns.pop("bpd"), terms=columns, summary=asdict(summary), source=str(run.path))


def _is_file_result(path: str) -> bool:
    return path.endswith(".csv")


def _is_override(item: str) -> bool:
    key, sep, _ = item.partition("=")
    return bool(sep) and "." in key and "/" not in key and not Path(item).exists()


def _sides(args) -> tuple[list[str], list[str]]:
    """(A runs, B runs): ``A B``, or ``A1 .. Ak --vs B1 .. Bk`` (run i of A paired with run i of B). KEY=VALUE
    overrides may follow either list (argparse hands them to the list before them)."""
    for side in ("a", "vs"):
        items = getattr(args, side)
        if items is not None:
            args.overrides = [*args.overrides, *(i for i in items if _is_override(i))]
            setattr(args, side, [i for i in items if not _is_override(i)])
    if args.vs is None:
        if len(args.a) != 2:
            raise ConfigError(f"give A and B, or several runs per side as A1 .. Ak --vs B1 .. Bk (got "
                              f"{len(args.a)} without --vs)")
        return [args.a[0]], [args.a[1]]
    if len(args.a) != len(args.vs):
        raise ConfigError(f"{len(args.a)} run(s) of A against {len(args.vs)} of B: run i of A is paired with run i of "
                          "B (the same training seed), so give as many of each")
    return list(args.a), list(args.vs)


def cmd_compare(args) -> None:
    from mulan.checkpoint import atomic_write, refuse_existing

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be >= 1 (the number of images; without --limit: the whole split)")
    side_a, side_b = _sides(args)
    paths = side_a + side_b
    if len({_is_file_result(p) for p in paths}) > 1:
        raise ConfigError("compare checkpoints, or per-image CSV files of `mulan eval`, not a mix of both")
    if _is_file_result(paths[0]) and (args.limit or args.time_points or args.timesteps is not None or args.overrides):
        raise ConfigError("--limit, --time-points, --timesteps and overrides evaluate checkpoints; result files "
                          "hold what `mulan eval` measured")
    out = Path(args.out) if args.out else None
    if out is not None:
        refuse_existing([out], args.overwrite)  # before any work
    results = [read_per_image(p) if _is_file_result(p) else _evaluate(p, args) for p in paths]
    for r in results[1:]:
        check_pairable(results[0], r)
    a_runs, b_runs = results[:len(side_a)], results[len(side_a):]
    a, b = a_runs[0], b_runs[0]
    ds, sa = a.summary["dataset"], a.summary
    if len(a_runs) == 1:
        diff = paired_difference(a, b)
        print("\n".join(diff.lines()))
        images = diff.images
    else:
        diff = seed_level_difference(list(zip(a_runs, b_runs)))
        print("\n".join(diff.lines()))
        images = diff.runs[0].images
    whole = "subset of" if sa.get("subset") else "whole"
    print(f"  data      : {ds.get('name')} {images} images ({whole} {sa.get('split')} split), "
          f"sha256 {str(ds.get('sha256'))[:16]}…")
    print(f"  estimator : {sa.get('estimator')} {json.dumps(sa.get('settings', {}), sort_keys=True)}")
    print(f"  latent KL : {sa.get('latent_kl')} (A), {b.summary.get('latent_kl')} (B)")
    for name, runs in (("A", a_runs), ("B", b_runs)):
        for i, r in enumerate(runs):
            w = r.summary.get("weights")
            label = name if len(runs) == 1 else f"{name}{i + 1}"
            print(f"  {label:<9} : {r.source}" + (f" ({w} weights, step {r.summary.get('step')})" if w else ""))
    if out is not None:
        record = {"a": [r.source for r in a_runs] if len(a_runs) > 1 else a.source,
                  "b": [r.source for r in b_runs] if len(b_runs) > 1 else b.source,
                  **asdict(diff), "dataset": ds, "estimator": sa.get("estimator"), "settings": sa.get("settings")}
        atomic_write(out, lambda f: f.write(json.dumps(record, indent=2, default=_finite).encode()))
        print(f"wrote {out}")


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def register(sub) -> None:
    """Add the ``compare`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("compare", help="paired difference of two models' bounds on the same images (A - B), or of "
                                       "two recipes over several training seeds",
                       description="A - B in bits/dim with a paired 95% CI, per term too. A and B: two checkpoints "
                                   "or run folders (evaluated here with common random numbers: the same per-image "
                                   "times and noise) or two per-image CSV files of `mulan eval` made with the same "
                                   "--seed (their .json summaries beside them). With several runs per side "
                                   "(A1 .. Ak --vs B1 .. Bk, run i of each trained with the same seed), each pair "
                                   "gets its paired interval over images and the recipes a t-interval over the k "
                                   "pairs' mean differences, which includes the spread between training seeds.")
    p.add_argument("a", metavar="A", nargs="+", help="checkpoint, run folder or exported .safetensors, or a "
                                                      "per-image CSV; then B (or, with --vs, more runs of A)")
    p.add_argument("--vs", metavar="B", nargs="+", default=None,
                   help="the runs of B, as many as of A, in the same seed order")
    p.add_argument("--split", choices=["test", "train", "val"], default="test", help="test, train, or val (the validation images carved by data.val_size)")
    p.add_argument("--limit", type=int, default=None, help="only the first N >= 1 images (default: the whole split)")
    p.add_argument("--time-points", type=int, default=None, help="ELBO: stratified times per image (sets "
                                                                  "eval.time_points)")
    p.add_argument("--timesteps", type=int, default=None, help="the discrete-time bound with T steps, 0 for "
                                                                "continuous time (sets model.timesteps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image draws, shared by A and B")
    p.add_argument("--out", help="also write the comparison as JSON to this file")
    add_load_options(p, "an --out file")
    p.set_defaults(func=cmd_compare)
