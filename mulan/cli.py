"""The ``mulan`` command line: train, eval, sample, presets.

Errors the user can cause print one line, ``mulan: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mulan import __version__, distributed, progress
from mulan.config import Config, apply_overrides, to_dict
from mulan.errors import ConfigError, DataError, MulanError, OutputError
from mulan.loading import CHECKPOINT_HELP, add_load_options, load_from_args
from mulan.presets import get_preset, latent_cost_bpd, preset_names

DEFAULT_PRESET = "digits-mulan"

OVERRIDES_HELP = "config overrides KEY=VALUE, e.g. train.steps=200 model.prediction=v (see --dry-run)"


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output directory {path} is not writable: {e.strerror or e}") from None
    return path


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(record: dict) -> None:
        bar.update(record["step"] - bar.n)
        post = {"loss": f"{record['loss_bpd']:.3f}bpd", "img/s": f"{record['images_per_s']:.0f}"}
        for split in ("val", "test"):
            if f"{split}_bpd" in record:
                post[split] = f"{record[f'{split}_bpd']:.3f}bpd"
        bar.set_postfix(post, refresh=False)

    return bar, update


def _positive(flag: str, value: int | None, hint: str = "") -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value}: must be >= 1{hint}")


# --- commands -----------------------------------------------------------------------------------------------

def cmd_presets(args) -> None:
    from mulan.presets import describe

    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {describe(get_preset(name))}")


def cmd_train(args) -> None:
    from mulan.checkpoint import load_checkpoint
    from mulan.train import check_batch_split, train

    start = 0
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        state = load_checkpoint(Path(args.out) / "checkpoints" / "last.pt")
        if args.preset is not None and args.preset != state["config"].preset:
            raise ConfigError(f"--preset {args.preset} differs from the run's preset {state['config'].preset!r}; "
                              "drop --preset to continue the run (only train/eval settings may change)")
        cfg: Config = apply_overrides(state["config"], args.overrides)
        start = int(state.get("step", 0))
    else:
        cfg = apply_overrides(get_preset(args.preset or DEFAULT_PRESET), args.overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return
    world, _ = distributed.setup(cfg.train.device)  # one process, or this rank of a torchrun job
    check_batch_split(cfg, world.size)
    out = Path(args.out or f"runs/{cfg.preset or 'custom'}")
    if not args.resume and (out / "checkpoints" / "last.pt").exists():
        raise OutputError(f"{out} already holds a run; continue it with --resume or choose another --out")
    if args.resume and start >= cfg.train.steps and _finished(out, start):
        if world.main:
            print(f"nothing to do: {out} is at step {start} and train.steps={cfg.train.steps}, and its results are "
                  f"in {out / 'results.json'}; raise train.steps to train on")
        return
    if world.main:
        _writable_dir(out)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    t0 = time.perf_counter()
    show = progress.wanted(args.no_progress)
    bar, update = _progress_bar(cfg.train.steps, start, show)
    try:
        result = train(cfg, out, resume=args.resume, progress=update)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    if world.main:
        ran = max(result.step - start, 0)
        what = (f"trained {ran} step{'s' * (ran != 1)} this time (step {start} -> {result.step})" if args.resume
                else f"trained {result.step} steps")
        print(f"{what} in {train_s:.0f} s ({result.images_per_s:.0f} images/s"
              f"{f' over {world.size} ranks' if world.distributed else ''}); "
              f"checkpoint {out / 'checkpoints' / 'last.pt'}")
    finish_run(result.model, cfg, result.test_set, out, step=result.step, seed=cfg.train.seed, quick=args.quick,
               show_progress=show)


def _finished(out: Path, step: int) -> bool:
    """Whether the run's results.json is that of ``step`` (its final evaluation and samples were written)."""
    try:
        return int(json.loads((out / "results.json").read_text()).get("step", -1)) == step
    except (OSError, ValueError, AttributeError):
        return False


