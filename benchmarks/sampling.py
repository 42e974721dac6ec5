"""Sample quality against sampler steps, for a learned-VDM and a MuLAN checkpoint, with wall time per 1,000 samples.

For each model (``--vdm RUN``, ``--mulan RUN``: run folders or checkpoints of the same labelled dataset) and each
row of ``--samplers`` (ancestral; DDIM eta = 0; the second-order dpm2m, deterministic; dpm2m-sde, its stochastic
form with eta = 1) at each step count (``--steps``), draws ``--num`` images (seeded; MuLAN's z from the prior per
sample) and scores them with ``mulan score`` (Fréchet distance of classifier features to the test split, k-NN
precision/recall, class total variation, 95% bootstrap intervals over the samples), beside the floor (as many
training images). The deterministic samplers also run on both step grids (``t``, ``logsnr``) at the steps of
``--grid-steps``, which decides the default grid. Finished rows are kept under ``--work``: a stopped run resumes.

    # digits (train the two models first, e.g. mulan train --preset digits-vdm --out runs/digits-vdm)
    python benchmarks/sampling.py --vdm runs/digits-vdm --mulan runs/digits-mulan-ends-map --num 1000
    # Fashion-MNIST checkpoints: fewer samples, no deterministic rows above 100 steps
    python benchmarks/sampling.py --vdm RUN_A --mulan RUN_B --num 250 --max-fast 100 \
        --out benchmarks/results/sampling/fashion

Writes into ``--out``: ``results.json`` (every row: model, sampler, steps, grid, wall time, full score),
``README.md`` (the tables, with the command, seeds, threads and wall time) and ``samples.png`` (the first samples
of each row of the main tables).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mulan.loading import load  # noqa: E402
from mulan.quality import data_config, score  # noqa: E402
from mulan.quality.classifier import load_or_train  # noqa: E402
from mulan.sampling import sample  # noqa: E402

# the rows of the tables: name -> (sampler, eta); dpm2m-sde is dpm2m with eta = 1 (its stochastic form)
SAMPLERS = {"ancestral": ("ancestral", 0.0), "ddim": ("ddim", 0.0), "dpm2m": ("dpm2m", 0.0), "dpm2m-sde": ("dpm2m", 1.0)}
DETERMINISTIC = ("ddim", "dpm2m")
TILES = 16  # samples per row of the figure


def draw(model, name: str, steps: int, grid: str, num: int, seed: int, batch: int) -> tuple[torch.Tensor, float, float]:
    """``num`` images in batches (each batch seeded by (seed, batch index)), the wall time and the process's CPU
    time in seconds (the CPU time does not grow when other processes share the cores)."""
    sampler, eta = SAMPLERS[name]
    t0, c0 = time.perf_counter(), time.process_time()
    parts = []
    for b, start in enumerate(range(0, num, batch)):
        gen = torch.Generator(model.device).manual_seed(seed * 1_000_003 + b)
        parts.append(sample(model, min(batch, num - start), sampler=sampler, steps=steps, eta=eta, grid=grid,
                            generator=gen).cpu())
    return torch.cat(parts), time.perf_counter() - t0, time.process_time() - c0


def fmt(est: dict, digits: int = 2) -> str:
    return f"{est['value']:.{digits}f} [{est['lo']:.{digits}f}, {est['hi']:.{digits}f}]"


def tables(rows: list[dict], models: list[str], steps: list[int], default_grid: str) -> list[str]:
    out = []
    floor = rows[0]["score"]["floor"]
    out.append(f"Floor (test split vs {floor['count']} training images): FD {fmt(floor['fd'])}, precision "
               f"{fmt(floor['precision'])}, recall {fmt(floor['recall'])}, class TV {fmt(floor['class_tv'])}.")
    # the rows of the main tables (ancestral on the t grid, the others on the default grid), by (model, sampler, steps)
    main = {(r["model"], r["sampler"], r["steps"]): r for r in rows
            if r["grid"] == ("t" if r["sampler"] == "ancestral" else default_grid)}
    for model in models:
        out += ["", f"### {model}: FD to the test split (95% bootstrap interval) against steps", "",
                "| sampler | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for sampler in SAMPLERS:
            cells = []
            for s in steps:
                r = main.get((model, sampler, s))
                cells.append(fmt(r["score"]["samples"]["fd"]) if r else "-")
            out.append(f"| {sampler} | " + " | ".join(cells) + " |")
    out += ["", f"### CPU time per 1,000 samples (s; {rows[0]['threads']} torch thread, the process's CPU time, which "
            "does not grow when other processes share the cores)", "",
            "| model | sampler | " + " | ".join(str(s) for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for model in models:
        for sampler in SAMPLERS:
            cells = []
            for s in steps:
                r = main.get((model, sampler, s))
                cells.append(f"{1000 * r['cpu_s'] / r['num']:.0f}" if r else "-")
            out.append(f"| {model} | {sampler} | " + " | ".join(cells) + " |")
    if len(models) == 2:
        out += ["", f"### {models[1]} against {models[0]} at equal steps (FD, precision, recall)", "",
                f"| sampler | steps | FD {models[0]} | FD {models[1]} | precision {models[0]} | precision {models[1]} "
                f"| recall {models[0]} | recall {models[1]} |", "|---|---|---|---|---|---|---|---|"]
        for sampler in SAMPLERS:
            for s in steps:
                pair = [main.get((m, sampler, s)) for m in models]
                if all(pair):
                    a, b = (p["score"]["samples"] for p in pair)
                    out.append(f"| {sampler} | {s} | {fmt(a['fd'])} | {fmt(b['fd'])} | {fmt(a['precision'])} | "
                               f"{fmt(b['precision'])} | {fmt(a['recall'])} | {fmt(b['recall'])} |")
    grid_rows = [r for r in rows if r["sampler"] != "ancestral"]
    if {r["grid"] for r in grid_rows} >= {"t", "logsnr"}:
        out += ["", "### Step grid: FD with the t grid against the log-SNR grid", "",
                "| model | sampler | steps | grid t | grid logsnr |", "|---|---|---|---|---|"]
        for model in models:
            for sampler in DETERMINISTIC:
                for s in sorted({r["steps"] for r in grid_rows}):
                    pick = {r["grid"]: r for r in grid_rows if r["model"] == model and r["sampler"] == sampler
                            and r["steps"] == s}
                    if {"t", "logsnr"} <= set(pick):
                        out.append(f"| {model} | {sampler} | {s} | {fmt(pick['t']['score']['samples']['fd'])} | "
                                   f"{fmt(pick['logsnr']['score']['samples']['fd'])} |")
    out += ["", "### Target: a 20-step sampler within 10% of the 1000-step ancestral FD", ""]
    for model in models:
        ref = main.get((model, "ancestral", 1000))
        fast = [r for (m, _, s), r in main.items() if m == model and s == 20]
        if ref is None or not fast:
            out.append(f"- {model}: needs 20 and 1000 in --steps")
            continue
        best = min(fast, key=lambda r: r["score"]["samples"]["fd"]["value"])
        a, b = best["score"]["samples"]["fd"]["value"], ref["score"]["samples"]["fd"]["value"]
        out.append(f"- {model}: best 20-step sampler {best['sampler']} FD {a:.2f} vs ancestral-1000 FD {b:.2f}: "
                   f"{100 * (a / b - 1):+.1f}% ({'met' if a <= 1.1 * b else 'not met'})")
    return out


def figure(rows: list[dict], images: dict, num_values: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mulan.images import make_grid

    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.7 * len(rows) + 0.5), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        grid = make_grid(images[row["label"]][:TILES], num_values, nrow=TILES, scale=2, pad=2)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(row["label"], rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency: a palette PNG is a quarter of the size

    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vdm", required=True, help="learned-VDM run folder or checkpoint")
    p.add_argument("--mulan", required=True, help="MuLAN run folder or checkpoint (same dataset)")
    p.add_argument("--num", type=int, default=1000, help="samples per row")
    p.add_argument("--steps", default="5,10,20,50,100,1000", help="comma-separated step counts")
    p.add_argument("--grid-steps", default="10,20", help="steps at which both grids are compared (ddim, dpm2m)")
    p.add_argument("--default-grid", default="logsnr", help="grid of the main tables for ddim and dpm2m")
    p.add_argument("--max-ancestral", type=int, default=1000, help="skip ancestral rows above this many steps")
    p.add_argument("--max-fast", type=int, default=1000, help="skip ddim and dpm2m rows above this many steps")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated rows of {', '.join(SAMPLERS)}")
    p.add_argument("--models", default="vdm,mulan",
                   help="draw only these models' rows (two processes side by side: --models vdm, --models mulan, "
                        "then one run of both assembles the tables from --work)")
    p.add_argument("--work", default="runs/sampling-bench",
                   help="finished rows are kept here (samples and scores), so a stopped run resumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=500, help="images per sampler call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--cache", default=None, help="classifier cache folder (default $MULAN_CACHE or ~/.cache/mulan)")
    p.add_argument("--out", default="benchmarks/results/sampling/digits")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    steps = [int(s) for s in args.steps.split(",")]
    grid_steps = [int(s) for s in args.grid_steps.split(",") if s]
    runs = {"vdm": load(args.vdm), "mulan": load(args.mulan)}
    names = {r.config.data.name for r in runs.values()}
    if len(names) != 1:
        sys.exit(f"sampling.py: error: the two models were trained on different data: {sorted(names)}")
    cfg = data_config(names.pop())
    classifier = load_or_train(cfg, args.cache)
    chosen = args.samplers.split(",")
    unknown = sorted(set(chosen) - set(SAMPLERS))
    if unknown:
        sys.exit(f"sampling.py: error: unknown --samplers {unknown}; choose from {', '.join(SAMPLERS)}")
    plan = []
    for model in args.models.split(","):
        if model not in runs:
            sys.exit(f"sampling.py: error: unknown --models {model!r}; choose from vdm, mulan")
        for sampler in chosen:
            for s in steps:
                if s > (args.max_ancestral if sampler == "ancestral" else args.max_fast):
                    continue
                plan.append((model, sampler, s, "t" if sampler == "ancestral" else args.default_grid))
            if sampler in DETERMINISTIC:
                other = "t" if args.default_grid == "logsnr" else "logsnr"
                plan += [(model, sampler, s, other) for s in grid_steps]
    rows, images = [], {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    for model, sampler, s, grid in plan:
        label = f"{model} {sampler} {s} {grid}"
        key = {"model": str(runs[model].path), "step": runs[model].step, "num": args.num, "seed": args.seed,
               "batch": args.batch, "bootstrap": args.bootstrap, "classifier": classifier.sha256}
        kept = work / f"{cfg.name}-{label.replace(' ', '-')}.pt"
        saved = torch.load(kept, weights_only=True) if kept.is_file() else None
        if saved is not None and json.loads(saved["key"]) == key:
            x, row = saved["x"], json.loads(saved["row"])
        else:
            x, wall, cpu = draw(runs[model].model, sampler, s, grid, args.num, args.seed, args.batch)
            report = score(x, cfg, k=3, bootstrap=args.bootstrap, seed=args.seed, classifier=classifier)
            row = {"label": label, "model": model, "sampler": sampler, "steps": s, "grid": grid, "num": args.num,
                   "wall_s": wall, "cpu_s": cpu, "threads": args.threads, "score": report.as_dict()}
            work.mkdir(parents=True, exist_ok=True)
            torch.save({"key": json.dumps(key), "row": json.dumps(row), "x": x.to(torch.uint8)}, kept)
        images[label] = x
        rows.append(row)
        print(f"{label}: FD {fmt(row['score']['samples']['fd'])} (floor {fmt(row['score']['floor']['fd'])}), "
              f"{row['wall_s']:.1f} s ({row['cpu_s']:.1f} s CPU)", flush=True)
    models = [m for m in runs if m in args.models.split(",")]
    text = tables(rows, models, steps, args.default_grid)
    total = time.perf_counter() - t_start
    header = [f"# Sampling benchmark: {cfg.name}", "",
              f"Command: `python benchmarks/sampling.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
              f"Models: vdm = {runs['vdm'].path} (step {runs['vdm'].step}), mulan = {runs['mulan'].path} "
              f"(step {runs['mulan'].step}), EMA weights; {args.num} samples per row, seed {args.seed} (batch b "
              f"seeded by seed * 1000003 + b), MuLAN's z drawn from the prior per sample; torch threads "
              f"{args.threads} on {platform.processor() or platform.machine()}; classifier sha256 "
              f"{classifier.sha256[:16]}... (test accuracy {100 * classifier.test_accuracy:.1f}%); "
              f"{args.bootstrap} bootstrap resamples; drawing wall time summed over the rows "
              f"{sum(r['wall_s'] for r in rows) / 60:.1f} min, CPU time {sum(r['cpu_s'] for r in rows) / 60:.1f} min (rows kept in --work are not redrawn; this invocation "
              f"{total / 60:.1f} min).", ""]
    (out / "README.md").write_text("\n".join(header + text) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "wall_s": total}, indent=2))
    figure([r for r in rows if r["grid"] == ("t" if r["sampler"] == "ancestral" else args.default_grid)], images,
           cfg.num_values, out / "samples.png")
    print("\n".join(text))
    print(f"wrote {out / 'README.md'}, {out / 'results.json'}, {out / 'samples.png'}")


if __name__ == "__main__":
    main()
