"""Learning curves of configurations against a reference, compared image by image and over training seeds.

Every configuration is trained with the same denoiser, steps, batch, learning rate and seeds; a checkpoint is
kept every ``--every`` steps. Each checkpoint's EMA weights are evaluated on the same fixed images of ``--split``
(``val``, carved from the training images by the presets' ``data.val_size``, to choose; ``test`` once per final
configuration) with the negative ELBO (S stratified times per image, strict latent KL charged) and per-image
draws seeded by (eval seed, image index): common random numbers, so each seed's per-image difference to the
reference (same training seed) has a paired 95% interval over images. A configuration's difference is the mean
over seeds of those, with a Student-t interval over the seeds: the statement about a recipe, not two networks.

Runs are resumable: a run that stopped (or a session that ended) continues from its last checkpoint, finished
runs and evaluations are reused, so a long benchmark can be spread over several sessions; ``--train-only``
trains, ``--no-train`` evaluates and tabulates what is there.

    # digits, validation split, 3 seeds, 2 runs side by side on one thread each
    python benchmarks/mulan_vs_vdm.py --data digits --seeds 0 1 2 --jobs 2
    # ... the chosen configurations, once, on the test split
    python benchmarks/mulan_vs_vdm.py --data digits --seeds 0 1 2 --split test --eval-steps 2500 --no-train
    # Fashion-MNIST (apt-get install dataset-fashion-mnist), first 1000 validation images
    python benchmarks/mulan_vs_vdm.py --data fashion --seeds 0 --steps 3000 --images 1000 --time-points 16
    # any set of configurations: NAME=PRESET[:KEY=VALUE,KEY=VALUE]
    python benchmarks/mulan_vs_vdm.py --data digits --configs vdm=digits-vdm \\
        ends=digits-mulan:model.schedule.learn_ends=scalar --seeds 0

Writes into ``--results`` (committed): ``curves.csv`` (every config, seed and step: bound, CI, terms, each seed's
paired difference to the reference and the seed-level one, the schedule's trained ends, Var_z gamma),
``final.json`` (the last step), ``curves.png``, ``summary.json`` (command, settings, wall times), ``README.md``
(the tables) and ``per_image/`` (each evaluation's per-image CSV and JSON summary, as `mulan eval` writes them:
`mulan compare` reads them, and a later session pools them). Checkpoints go to ``--work`` (not committed).
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

from mulan.compare import PerImage, SeedLevelDifference, read_per_image, seed_level_difference
from mulan.config import apply_overrides, to_dict
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


# The train settings the benchmark sets on every run (so not part of what a configuration is).
BENCH_TRAIN_KEYS = ("steps", "seed", "threads", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every")


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
    """Per-image ELBO of one checkpoint's EMA weights on the fixed images of ``--split``: a CSV and the JSON summary
    that `mulan eval` writes (so `mulan compare` reads them), cached in the run folder and copied into the results
    folder's ``per_image/``. A model with a latent also gets the schedule's pixel-mean Var_z gamma(z, t) over the
    first 200 of those images (max over t), stored in the summary's ``extra``."""
    torch.set_num_threads(1)
    from mulan.checkpoint import load_checkpoint, load_weights
    from mulan.data import load_split
    from mulan.report import measure_elbo, write_per_image, write_summary
    from mulan.diffusion import build_model

    out = run_dir(args, spec, seed)
    cache = per_image_path(args, spec, seed, step)
    if not (cache.is_file() and cache.with_suffix(".json").is_file()):  # named as asked (a run may be a link)
        ckpt = out / "checkpoints" / f"step-{step:08d}.pt"
        state = load_checkpoint(ckpt)
        cfg = state["config"]
        model = build_model(cfg)
        load_weights(model, state["ema"], out, "EMA")
        data = load_split(cfg.data, args.split)
        t0 = time.perf_counter()
        summary, columns = measure_elbo(model.eval(), data, time_points=args.time_points, batch_size=256,
                                        seed=args.eval_seed, limit=args.images, checkpoint=str(ckpt), step=step,
                                        weights="ema")
        summary.extra = {"config": spec.name, "seed": seed, "eval_wall_s": time.perf_counter() - t0,
                         "resolved": to_dict(cfg)}  # the configuration as the checkpoint recorded it
        first = data.images[:min(200, summary.images)]
        with torch.no_grad():  # the schedule's ends as trained: pixel-mean gamma(z(x), 0) and gamma(z(x), 1)
            bound = model.condition(first).bound
            for name, t in (("gamma0", 0.0), ("gamma1", 1.0)):
                summary.extra[name] = float(bound(torch.full((len(first),), t)).gamma.mean())
        if cfg.model.latent.kind != "none":
            from mulan.plots import variance_across_z

            _, var = variance_across_z(model, first)
            summary.extra["var_z_gamma_max"] = float(var.max())
        write_per_image(cache, columns)
        write_summary(cache.with_suffix(".json"), summary)
    keep = Path(args.results_dir) / "per_image" / f"{spec.name}-s{seed}-step{step}-{args.split}.csv"
    keep.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((cache, keep), (cache.with_suffix(".json"), keep.with_suffix(".json"))):
        dst.write_bytes(src.read_bytes())
    summary = json.loads(cache.with_suffix(".json").read_text())
    return {"config": spec.name, "seed": seed, "step": step, "bpd": summary["bpd"], "ci95": summary["ci95"],
            **{f"{k}_bpd": v for k, v in summary["terms_bpd"].items()}, "images": summary["images"],
            "subset": summary["subset"], "split": summary["split"], "sha256": summary["dataset"]["sha256"],
            "eval_wall_s": summary["extra"].get("eval_wall_s"), "gamma0": summary["extra"].get("gamma0"),
            "gamma1": summary["extra"].get("gamma1"),
            "var_z_gamma_max": summary["extra"].get("var_z_gamma_max")}