def finish_run(model, cfg: Config, test_set, out: Path, *, step: int, seed: int, quick: bool = False,
               show_progress: bool = False) -> None:
    """After training: the held-out bound on the whole test split, samples, and (MuLAN) schedule figures."""
    import torch

    from mulan.images import make_grid, save_grid
    from mulan.report import evaluate_elbo
    from mulan.sampling import ancestral_sample
    from mulan.train import MetricsLog

    with progress.bar("final ELBO, test split", "images", show_progress, total=len(test_set)) as cb:
        summary = evaluate_elbo(model, test_set, time_points=cfg.eval.time_points if not quick else 4,
                                batch_size=cfg.eval.batch_size, seed=seed, out_dir=out, callback=cb,
                                checkpoint=str(out / "checkpoints" / "last.pt"), step=step,
                                weights="ema")  # sharded over ranks
    if not distributed.world().main:
        return
    print("\n".join(summary.lines()))
    gen = torch.Generator(model.device).manual_seed(seed)
    steps = cfg.eval.sample_steps if not quick else 10
    with progress.bar(f"sampling {cfg.eval.num_samples} images", "steps", show_progress, total=steps) as cb:
        samples = ancestral_sample(model, cfg.eval.num_samples, steps=steps, generator=gen, callback=cb)
    save_grid(samples, cfg.data.num_values, out / "samples.png")
    log = MetricsLog(out)  # TensorBoard, when installed, gets the samples too
    log.image("samples", make_grid(samples.cpu(), cfg.data.num_values), step)
    log.close()
    from mulan.plots import schedule_figures, training_curves

    figures = out / "figures"
    with progress.bar("figures: samples per z", "steps", show_progress, total=min(steps, 250)) as cb:
        schedule_figures(model, test_set.images, figures, sample_steps=min(steps, 250), seed=seed, callback=cb)
    if (out / "metrics.jsonl").is_file():
        training_curves(out / "metrics.jsonl", figures / "training_curves.png")
    metrics = {"step": step, "test": summary.__dict__, "eval_files": summary.stem,
               "latent_cost_bpd_strict": latent_cost_bpd(cfg), "sample_steps": steps}
    (out / "results.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"per-image results: {out / summary.stem}.csv; samples ({steps} ancestral steps): {out / 'samples.png'}; "
          f"figures: {figures}/; results: {out / 'results.json'}")


def cmd_eval(args) -> None:
    from mulan.data import load_split
    from mulan.report import evaluate_elbo, evaluate_ode

    _positive("--limit", args.limit, " (the number of images; without --limit: the whole split)")
    if args.estimator == "ode" and (args.time_points is not None or args.timesteps is not None):
        raise ConfigError("--time-points and --timesteps set the ELBO; the ODE's settings are eval.ode_* overrides")
    run = load_from_args(args, (("--time-points", "eval.time_points", args.time_points),
                                ("--timesteps", "model.timesteps", args.timesteps)), join_ranks=True)
    cfg = run.config
    data = load_split(cfg.data, args.split)
    out = Path(args.out) if args.out else run.run_dir
    main_rank = distributed.world().main
    if main_rank:
        _writable_dir(out)
    common = dict(seed=args.seed, limit=args.limit or 0, out_dir=out, checkpoint=str(run.path), step=run.step,
                  weights=run.weights, overwrite=args.overwrite)
    total = min(args.limit or len(data), len(data))
    with progress.bar(f"{args.estimator.upper()}, {data.split} split", "images", progress.wanted(args.no_progress),
                      total=total) as cb:
        if args.estimator == "ode":
            summary = evaluate_ode(run.model, data, cfg.eval, callback=cb, **common)
        else:
            summary = evaluate_elbo(run.model, data, time_points=cfg.eval.time_points,
                                    batch_size=cfg.eval.batch_size, callback=cb, **common)
    if not main_rank:
        return
    print("\n".join(summary.lines()))
    print(f"per-image results: {out / summary.stem}.csv; summary: {out / summary.stem}.json")


SAMPLER_DEFAULT_STEPS = {"ddim": 50, "dpm2m": 20}  # fixed-step samplers other than ancestral (eval.sample_steps)


