"""Learning curves of MuLAN configurations against learned VDM, compared image by image.

Every configuration is trained with the same denoiser, steps, batch, learning rate and seeds; a checkpoint is
kept every ``--every`` steps. Each checkpoint's EMA weights are evaluated on the same fixed test images with
the negative ELBO (S stratified times per image, strict latent KL charged) and per-image draws seeded by
(eval seed, image index): common random numbers, so the per-image difference to the reference configuration
(learned VDM, same training seed) has a paired 95% interval that resolves a few thousandths of a bit.

Runs are resumable: a run that stopped (or a session that ended) continues from its last checkpoint, finished
runs and evaluations are reused, so a long benchmark can be spread over several sessions.

    # digits, whole test split, 2 seeds, 2 runs side by side on one thread each
    python benchmarks/mulan_vs_vdm.py --data digits --seeds 0 1 --jobs 2
    # Fashion-MNIST (apt-get install dataset-fashion-mnist), first 1000 test images
    python benchmarks/mulan_vs_vdm.py --data fashion --seeds 0 --steps 3000 --images 1000 --jobs 2
    # any set of configurations: NAME=PRESET[:KEY=VALUE,KEY=VALUE]
    python benchmarks/mulan_vs_vdm.py --data digits --configs vdm=digits-vdm \\
        ends=digits-mulan:model.schedule.learn_ends=scalar --seeds 0

Writes into ``--results`` (committed): ``curves.csv`` (every config, seed and step: bound, CI, terms, paired
difference to the reference), ``final.csv`` (paired differences at the last step, seeds pooled), ``curves.png``,
``summary.json`` (command, settings, wall times) and ``README.md`` (the tables). Checkpoints and per-image files
go to ``--work`` (not committed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from mulan.compare import PerImage, paired_difference
from mulan.config import apply_overrides
from mulan.presets import get_preset, latent_cost_bpd

# The configurations compared by default, per data set: the reference first.
DEFAULTS = {
    "digits": {"vdm": "digits-vdm", "mulan": "digits-mulan", "mulan-ends-map": "digits-mulan-ends-map"},
    "fashion": {"vdm": "fashion-vdm", "mulan": "fashion-mulan", "mulan-ends-map": "fashion-mulan-ends-map",
                "mulan-ends-map-latent": "fashion-mulan-ends-map-latent"},
}


@dataclass
class Spec:
    name: str
    preset: str
    overrides: list[str]


def parse_config(text: str) -> Spec:
    name, _, rest = text.partition("=")
    preset, _, over = rest.partition(":")
    if not name or not preset:
        raise SystemExit(f"--configs entries are NAME=PRESET[:KEY=VALUE,...], got {text!r}")
    return Spec(name, preset, [o for o in over.split(",") if o])


def run_config(spec: Spec, args, seed: int) -> object:
    overrides = [*spec.overrides, f"train.steps={args.steps}", f"train.seed={seed}", "train.threads=1",
                 f"train.checkpoint_every={args.every}", "train.keep_checkpoints=100000", "train.eval_every=0",
                 "train.log_every=50"]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    return apply_overrides(get_preset(spec.preset), overrides)


def run_dir(args, spec: Spec, seed: int) -> Path:
    return Path(args.work) / f"{args.data}-{spec.name}-s{seed}"


def train_job(spec: Spec, args, seed: int) -> dict:
    """Train (or resume, or skip) one run; returns its wall time and step count."""
    torch.set_num_threads(1)
    from mulan.checkpoint import load_checkpoint
    from mulan.train import train

    cfg = run_config(spec, args, seed)
    out = run_dir(args, spec, seed)
    last = out / "checkpoints" / "last.pt"
    done = load_checkpoint(last)["step"] if last.is_file() else 0
    if done >= args.steps:
        return {"run": out.name, "trained_steps": 0, "wall_s": 0.0}
    t0 = time.perf_counter()
    train(cfg, out, resume=last.is_file())
    return {"run": out.name, "trained_steps": args.steps - done, "wall_s": time.perf_counter() - t0}


def eval_job(spec: Spec, args, seed: int, step: int) -> dict:
    """Per-image ELBO of one checkpoint on the fixed test images (cached as a CSV in the run folder)."""
    torch.set_num_threads(1)
    from mulan.checkpoint import load_checkpoint, load_weights
    from mulan.data import load_split
    from mulan.report import measure_elbo, write_per_image
    from mulan.train import build_model

    out = run_dir(args, spec, seed)
    cache = per_image_path(args, spec, seed, step)
    if cache.is_file() and cache.with_suffix(".json").is_file():  # named as asked (a run folder may be a link)
        return {**json.loads(cache.with_suffix(".json").read_text()), "config": spec.name, "seed": seed, "step": step}
    state = load_checkpoint(out / "checkpoints" / f"step-{step:08d}.pt")
    cfg = state["config"]
    model = build_model(cfg)
    load_weights(model, state["ema"], out, "EMA")
    data = load_split(cfg.data, args.split)
    t0 = time.perf_counter()
    summary, columns = measure_elbo(model.eval(), data, time_points=args.time_points, batch_size=256,
                                    seed=args.eval_seed, limit=args.images)
    write_per_image(cache, columns)
    record = {"config": spec.name, "seed": seed, "step": step, "bpd": summary.bpd, "ci95": summary.ci95,
              **{f"{k}_bpd": v for k, v in summary.terms_bpd.items()}, "images": summary.images,
              "subset": summary.subset, "sha256": summary.dataset["sha256"], "eval_wall_s": time.perf_counter() - t0}
    cache.with_suffix(".json").write_text(json.dumps(record))
    return record


def per_image_path(args, spec: Spec, seed: int, step: int) -> Path:
    """The per-image CSV of one checkpoint's evaluation (its .json summary beside it)."""
    return (run_dir(args, spec, seed) /
            f"elbo-{args.split}-step{step:08d}-S{args.time_points}-n{args.images}-seed{args.eval_seed}.csv")


