"""The ``mulan`` command line: train, eval, sample, presets.

Errors the user can cause print one line, ``mulan: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mulan import distributed
from mulan.config import Config, apply_overrides, to_dict
from mulan.errors import ConfigError, MulanError, OutputError
from mulan.presets import get_preset, latent_cost_bpd, preset_names

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
        if "test_bpd" in record:
            post["test"] = f"{record['test_bpd']:.3f}bpd"
        bar.set_postfix(post, refresh=False)

    return bar, update


def _load_model(checkpoint: str, overrides: list[str], *, ema: bool = True, join_ranks: bool = False):
    """(model, config, state) from a checkpoint; data overrides (e.g. data.path=...) may point at moved files."""
    import torch

    from mulan.checkpoint import load_checkpoint, load_weights, require
    from mulan.train import build_model, resolve_device

    state = load_checkpoint(checkpoint)
    require(state, "ema" if ema else "model", path=checkpoint)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("data.", "eval.", "train.device", "train.threads"))]
    if bad:
        raise ConfigError(f"only data.*, eval.*, train.device and train.threads can be overridden here, not {bad[0]!r}")
    cfg = apply_overrides(state["config"], overrides)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg)
    load_weights(model, state["ema" if ema else "model"], checkpoint, "EMA" if ema else "model")
    if join_ranks:  # under torchrun: this rank's device in the job's process group
        device = distributed.setup(cfg.train.device)[1]
    else:
        device = resolve_device(cfg.train.device)
    return model.to(device).eval(), cfg, state


# --- commands -----------------------------------------------------------------------------------------------

def cmd_presets(args) -> None:
    for name in preset_names():
        print(name)


def cmd_train(args) -> None:
    from mulan.checkpoint import load_checkpoint
    from mulan.train import check_batch_split, train

    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        cfg: Config = apply_overrides(load_checkpoint(Path(args.out) / "checkpoints" / "last.pt")["config"],
                                      args.overrides)
    else:
        cfg = apply_overrides(get_preset(args.preset), args.overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return
    world, _ = distributed.setup(cfg.train.device)  # one process, or this rank of a torchrun job
    check_batch_split(cfg, world.size)
    out = Path(args.out or f"runs/{cfg.preset or 'custom'}")
    if not args.resume and (out / "checkpoints" / "last.pt").exists():
        raise OutputError(f"{out} already holds a run; continue it with --resume or choose another --out")
    if world.main:
        _writable_dir(out)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    t0 = time.perf_counter()
    bar, update = _progress_bar(cfg.train.steps, 0, world.main and not args.no_progress)
    try:
        result = train(cfg, out, resume=args.resume, progress=update)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    if world.main:
        print(f"trained {result.step} steps in {train_s:.0f} s ({result.images_per_s:.0f} images/s"
              f"{f' over {world.size} ranks' if world.distributed else ''}); "
              f"checkpoint {out / 'checkpoints' / 'last.pt'}")
    finish_run(result.model, cfg, result.test_set, out, step=result.step, seed=cfg.train.seed, quick=args.quick)


def finish_run(model, cfg: Config, test_set, out: Path, *, step: int, seed: int, quick: bool = False) -> None:
    """After training: the held-out bound on the whole test split, samples, and (MuLAN) schedule figures."""
    import torch

    from mulan.images import make_grid, save_grid
    from mulan.report import evaluate_elbo
    from mulan.sampling import ancestral_sample
    from mulan.train import MetricsLog

    summary = evaluate_elbo(model, test_set, time_points=cfg.eval.time_points if not quick else 4,
                            batch_size=cfg.eval.batch_size, seed=seed, out_dir=out)  # sharded over ranks
    if not distributed.world().main:
        return  # samples, figures and files: rank 0
    summary.checkpoint, summary.step = str(out / "checkpoints" / "last.pt"), step
    print("\n".join(summary.lines()))
    gen = torch.Generator(model.device).manual_seed(seed)
    steps = cfg.eval.sample_steps if not quick else 10
    samples = ancestral_sample(model, cfg.eval.num_samples, steps=steps, generator=gen)
    save_grid(samples, cfg.data.num_values, out / "samples.png")
    log = MetricsLog(out)  # TensorBoard, when installed, gets the samples too
    log.image("samples", make_grid(samples.cpu(), cfg.data.num_values), step)
    log.close()
    from mulan.plots import schedule_figures, training_curves

    figures = out / "figures"
    schedule_figures(model, test_set.images, figures, sample_steps=min(steps, 250), seed=seed)
    if (out / "metrics.jsonl").is_file():
        training_curves(out / "metrics.jsonl", figures / "training_curves.png")
    metrics = {"step": step, "test": summary.__dict__, "latent_cost_bpd_strict": latent_cost_bpd(cfg),
               "sample_steps": steps}
    (out / "results.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"samples ({steps} ancestral steps): {out / 'samples.png'}; figures: {figures}/; "
          f"results: {out / 'results.json'}")


def cmd_eval(args) -> None:
    from mulan.data import load_splits
    from mulan.report import evaluate_elbo, evaluate_ode, write_summary

    model, cfg, state = _load_model(args.checkpoint, args.overrides, join_ranks=True)
    train_set, test_set = load_splits(cfg.data)
    data = test_set if args.split == "test" else train_set
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent
    main_rank = distributed.world().main
    if main_rank:
        _writable_dir(out)
    if args.timesteps >= 0:  # the discrete-time bound with T steps (0: continuous time) for any model
        model.cfg.timesteps = args.timesteps
    if args.estimator == "ode":
        summary = evaluate_ode(model, data, cfg.eval, seed=args.seed, limit=args.limit, out_dir=out)
    else:
        summary = evaluate_elbo(model, data, time_points=args.time_points or cfg.eval.time_points,
                                batch_size=cfg.eval.batch_size, seed=args.seed, limit=args.limit, out_dir=out)
    if not main_rank:
        return
    summary.checkpoint, summary.step = str(args.checkpoint), int(state.get("step", 0))
    write_summary(out / f"eval-{args.estimator}-{data.split}.json", summary)
    print("\n".join(summary.lines()))
    print(f"per-image results: {out / f'eval-{args.estimator}-{data.split}.csv'}")


def cmd_sample(args) -> None:
    import torch

    from mulan.images import save_grid
    from mulan.sampling import ancestral_sample, ode_sampler

    model, cfg, _ = _load_model(args.checkpoint, args.overrides)
    out = Path(args.out or Path(args.checkpoint).resolve().parent.parent / "samples.png")
    _writable_dir(out.parent)
    gen = torch.Generator(model.device).manual_seed(args.seed)
    num = args.num or cfg.eval.num_samples
    if args.sampler == "ode":
        images = ode_sampler(model, num, rtol=cfg.eval.ode_rtol, atol=cfg.eval.ode_atol, method=cfg.eval.ode_method,
                             generator=gen)
    else:
        images = ancestral_sample(model, num, steps=args.steps or cfg.eval.sample_steps, generator=gen)
    save_grid(images, cfg.data.num_values, out)
    print(f"wrote {images.shape[0]} samples to {out}")


def cmd_plot_schedule(args) -> None:
    from mulan.data import load_splits
    from mulan.plots import schedule_figures

    model, cfg, _ = _load_model(args.checkpoint, args.overrides)
    _, test_set = load_splits(cfg.data)
    out = _writable_dir(Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "figures")
    for path in schedule_figures(model, test_set.images, out, sample_steps=args.steps, seed=args.seed):
        print(f"wrote {path}")


# --- parser -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mulan", description="Diffusion models with learned, multivariate, "
                                "input-adaptive noise schedules (MuLAN) and the VDM family.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model, then evaluate it on the whole test split and sample",
                       epilog="Several processes, GPUs or nodes: torchrun --nproc_per_node N -m mulan train ... "
                              "(train.batch_size is the global batch; see the README).")
    t.add_argument("--preset", default="digits-mulan", help="named configuration (see `mulan presets`); default digits-mulan")
    t.add_argument("--out", help="run directory (default runs/PRESET); an existing run is never overwritten")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--quick", action="store_true", help="cheap final evaluation and sampling (smoke tests)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="held-out likelihood of a checkpoint, per image and summarised")
    e.add_argument("checkpoint")
    e.add_argument("--estimator", choices=["elbo", "ode"], default="elbo")
    e.add_argument("--split", choices=["test", "train"], default="test")
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (reported as a subset)")
    e.add_argument("--time-points", type=int, default=0, help="ELBO: stratified times per image (default eval.time_points)")
    e.add_argument("--timesteps", type=int, default=-1,
                   help="ELBO: the discrete-time bound with T steps, or 0 for continuous time (default: as trained)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="folder for the per-image CSV and summary JSON (default: the run folder)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.*/eval.* overrides, e.g. data.path=... eval.ode_divergence=exact eval.dequant_samples=4")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples from a checkpoint into a PNG grid")
    s.add_argument("checkpoint")
    s.add_argument("--num", type=int, default=0, help="number of images (default eval.num_samples)")
    s.add_argument("--sampler", choices=["ancestral", "ode"], default="ancestral",
                   help="ancestral (T steps) or the probability-flow ODE (adaptive, eval.ode_* tolerances)")
    s.add_argument("--steps", type=int, default=0, help="ancestral steps T (default eval.sample_steps)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG path (default RUN_DIR/samples.png)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="eval.*/train.device overrides")
    s.set_defaults(func=cmd_sample)

    f = sub.add_parser("plot-schedule", help="PNG figures of the learned noise schedule of a checkpoint")
    f.add_argument("checkpoint")
    f.add_argument("--out", help="folder (default RUN_DIR/figures)")
    f.add_argument("--steps", type=int, default=250, help="ancestral steps for the samples-per-z figure")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data.*/train.device overrides")
    f.set_defaults(func=cmd_plot_schedule)

    from mulan import export
    from mulan.coding import command as coding

    export.register(sub)
    coding.register(sub)

    ps = sub.add_parser("presets", help="list the named configurations")
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