def sampler_settings(args, cfg=None) -> dict:
    """The checked keyword options of :func:`mulan.sampling.sample` from --sampler, --steps, --eta and --grid
    (without ``cfg``, the run's config, only the checks: call it before loading a model)."""
    from mulan.sampling import DEFAULT_GRID, GRIDS, SAMPLERS

    name = args.sampler
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} (see --help)")
    if args.eta is not None and name not in ("ddim", "dpm2m"):
        raise ConfigError(f"--eta applies to the ddim and dpm2m samplers only, not {name}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise ConfigError(f"--eta {args.eta}: must be in [0, 1] (0 deterministic, 1 fully stochastic)")
    if args.grid is not None and args.grid not in GRIDS:
        raise ConfigError(f"unknown --grid {args.grid!r}; choose one of {', '.join(GRIDS)}")
    if name == "ode" and (args.steps is not None or args.grid is not None):
        raise ConfigError("--steps and --grid set the fixed-step samplers; the ODE sampler's tolerances are "
                          "eval.ode_rtol and eval.ode_atol")
    _positive("--steps", args.steps, " (sampler steps; eval.sample_steps sets the ancestral default)")
    if cfg is None:
        return {}
    if name == "ode":
        return {"sampler": name, "rtol": cfg.eval.ode_rtol, "atol": cfg.eval.ode_atol, "method": cfg.eval.ode_method}
    steps = args.steps or (cfg.eval.sample_steps if name == "ancestral" else SAMPLER_DEFAULT_STEPS[name])
    grid = args.grid or ("t" if name == "ancestral" else DEFAULT_GRID)
    return {"sampler": name, "steps": steps, "grid": grid, "eta": args.eta or 0.0}


def describe_sampler(settings: dict) -> str:
    """'dpm2m-eta1-T20-logsnr', 'ddim-eta0.5-T50-t', 'ancestral-T1000' (t grid), 'ode': names files and rows."""
    name = settings["sampler"]
    if name == "ode":
        return "ode"
    eta = f"-eta{settings['eta']:g}" if settings["eta"] else ""
    grid = "" if name == "ancestral" and settings["grid"] == "t" else f"-{settings['grid']}"
    return f"{name}{eta}-T{settings['steps']}{grid}"


def fixed_z(model, text: str | None, num: int):
    """--z: the k-hot z with the listed active units ('2,5'), or a Gaussian latent's m values; None when not given."""
    import torch

    if text is None:
        return None
    kind, m = model.cfg.latent.kind, model.latent.dim
    if kind == "none":
        raise ConfigError("--z: this model has no latent z (its schedule does not depend on one)")
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--z {text!r}: expected comma-separated numbers, e.g. --z 2,5") from None
    if kind == "khot":
        k = model.cfg.latent.k
        units = sorted({int(v) for v in values})
        if len(values) != k or len(units) != k or any(v != int(v) or not 0 <= v < m for v in values):
            raise ConfigError(f"--z {text}: a k-hot z lists its {k} distinct active units, each in 0..{m - 1}")
        z = torch.zeros(m)
        z[units] = 1.0
    else:
        if len(values) != m:
            raise ConfigError(f"--z {text}: this model's Gaussian latent has m={m} values, {len(values)} given")
        z = torch.tensor(values)
    return z.to(model.device, model.dtype).expand(num, m).contiguous()


def z_text(model, z_given) -> str:
    """What the output says about z."""
    if model.cfg.latent.kind == "none":
        return "no latent z"
    if z_given is None:
        return "z drawn from the prior p(z) for each sample"
    if model.cfg.latent.kind == "khot":
        return "one fixed z = {" + ", ".join(map(str, z_given[0].nonzero().flatten().tolist())) + "} for every sample"
    return "one fixed z for every sample"


def draw_samples(run, settings: dict, num: int, seed: int, z_arg: str | None, show: bool):
    """(images, z used, z description) from a loaded run with the checked sampler ``settings``."""
    import torch

    from mulan.sampling import sample

    model = run.model
    gen = torch.Generator(model.device).manual_seed(seed)
    z_given = fixed_z(model, z_arg, num)
    # the prior draw the sampler would make, taken here so the .npz can record each sample's z
    z = z_given if z_given is not None else model.latent.sample_prior(num, generator=gen, device=model.device)
    steps = settings.get("steps")
    unit = "evaluations" if steps is None else "steps"
    with progress.bar(f"sampling {num} images ({describe_sampler(settings)})", unit, show, total=steps) as cb:
        images = sample(model, num, z=z, generator=gen, callback=cb, **settings)
    return images, z, z_text(model, z_given)


def cmd_sample(args) -> None:
    from mulan.checkpoint import refuse_existing
    from mulan.images import check_format, save_samples

    if args.out:
        check_format(Path(args.out))  # before any work
    sampler_settings(args)
    run = load_from_args(args, (("--num", "eval.num_samples", args.num),))
    cfg = run.config
    settings = sampler_settings(args, cfg)
    num, how = cfg.eval.num_samples, describe_sampler(settings)
    out = Path(args.out) if args.out else run.run_dir / f"samples-{how}-n{num}-seed{args.seed}-{run.weights}-step{run.step}.png"
    refuse_existing([out], args.overwrite)
    _writable_dir(out.parent)
    t0 = time.perf_counter()
    images, z, z_note = draw_samples(run, settings, num, args.seed, args.z, progress.wanted(args.no_progress))
    save_samples(images, cfg.data.num_values, out, z=z)
    print(f"wrote {images.shape[0]} samples ({how}; {z_note}; seed {args.seed}, "
          f"{'raw' if args.raw else 'EMA'} weights of step {run.step}; {time.perf_counter() - t0:.1f} s) to {out}")


def cmd_score(args) -> None:
    import numpy as np
    import torch

    from mulan.quality import data_config, score

    _positive("--bootstrap", args.bootstrap, " (resamples for the intervals)")
    _positive("--k", args.k, " (neighbours of the precision/recall manifolds)")
    source = Path(args.samples)
    if source.suffix.lower() == ".npz":
        if not args.data:
            raise ConfigError("--data NAME is needed to score an .npz file (digits or fashion-mnist)")
        if args.overrides or args.sampler is not None or args.z is not None or args.num is not None:
            raise ConfigError("sampler settings, --num, --z and overrides apply to a checkpoint or run folder, not "
                              "an .npz of samples")
        try:
            with np.load(source) as npz:
                images = torch.from_numpy(np.asarray(npz["images"]).astype(np.int64))
                num_values = int(npz["num_values"]) if "num_values" in npz else None
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise DataError(f"cannot read samples {source}: {type(e).__name__}: {e}".splitlines()[0]) from None
        cfg = _score_data(data_config, args.data)
        what = f"{source}"
    else:
        args.sampler = args.sampler or "ancestral"
        sampler_settings(args)
        run = load_from_args(args, (("--num", "eval.num_samples", args.num),))
        cfg = run.config.data
        if args.data and args.data != cfg.name:
            raise ConfigError(f"--data {args.data}: the model was trained on {cfg.name}")
        settings = sampler_settings(args, run.config)
        images, _, z_note = draw_samples(run, settings, run.config.eval.num_samples, args.seed, args.z,
                                         progress.wanted(args.no_progress))
        num_values, what = cfg.num_values, f"{run.path} ({describe_sampler(settings)}; {z_note}; seed {args.seed})"
        cfg = _score_data(data_config, cfg.name) if cfg.name in ("digits", "fashion-mnist") else cfg
    if num_values is not None and num_values != cfg.num_values:
        raise DataError(f"{source} holds images with num_values={num_values}, but {cfg.name} has {cfg.num_values}")
    try:
        report = score(images, cfg, cache=args.cache, k=args.k, bootstrap=args.bootstrap, seed=args.seed)
    except ValueError as e:
        raise DataError(f"{source}: {e}") from None
    print(f"scored: {what}")
    print("\n".join(report.lines()))
    if args.out:
        from mulan.checkpoint import atomic_write

        payload = json.dumps({"scored": what, **report.as_dict()}, indent=2).encode()
        atomic_write(Path(args.out), lambda f: f.write(payload))
        print(f"wrote {args.out}")


def _score_data(data_config, name: str):
    try:
        return data_config(name)
    except ValueError as e:
        raise ConfigError(f"--data: {e}") from None


def cmd_plot_schedule(args) -> None:
    from mulan.checkpoint import refuse_existing
    from mulan.data import load_splits
    from mulan.plots import SCHEDULE_FIGURES, schedule_figures

    run = load_from_args(args, (("--steps", "eval.sample_steps", args.steps),))
    _, test_set = load_splits(run.config.data)
    out = Path(args.out) if args.out else run.run_dir / f"figures-{run.weights}-step{run.step}"
    refuse_existing([out / name for name in SCHEDULE_FIGURES], args.overwrite)
    _writable_dir(out)
    steps = run.config.eval.sample_steps
    with progress.bar("samples per z", "steps", progress.wanted(args.no_progress), total=steps) as cb:
        paths = schedule_figures(run.model, test_set.images, out, sample_steps=steps, seed=args.seed, callback=cb)
    for path in paths:
        print(f"wrote {path}")


# --- parser -------------------------------------------------------------------------------------------------

def sampler_list() -> str:
    """One line per sampler, for --help."""
    from mulan.sampling import SAMPLERS

    width = max(map(len, SAMPLERS))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in SAMPLERS.items())