def per_image_path(args, spec: Spec, seed: int, step: int) -> Path:
    """The per-image CSV of one checkpoint's evaluation (its .json summary beside it)."""
    return (run_dir(args, spec, seed) /
            f"elbo-{args.split}-step{step:08d}-S{args.time_points}-n{args.images}-seed{args.eval_seed}.csv")


def per_image(args, spec: Spec, seed: int, step: int) -> PerImage:
    return read_per_image(per_image_path(args, spec, seed, step))


def train_seconds(out: Path, batch: int, up_to: int | None = None) -> float:
    """Training time of a run from its log (images/s over each logged interval; resumed runs included), counted
    up to step ``up_to`` when given, so a table of step 1000 does not quote a run later trained further."""
    total, prev = 0.0, 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train" and r.get("images_per_s"):
            step = int(r["step"])
            if up_to is not None and step > up_to:
                break
            if step > prev:
                total += (step - prev) * batch / r["images_per_s"]
                prev = step
    return total


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


def plot(rows: list[dict], specs: list[Spec], ref: Spec, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, spec in enumerate(specs):
        colour = f"C{i}"  # one colour per configuration in both panels
        mine = [r for r in rows if r["config"] == spec.name]
        steps = sorted({r["step"] for r in mine})
        mean = [sum(r["bpd"] for r in mine if r["step"] == s) / len([r for r in mine if r["step"] == s]) for s in steps]
        ax.plot(steps, mean, "o-", color=colour, label=spec.name)
        if spec.name != ref.name:
            pts = sorted({(r["step"], r["diff_seeds"], r["diff_seeds_ci95"], r["diff_seeds_k"])
                          for r in mine if "diff_seeds" in r})
            if pts:
                s_, d_, h_, _ = zip(*pts)
                h_ = [h if math.isfinite(h) else 0.0 for h in h_]
                bx.errorbar(s_, d_, yerr=h_, fmt="o-", color=colour, capsize=3, label=f"{spec.name} - {ref.name}")
    ax.set_xlabel("training step"), ax.set_ylabel("negative ELBO (bits/dim)")
    ax.set_title("bound against step (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    bx.axhline(0.0, color="k", lw=0.8)
    bx.set_xlabel("training step"), bx.set_ylabel(f"paired difference to {ref.name} (bits/dim)")
    bx.set_title("mean over seeds of the per-seed paired difference,\n95% t-interval over seeds (no bar: one seed)",
                 fontsize=9)
    bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(DEFAULTS), default="digits")
    p.add_argument("--configs", nargs="*", help="NAME=PRESET[:KEY=VALUE,...]; default learned VDM, the paper's MuLAN "
                   "and the best configuration")
    p.add_argument("--reference", default="", help="the configuration every other is paired with (default: the first)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--every", type=int, default=500, help="a checkpoint (and a point of the curves) every N steps")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the presets')")
    p.add_argument("--images", type=int, default=0, help="evaluate the first N images of the split (0: all)")
    p.add_argument("--time-points", type=int, default=128, help="S stratified times per image")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the per-image draws (shared by every model)")
    p.add_argument("--split", choices=["val", "test"], default="val", help="the images evaluated: val to choose, "
                   "test once for the final table")
    p.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each")
    p.add_argument("--work", default="runs/bench-mulan-vs-vdm", help="checkpoints and per-image files")
    p.add_argument("--results", default="", help="tables, plot and per-image files (default "
                   "benchmarks/results/mulan_vs_vdm/DATA-SPLIT)")
    p.add_argument("--no-train", action="store_true", help="only evaluate and tabulate what is there")
    p.add_argument("--train-only", action="store_true", help="train (or resume) the runs, evaluate nothing")
    p.add_argument("--eval-steps", type=int, nargs="*", default=None,
                   help="evaluate (and tabulate) only these checkpoints' steps (default: every --every steps)")
    args = p.parse_args()
    specs = [parse_config(c) for c in args.configs] if args.configs else \
        [Spec(n, pr, []) for n, pr in DEFAULTS[args.data].items()]
    ref = next((s for s in specs if s.name == args.reference), None) if args.reference else specs[0]
    if ref is None:
        raise SystemExit(f"--reference {args.reference!r} is not one of the --configs names")
    results = Path(args.results or f"benchmarks/results/mulan_vs_vdm/{args.data}-{args.split}")
    results.mkdir(parents=True, exist_ok=True)
    args.results_dir = str(results)
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
    tabulate(args, specs, ref, rows, results, train_log, time.perf_counter() - t_start)


def tabulate(args, specs: list[Spec], ref: Spec, rows: list[dict], results: Path, train_log: list[dict],
             wall: float) -> None:
    """Per-seed paired differences to the reference, their seed-level interval, curves, tables and summary."""
    by_key = {(r["config"], r["seed"], r["step"]): r for r in rows}
    steps = sorted({r["step"] for r in rows})
    seeded: dict[tuple[str, int], SeedLevelDifference] = {}
    for spec in specs:
        for step in steps:
            seeds = [s for s in args.seeds if (spec.name, s, step) in by_key and (ref.name, s, step) in by_key]
            if spec.name == ref.name or not seeds:
                continue
            d = seed_level_difference([(per_image(args, spec, s, step), per_image(args, ref, s, step)) for s in seeds])
            seeded[(spec.name, step)] = d
            for s, run in zip(seeds, d.runs):
                by_key[(spec.name, s, step)].update(diff=run.mean, diff_ci95=run.ci95, a_lower=run.a_lower,
                                                    diff_seeds=d.mean, diff_seeds_ci95=d.ci95, diff_seeds_k=len(seeds))
    names = [s.name for s in specs]
    rows.sort(key=lambda r: (names.index(r["config"]), r["seed"], r["step"]))
    fields = ["config", "seed", "step", "split", "bpd", "ci95", "recon_bpd", "prior_bpd", "diffusion_bpd",
              "latent_bpd", "diff", "diff_ci95", "a_lower", "diff_seeds", "diff_seeds_ci95", "diff_seeds_k", "images",
              "var_z_gamma_max", "gamma0", "gamma1", "eval_wall_s"]
    with open(results / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})

    last = steps[-1] if steps else 0
    ref_final = [by_key[(ref.name, s, last)]["bpd"] for s in args.seeds if (ref.name, s, last) in by_key]
    target = sum(ref_final) / len(ref_final) if ref_final else math.nan
    lines = [f"| config | preset and overrides | bits/dim at step {last} (mean over seeds) | each seed − {ref.name} "
             f"(paired, 95% CI over images) | − {ref.name}: mean over seeds, 95% t-interval over seeds | % | "
             f"latent (strict) | max Var_z γ | steps to reach {ref.name}'s final {target:.4f} |",
             "|---|---|---|---|---|---|---|---|---|"]
    final_rows = []
    for spec in specs:
        mine = [by_key[(spec.name, s, last)] for s in args.seeds if (spec.name, s, last) in by_key]
        if not mine:
            continue
        mean = sum(r["bpd"] for r in mine) / len(mine)
        have = {st: [by_key[(spec.name, s, st)]["bpd"] for s in args.seeds if (spec.name, s, st) in by_key]
                for st in steps}
        curve = [(st, sum(v) / len(v)) for st, v in have.items() if v]
        reach = steps_to_reach(curve, target)
        d = seeded.get((spec.name, last))
        per_seed = "; ".join(f"s{r['seed']}: {r['diff']:+.4f} ± {r['diff_ci95']:.4f}" for r in mine if "diff" in r)
        if d is None:
            level, pct = "reference", ""
        elif len(d.runs) == 1:
            level, pct = f"{d.mean:+.4f} (one seed: no interval)", f"{100 * d.mean / target:+.2f}%"
        else:
            level = f"**{d.mean:+.4f} ± {d.ci95:.4f}** ({'excludes' if d.excludes_zero else 'includes'} 0)"
            pct = f"{100 * d.mean / target:+.2f}%"
        var = [r["var_z_gamma_max"] for r in mine if r.get("var_z_gamma_max") is not None]
        cfg = run_config(spec, args, args.seeds[0])
        desc = spec.preset + (" " + " ".join(spec.overrides) if spec.overrides else "")
        reach_text = ("not reached" if reach is None else
                      (f"<= {reach:.0f}" if curve and curve[0][1] <= target else f"{reach:.0f}"))
        lines.append(f"| {spec.name} | `{desc}` | {mean:.4f} | {per_seed} | {level} | {pct} | "
                     f"{latent_cost_bpd(cfg):.4f} | {max(var):.2e} | {reach_text} |" if var else
                     f"| {spec.name} | `{desc}` | {mean:.4f} | {per_seed} | {level} | {pct} | "
                     f"{latent_cost_bpd(cfg):.4f} | | {reach_text} |")
        final_rows.append({"config": spec.name, "preset": desc, "bpd": mean, "seeds": [r["seed"] for r in mine],
                           "per_seed": [{k: r.get(k) for k in ("seed", "bpd", "diff", "diff_ci95", "a_lower")}
                                        for r in mine],
                           "diff_seeds": d.mean if d else None, "diff_seeds_ci95": d.ci95 if d else None,
                           "diff_seeds_sd": d.sd if d else None, "steps_to_reference_final": reach,
                           "var_z_gamma_max": max(var) if var else None,
                           "gamma0": sum(r["gamma0"] for r in mine) / len(mine) if mine[0].get("gamma0") is not None else None,
                           "gamma1": sum(r["gamma1"] for r in mine) / len(mine) if mine[0].get("gamma1") is not None else None})
    per_step = ["", "Mean over seeds of the paired difference, 95% t-interval over seeds (k seeds):", "",
                "| step | " + " | ".join(f"{s.name} − {ref.name}" for s in specs if s.name != ref.name) + " |",
                "|---|" + "---|" * (len(specs) - 1)]
    for st in steps:
        cells = []
        for spec in specs:
            if spec.name == ref.name:
                continue
            d = seeded.get((spec.name, st))
            cells.append("" if d is None else (f"{d.mean:+.4f} ± {d.ci95:.4f} (k={len(d.runs)})" if len(d.runs) > 1
                                               else f"{d.mean:+.4f} (k=1)"))
        per_step.append(f"| {st} | " + " | ".join(cells) + " |")
    train_s = {}
    for spec, seed in [(s, seed) for seed in args.seeds for s in specs]:
        log = run_dir(args, spec, seed) / "metrics.jsonl"
        if log.is_file():
            train_s[f"{spec.name}-s{seed}"] = train_seconds(log.parent, run_config(spec, args, seed).train.batch_size,
                                                            up_to=max(steps, default=None))
    resolved = {}
    for spec in specs:
        for seed, step in sorted((r["seed"], r["step"]) for r in rows if r["config"] == spec.name):
            extra = json.loads(per_image_path(args, spec, seed, step).with_suffix(".json").read_text())["extra"]
            if extra.get("resolved"):
                resolved[spec.name] = extra["resolved"]
                break
    n_images = rows[0]["images"] if rows else 0
    split = rows[0]["split"] if rows else args.split
    header = [f"# {args.data}, {split} split: configurations against {ref.name}", "",
              f"Command: `python {' '.join(sys.argv)}`", "",
              f"Training: {args.steps} steps, checkpoints every {args.every}, training seeds {args.seeds}, one thread "
              f"per process, {args.jobs} processes side by side. Evaluation: negative ELBO of the EMA weights on "
              f"{n_images} {split} images ({'the whole split' if rows and not rows[0]['subset'] else 'the first ones'}, "
              f"sha256 {rows[0]['sha256'][:16] if rows else ''}…), S = {args.time_points} stratified times per image, "
              f"per-image draws from eval seed {args.eval_seed} (common random numbers), strict latent KL charged. "
              f"Each seed's difference is paired over images (95% t-interval over images: it describes two trained "
              f"networks); a configuration's difference is the mean over seeds of those, with a 95% t-interval over "
              f"the seeds (k − 1 degrees of freedom), which includes the between-seed spread. Max Var_z γ: the "
              f"schedule's pixel-mean variance of γ(z, t) across the first 200 images' z, largest over t. Training "
              f"time per run to step {max(steps, default=0)} (from its log): {min(train_s.values(), default=0) / 60:.0f}-"
              f"{max(train_s.values(), default=0) / 60:.0f} min; wall time of this invocation: {wall / 60:.1f} min "
              f"({platform.processor() or platform.machine()}, torch {torch.__version__}). Per-image results: "
              f"`per_image/` (readable by `mulan compare`).", ""]
    (results / "README.md").write_text("\n".join(header + lines + per_step) + "\n")
    (results / "final.json").write_text(json.dumps(final_rows, indent=2))
    (results / "summary.json").write_text(json.dumps({
        "command": sys.argv, "steps": args.steps, "every": args.every, "seeds": args.seeds, "images": n_images,
        "split": split, "time_points": args.time_points, "eval_seed": args.eval_seed, "jobs": args.jobs,
        "threads_per_job": 1, "reference": ref.name, "configs": [s.__dict__ for s in specs],
        # each configuration as its checkpoints recorded it at training time (the benchmark's own train settings,
        # BENCH_TRAIN_KEYS, included): what a preset that claims to be one of these must equal
        # (tests/test_cli_outputs.py)
        "resolved": resolved, "train": train_log,
        "train_s_from_logs": train_s, "wall_s": wall}, indent=2))
    if rows:
        plot(rows, specs, ref, results / "curves.png", f"{args.data}: negative ELBO on the {split} split against "
                                                       "training step")
    print("\n".join(header + lines + per_step))


if __name__ == "__main__":
    main()