def per_image(args, spec: Spec, seed: int, step: int) -> PerImage:
    path = per_image_path(args, spec, seed, step)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cols = {k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64) for k in rows[0] if k != "index"}
    return PerImage(bpd=cols.pop("bpd"), terms=cols, summary={}, source=str(path))


def train_seconds(out: Path, batch: int) -> float:
    """Training time of a run from its log (images/s over each logged interval; resumed runs included)."""
    total, prev = 0.0, 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train" and r.get("images_per_s"):
            step = int(r["step"])
            if step > prev:
                total += (step - prev) * batch / r["images_per_s"]
                prev = step
    return total


def pooled(items: list[PerImage]) -> PerImage:
    """The per-image mean over seeds (a paired comparison of seed-averaged models, images as the unit)."""
    return PerImage(bpd=torch.stack([p.bpd for p in items]).mean(0),
                    terms={k: torch.stack([p.terms[k] for p in items]).mean(0) for k in items[0].terms},
                    summary={}, source="pooled")


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which a curve (step, bpd) reaches ``target``, linearly interpolated; None if never."""
    prev = None
    for step, bpd in curve:
        if bpd <= target:
            if prev is None:
                return float(step)
            (s0, b0) = prev
            return s0 + (step - s0) * (b0 - target) / (b0 - bpd)
        prev = (step, bpd)
    return None


def plot(rows: list[dict], specs: list[Spec], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ref = specs[0].name
    for i, spec in enumerate(specs):
        colour = f"C{i}"  # one colour per configuration in both panels
        mine = [r for r in rows if r["config"] == spec.name]
        steps = sorted({r["step"] for r in mine})
        mean = [sum(r["bpd"] for r in mine if r["step"] == s) / len([r for r in mine if r["step"] == s]) for s in steps]
        ax.plot(steps, mean, "o-", color=colour, label=spec.name)
        if spec.name != ref:
            pts = [(r["step"], r["diff_pooled"], r["diff_pooled_ci95"]) for r in mine if "diff_pooled" in r and r["seed"] == mine[0]["seed"]]
            if pts:
                s_, d_, h_ = zip(*pts)
                bx.errorbar(s_, d_, yerr=h_, fmt="o-", color=colour, capsize=3, label=f"{spec.name} - {ref}")
    ax.set_xlabel("training step"), ax.set_ylabel("held-out negative ELBO (bits/dim)")
    ax.set_title("bound against step (mean over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    bx.axhline(0.0, color="k", lw=0.8)
    bx.set_xlabel("training step"), bx.set_ylabel(f"paired difference to {ref} (bits/dim)")
    bx.set_title("paired difference, seeds pooled, 95% CI over images", fontsize=9)
    bx.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(DEFAULTS), default="digits")
    p.add_argument("--configs", nargs="*", help="NAME=PRESET[:KEY=VALUE,...] (first: the reference); default "
                   "learned VDM, the paper's MuLAN and the best configuration")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--every", type=int, default=500, help="a checkpoint (and a point of the curves) every N steps")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the presets')")
    p.add_argument("--images", type=int, default=0, help="evaluate the first N test images (0: the whole split)")
    p.add_argument("--time-points", type=int, default=128, help="S stratified times per test image")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the per-image draws (shared by every model)")
    p.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each")
    p.add_argument("--work", default="runs/bench-mulan-vs-vdm", help="checkpoints and per-image files")
    p.add_argument("--results", default="", help="tables and plot (default benchmarks/results/mulan_vs_vdm/DATA)")
    p.add_argument("--split", choices=["val", "test"], default="val", help="the images evaluated: val to choose, "
                   "test once for the final table")
    p.add_argument("--no-train", action="store_true", help="only evaluate and tabulate what is there")
    p.add_argument("--train-only", action="store_true", help="train (or resume) the runs, evaluate nothing")
    p.add_argument("--eval-steps", type=int, nargs="*", default=None,
                   help="evaluate (and tabulate) only these checkpoints' steps (default: every --every steps)")
    args = p.parse_args()
    specs = [parse_config(c) for c in args.configs] if args.configs else \
        [Spec(n, pr, []) for n, pr in DEFAULTS[args.data].items()]
    results = Path(args.results or f"benchmarks/results/mulan_vs_vdm/{args.data}")
    results.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ctx = get_context("spawn")
    jobs = [(s, seed) for seed in args.seeds for s in specs]
    train_log = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        if not args.no_train:
            for rec in pool.map(train_job, [j[0] for j in jobs], [args] * len(jobs), [j[1] for j in jobs]):
                print(f"trained {rec['run']}: {rec['trained_steps']} steps in {rec['wall_s']:.0f} s", flush=True)
                train_log.append(rec)
        if args.train_only:
            return
        at = args.eval_steps or range(args.every, args.steps + 1, args.every)
        points = [(s, seed, step) for s, seed in jobs for step in at
                  if (run_dir(args, s, seed) / "checkpoints" / f"step-{step:08d}.pt").is_file()]
        rows = list(pool.map(eval_job, [q[0] for q in points], [args] * len(points), [q[1] for q in points],
                             [q[2] for q in points]))
    ref = specs[0]
    by_key = {(r["config"], r["seed"], r["step"]): r for r in rows}
    steps = sorted({r["step"] for r in rows})
    for r in rows:  # paired difference to the reference with the same training seed, and seeds pooled
        if r["config"] == ref.name or (ref.name, r["seed"], r["step"]) not in by_key:
            continue
        spec = next(s for s in specs if s.name == r["config"])
        d = paired_difference(per_image(args, spec, r["seed"], r["step"]), per_image(args, ref, r["seed"], r["step"]))
        r.update(diff=d.mean, diff_ci95=d.ci95, a_lower=d.a_lower)
        seeds = [s for s in args.seeds if (spec.name, s, r["step"]) in by_key and (ref.name, s, r["step"]) in by_key]
        dp = paired_difference(pooled([per_image(args, spec, s, r["step"]) for s in seeds]),
                               pooled([per_image(args, ref, s, r["step"]) for s in seeds]))
        r.update(diff_pooled=dp.mean, diff_pooled_ci95=dp.ci95, pooled_seeds=len(seeds),
                 diff_terms={k: v[0] for k, v in dp.terms.items()})
    rows.sort(key=lambda r: ([s.name for s in specs].index(r["config"]), r["seed"], r["step"]))
    fields = ["config", "seed", "step", "bpd", "ci95", "recon_bpd", "prior_bpd", "diffusion_bpd", "latent_bpd",
              "diff", "diff_ci95", "a_lower", "diff_pooled", "diff_pooled_ci95", "pooled_seeds", "images", "eval_wall_s"]
    with open(results / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})

    # Final step: seeds pooled, paired to the reference; and steps needed to reach the reference's final bound.
    last = steps[-1] if steps else 0
    ref_final = [by_key[(ref.name, s, last)]["bpd"] for s in args.seeds if (ref.name, s, last) in by_key]
    target = sum(ref_final) / len(ref_final) if ref_final else math.nan
    lines = []
    lines.append(f"| config | preset and overrides | bits/dim at step {last} (mean over seeds) | - {ref.name}, paired, seeds pooled (95% CI) | lower on | latent (strict) | steps to reach {ref.name}'s final {target:.4f} |")
    lines.append("|---|---|---|---|---|---|---|")
    final_rows = []
    for spec in specs:
        mine = [by_key[(spec.name, s, last)] for s in args.seeds if (spec.name, s, last) in by_key]
        if not mine:
            continue
        mean = sum(r["bpd"] for r in mine) / len(mine)
        # mean over the seeds with this step evaluated; steps without any are left out of the curve
        have = {st: [by_key[(spec.name, s, st)]["bpd"] for s in args.seeds if (spec.name, s, st) in by_key]
                for st in steps}
        curve = [(st, sum(v) / len(v)) for st, v in have.items() if v]
        reach = steps_to_reach(curve, target)
        first = mine[0]
        diff = (f"{first['diff_pooled']:+.4f} ± {first['diff_pooled_ci95']:.4f}" if "diff_pooled" in first else "reference")
        lower = f"{100 * first['a_lower']:.0f}% (seed {first['seed']})" if "a_lower" in first else ""
        cfg = run_config(spec, args, args.seeds[0])
        desc = spec.preset + (" " + " ".join(spec.overrides) if spec.overrides else "")
        lines.append(f"| {spec.name} | `{desc}` | {mean:.4f} | {diff} | {lower} | {latent_cost_bpd(cfg):.4f} | "
                     f"{'not reached' if reach is None else (f'<= {reach:.0f}' if curve and curve[0][1] <= target else f'{reach:.0f}')} |")
        final_rows.append({"config": spec.name, "preset": desc, "bpd": mean, "diff_pooled": first.get("diff_pooled"),
                           "diff_pooled_ci95": first.get("diff_pooled_ci95"), "steps_to_reference_final": reach,
                           "diff_terms": first.get("diff_terms")})
    per_step = ["", f"| step | " + " | ".join(f"{s.name} - {ref.name}" for s in specs[1:]) + " |",
                "|---|" + "---|" * (len(specs) - 1)]
    for st in steps:
        cells = []
        for spec in specs[1:]:
            r = by_key.get((spec.name, args.seeds[0], st))
            cells.append(f"{r['diff_pooled']:+.4f} ± {r['diff_pooled_ci95']:.4f}" if r and "diff_pooled" in r else "")
        per_step.append(f"| {st} | " + " | ".join(cells) + " |")
    wall = time.perf_counter() - t_start
    train_s = {}
    for spec, seed in jobs:
        log = run_dir(args, spec, seed) / "metrics.jsonl"
        if log.is_file():
            train_s[f"{spec.name}-s{seed}"] = train_seconds(log.parent, run_config(spec, args, seed).train.batch_size)
    data_desc = rows[0]["images"] if rows else 0
    header = [f"# {args.data}: MuLAN configurations against {ref.name}", "",
              f"Command: `python {' '.join(sys.argv)}`", "",
              f"{args.steps} steps, checkpoints every {args.every}, training seeds {args.seeds}, one thread per "
              f"process, {args.jobs} processes side by side; held-out negative ELBO of the EMA weights on "
              f"{data_desc} test images ({'whole split' if rows and not rows[0]['subset'] else 'the first ones'}), "
              f"S = {args.time_points} stratified times per image, per-image draws from eval seed {args.eval_seed} "
              f"(common random numbers), strict latent KL charged. Paired differences: per image, averaged over "
              f"seeds, 95% Student-t interval over images. Training time per run (from its log): "
              f"{min(train_s.values(), default=0) / 60:.0f}-{max(train_s.values(), default=0) / 60:.0f} min; wall "
              f"time of this invocation: {wall / 60:.1f} min ({platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}).", ""]
    (results / "README.md").write_text("\n".join(header + lines + per_step) + "\n")
    (results / "final.json").write_text(json.dumps(final_rows, indent=2))
    (results / "summary.json").write_text(json.dumps({
        "command": sys.argv, "steps": args.steps, "every": args.every, "seeds": args.seeds, "images": data_desc,
        "time_points": args.time_points, "eval_seed": args.eval_seed, "jobs": args.jobs, "threads_per_job": 1,
        "configs": [s.__dict__ for s in specs], "train": train_log, "train_s_from_logs": train_s, "wall_s": wall}, indent=2))
    if rows:
        plot(rows, specs, results / "curves.png", f"{args.data}: negative ELBO against training step")
    print("\n".join(header + lines + per_step))


if __name__ == "__main__":
    main()