def add_sampler_options(parser) -> None:
    """--sampler, --steps, --eta, --grid, --z and --seed (checked by :func:`sampler_settings`)."""
    from mulan.sampling import DEFAULT_GRID

    parser.add_argument("--sampler", default=None, metavar="NAME",
                        help="ancestral (default), ode, ddim or dpm2m (listed above)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of a fixed-step sampler, >= 1 (default: eval.sample_steps for ancestral, "
                             f"{SAMPLER_DEFAULT_STEPS['ddim']} for ddim, {SAMPLER_DEFAULT_STEPS['dpm2m']} for dpm2m)")
    parser.add_argument("--eta", type=float, default=None,
                        help="ddim and dpm2m: 0 deterministic (default) .. 1 fully stochastic (ddim: the ancestral "
                             "step; dpm2m --eta 1 --steps 20 is the measured fast setting, docs/sampling.md)")
    parser.add_argument("--grid", default=None, metavar="t|logsnr",
                        help=f"step grid: uniform in t, or uniform in the pixel-mean log-SNR per sample (default "
                             f"{DEFAULT_GRID} for ddim and dpm2m, t for ancestral)")
    parser.add_argument("--z", default=None, metavar="UNITS",
                        help="one fixed z for every sample: a k-hot z's active units, e.g. 2,5 (default: z drawn "
                             "from the prior p(z) for each sample)")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mulan", description="Diffusion models with learned, multivariate, "
                                "input-adaptive noise schedules (MuLAN) and the VDM family.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model, then evaluate it on the whole test split and sample",
                       epilog="Several processes, GPUs or nodes: torchrun --nproc_per_node N -m mulan train ... "
                              "(train.batch_size is the global batch; see docs/distributed.md).")
    t.add_argument("--preset", default=None,
                   help=f"named configuration (see `mulan presets`); default {DEFAULT_PRESET}; with --resume, "
                        "the run's own (another is refused)")
    t.add_argument("--out", help="run directory (default runs/PRESET; `make run` passes runs/PRESET-DATE-TIME); "
                                 "an existing run is never overwritten")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (none are drawn when stderr is "
                                                                 "not a terminal)")
    t.add_argument("--quick", action="store_true", help="cheap final evaluation and sampling (smoke tests)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="held-out likelihood of a checkpoint, per image and summarised",
                       description="Writes OUT/eval-<estimator>-<split>-<all|firstN>-<settings>-seed<S>-<ema|raw>-"
                                   "step<N>.csv (one row per image) and the .json summary of the same name.")
    e.add_argument("checkpoint", help=CHECKPOINT_HELP)
    e.add_argument("--estimator", choices=["elbo", "ode"], default="elbo")
    e.add_argument("--split", choices=["test", "train", "val"], default="test", help="test, train, or val (the validation images carved by data.val_size)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N >= 1 images (a subset, "
                                                           "reported as one; default: the whole split)")
    e.add_argument("--time-points", type=int, default=None,
                   help="ELBO: stratified times per image, >= 1 (sets eval.time_points)")
    e.add_argument("--timesteps", type=int, default=None,
                   help="ELBO: the discrete-time bound with T >= 1 steps, or 0 for continuous time (sets "
                        "model.timesteps; default: as trained)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="folder for the per-image CSV and summary JSON (default: the run folder)")
    add_load_options(e, "result files")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples from a checkpoint: a PNG grid or an .npz of integer arrays",
                       description="Samplers (--sampler):\n" + sampler_list(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("--num", type=int, default=None, help="number of images, >= 1 (sets eval.num_samples)")
    add_sampler_options(s)
    s.add_argument("--out", help="file: .png (a grid) or .npz (images (N, C, H, W) integers 0..V-1 and the z of each); "
                                 "default RUN_DIR/samples-<sampler>-n<N>-seed<S>-<ema|raw>-step<N>.png")
    add_load_options(s, "an --out file")
    s.set_defaults(func=cmd_sample, sampler="ancestral")

    q = sub.add_parser("score", help="sample quality offline: Fréchet distance, precision/recall and class histogram "
                                     "of classifier features, beside the noise floor",
                       description="Scores SAMPLES (an .npz written by `mulan sample --out X.npz`, with --data NAME) or "
                                   "samples drawn now from a checkpoint or run folder (sampler options as for "
                                   "`mulan sample`) against the test split of a labelled dataset (digits, "
                                   "fashion-mnist), using the features of a classifier trained here on the training "
                                   "split and cached under --cache. Every number has a 95% bootstrap interval and "
                                   "stands beside its floor: the same score for as many training images. See "
                                   "docs/sampling.md.")
    q.add_argument("samples", metavar="SAMPLES", help="an .npz of samples, or " + CHECKPOINT_HELP)
    q.add_argument("--data", default=None, help="the labelled dataset: digits or fashion-mnist (an .npz needs it)")
    q.add_argument("--num", type=int, default=None, help="images to draw from a checkpoint, >= 1 (sets "
                                                         "eval.num_samples)")
    add_sampler_options(q)
    q.add_argument("--cache", default=None, help="folder of the classifier weights (default $MULAN_CACHE, else "
                                                  "~/.cache/mulan); trained there once when missing")
    q.add_argument("--k", type=int, default=3, help="nearest neighbours of the precision/recall manifolds (default 3)")
    q.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the intervals (default 200)")
    q.add_argument("--out", default=None, help="also write the score as JSON to this file")
    add_load_options(q, "an --out file")
    q.set_defaults(func=cmd_score)

    f = sub.add_parser("plot-schedule", help="PNG figures of the learned noise schedule of a checkpoint")
    f.add_argument("checkpoint", help=CHECKPOINT_HELP)
    f.add_argument("--out", help="folder (default RUN_DIR/figures-<ema|raw>-step<N>)")
    f.add_argument("--steps", type=int, default=250, help="ancestral steps for the samples-per-z figure, >= 1")
    f.add_argument("--seed", type=int, default=0)
    add_load_options(f, "figures")
    f.set_defaults(func=cmd_plot_schedule)

    from mulan import compare, export
    from mulan.coding import cli as coding

    export.register(sub)
    compare.register(sub)
    coding.register(sub)

    ps = sub.add_parser("presets", help="list the named configurations, one line each")
    ps.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # KEY=VALUE overrides may come before or after options: argparse leaves late ones over, collect them here.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except MulanError as e:
        world = distributed.world()
        print(f"mulan: error: {f'[rank {world.rank}] ' if world.distributed else ''}{e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        sys.exit(0)
    except KeyboardInterrupt:
        print("mulan: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.teardown()
