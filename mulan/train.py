"""Training: AdamW with warm-up, EMA, gradient clipping, periodic held-out evaluation, checkpoints, resume.

Every random draw of step i (batch order, noise, times, latent perturbation, dropout) is a function of
(seed, i) alone, so a run resumed from a checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from mulan import distributed
from mulan.checkpoint import atomic_write, load_checkpoint, load_weights, require, save_checkpoint
from mulan.config import Config, to_dict
from mulan.data import ImageDataset, load_all_splits
from mulan.diffusion import Diffusion, bits_per_dim, build_model
from mulan.ema import EMA
from mulan.errors import ConfigError, MulanError
from mulan.likelihood.elbo import elbo_per_image
from mulan.rng import ShardedGenerator


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A seed for (run seed, step, stream), well mixed and within 63 bits."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The fixed permutation of epoch ``epoch`` (cached: drawing ImageNet-32's 1.28M indices every
    step cost 35 ms on this project's CPU, the cached lookup 0.4 ms)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, stream=1)))


def batch_indices(n: int, batch: int, seed: int, step: int) -> Tensor:
    """Indices of the batch of ``step``: epochs of fixed permutations, each a function of (seed, epoch)."""
    per_epoch = max(n // batch, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = _epoch_permutation(n, seed, epoch)
    idx = perm[offset * batch:(offset + 1) * batch]
    return idx if len(idx) == batch else perm[torch.arange(batch) % n]


def check_batch_split(cfg: Config, ranks: int) -> None:
    """The global batch must split evenly over ranks x accumulation steps."""
    if cfg.train.batch_size % (ranks * cfg.train.accumulate):
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) is not divisible by {ranks} rank(s) x "
                          f"{cfg.train.accumulate} accumulation step(s)")


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to ``train.lr`` over ``warmup_steps``, then constant (VDM)."""
    w = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.train.lr


def schedule_weight_decay(cfg: Config) -> float:
    """The AdamW weight decay of the schedule's parameters (``train.schedule_weight_decay``, -1: the others')."""
    wd = cfg.train.schedule_weight_decay
    return cfg.train.weight_decay if wd < 0 else wd


def param_groups(model: Diffusion, cfg: Config) -> list[dict]:
    """The optimiser's parameter groups: one, or the schedule's apart when its learning rate scale or its weight
    decay differ from the rest. AdamW's decay step is lr x weight_decay per group, so a schedule group at s x
    the learning rate with the same weight_decay decays s times faster."""
    scale, wd = cfg.train.schedule_lr_scale, schedule_weight_decay(cfg)
    if scale == 1.0 and wd == cfg.train.weight_decay:
        return [{"params": list(model.parameters())}]
    schedule = {id(p) for p in model.schedule.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in schedule], "lr_scale": 1.0},
            {"params": list(model.schedule.parameters()), "lr_scale": scale, "weight_decay": wd}]


@dataclass
class StepOut:
    loss_bpd: float  # negative ELBO of the batch, bits/dim
    terms: dict[str, float]  # each ELBO term, nats per image
    grad_norm: float
    finite: bool  # False: the step was skipped


TERMS = ("recon", "prior", "diffusion", "latent")


def train_step(model: Diffusion, opt: torch.optim.Optimizer, x: Tensor, *, generator: torch.Generator,
               grad_clip: float, seed: int = 0, step: int = 0, accumulate: int = 1,
               ddp: torch.nn.Module | None = None) -> StepOut:
    """One optimisation step on this rank's part of a batch; a non-finite loss or gradient leaves the weights
    untouched (on every rank: the loss is averaged over ranks and the gradients are all-reduced first).

    ``x`` is this rank's share of the global batch; it is split into ``accumulate`` micro-batches whose
    gradients add up. ``generator`` must be freshly seeded for the step: every micro-batch re-seeds a copy
    and takes its slice of whole-batch draws (:class:`~mulan.rng.ShardedGenerator`), and dropout is seeded
    per micro-batch from (``seed``, ``step``), so the result does not depend on how the batch is split
    (except dropout masks).
    """
    world = distributed.world()
    net = ddp if ddp is not None else model
    parts = world.size * accumulate
    micro = x.shape[0] // accumulate
    state = generator.get_state()
    opt.zero_grad(set_to_none=True)
    stats = torch.zeros(1 + len(TERMS), dtype=torch.float64, device=x.device)
    for j in range(accumulate):
        part = world.rank * accumulate + j
        generator.set_state(state)
        gen = ShardedGenerator(generator, part, parts) if parts > 1 else generator
        torch.manual_seed(step_seed(seed, step, stream=2) + part)  # dropout
        sync = ddp is None or j == accumulate - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            terms = net(x[j * micro:(j + 1) * micro], generator=gen)
            # The objective in bits/dim (as VDM): the gradient's scale, and so `grad_clip`, does not grow with n.
            loss = bits_per_dim(terms.total, model.n).mean()
            # A non-finite loss still goes through backward (every rank must join the gradient all-reduce);
            # its non-finite gradient then skips the step below.
            (loss / accumulate).backward()
        stats += torch.stack([loss.detach(), *(terms.as_dict()[k].detach().mean() for k in TERMS)]).double()
    stats = world.mean(stats / accumulate).cpu()  # one device-to-host transfer per step
    finite = bool(torch.isfinite(stats).all())
    grad_norm = float("nan")
    if finite:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
        if finite:
            opt.step()
    opt.zero_grad(set_to_none=True)
    return StepOut(loss_bpd=float(stats[0]), terms={k: float(v) for k, v in zip(TERMS, stats[1:])},
                   grad_norm=grad_norm, finite=finite)


def evaluate_bpd(model: Diffusion, data: ImageDataset, *, images: int, time_points: int, batch_size: int,
                 seed: int) -> tuple[float, float, int]:
    """Mean held-out negative ELBO (bits/dim), its 95% half-width, and the number of images used."""
    from mulan.likelihood.stats import mean_ci

    x = data.images[:images] if images > 0 else data.images
    res = elbo_per_image(model, x, time_points=time_points, batch_size=batch_size, seed=seed)
    mean, half = mean_ci(res.bpd(model.n))
    return float(mean), float(half), int(x.shape[0])


class MetricsLog:
    """JSON lines in ``metrics.jsonl`` plus TensorBoard scalars when tensorboard is installed.

    ``resume_step``: the step of the checkpoint a resumed run starts from. Lines a killed run logged after that
    checkpoint describe steps the resumed run does again; they move to ``metrics.discarded.jsonl`` (kept, never
    deleted), so ``metrics.jsonl`` holds each step once, as the weights went through it."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            self._set_aside_after(resume_step)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def _set_aside_after(self, step: int) -> None:
        kept, lost = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                logged = json.loads(line).get("step")
            except ValueError:  # a line cut short by a kill: not a step the weights went through
                logged = step + 1
            (lost if isinstance(logged, int) and logged > step else kept).append(line)
        if not lost:
            return
        with open(self.path.with_name("metrics.discarded.jsonl"), "a") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in lost)
        atomic_write(self.path, lambda f: f.write("".join(kept).encode()))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def image(self, tag: str, grid: Tensor, step: int) -> None:
        """A uint8 (C, H, W) image, e.g. a sample grid."""
        if self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def schedule_figure(self, model: Diffusion, images: Tensor, step: int) -> None:
        """Per-pixel gamma heat maps of a few test images, as a TensorBoard figure."""
        if self.tb is not None:
            from mulan.plots import heatmap_figure

            self.tb.add_figure("schedule/gamma_heatmaps", heatmap_figure(model, images[:4].to(model.device)), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    model: Diffusion  # the EMA model, in eval mode
    train_set: ImageDataset
    test_set: ImageDataset
    step: int  # steps done in total
    best_bpd: float  # best periodic held-out bound (inf when none ran)
    images_per_s: float  # training throughput of this invocation


def train(cfg: Config, run_dir: Path, *, resume: bool = False,
          progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; checkpoints go to ``run_dir/checkpoints``."""
    world, device = distributed.setup(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    check_batch_split(cfg, world.size)
    ckpt_dir = run_dir / "checkpoints"
    for stale in ckpt_dir.glob(".*.tmp"):  # half-written files of a run killed mid-write
        stale.unlink(missing_ok=True)
    state = None
    if resume:
        state = load_checkpoint(ckpt_dir / "last.pt")
        require(state, "model", "ema", "optimizer", "step", path=ckpt_dir / "last.pt")
        old = state["config"]
        for section in ("data", "model"):
            if to_dict(getattr(old, section)) != to_dict(getattr(cfg, section)):
                raise ConfigError(f"--resume: the {section} config differs from the checkpoint's; only train/eval settings may change")
    splits = load_all_splits(cfg.data)
    train_set, test_set = splits["train"], splits["test"]
    # periodic evaluations (and so best.pt) read the validation split when there is one: choices never see test
    held_out = splits.get("val", test_set)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    ema = EMA(model, cfg.train.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                            weight_decay=cfg.train.weight_decay)
    start, best, bad_run = 0, float("inf"), 0
    if state is not None:
        load_weights(model, state["model"], ckpt_dir / "last.pt")
        load_weights(ema.shadow, state["ema"], ckpt_dir / "last.pt", "EMA")
        try:
            opt.load_state_dict(state["optimizer"])
        except ValueError:  # parameter groups differ: schedule_lr_scale moved to or from 1
            raise ConfigError("--resume: the optimiser state does not fit: the schedule's own parameter group "
                              "(train.schedule_lr_scale != 1 or train.schedule_weight_decay != train.weight_decay) "
                              "cannot appear or disappear in a run") from None
        for group, saved in zip(opt.param_groups, param_groups(model, cfg)):  # the config's decay, not the saved one
            group["weight_decay"] = saved.get("weight_decay", cfg.train.weight_decay)
        start, best = int(state["step"]), float(state.get("best_bpd", float("inf")))
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    model.set_runtime(amp_dtype=torch.bfloat16 if precision == "bf16" else None,
                      channels_last=cfg.train.channels_last)
    if cfg.train.compile:
        model.denoiser.compile()
    ddp = None
    if world.distributed:
        # device_ids=None: the module already lives on this rank's one device and inputs are not moved.
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)
    log = MetricsLog(run_dir, resume_step=start if state is not None else None) if world.main else None
    fingerprints = {name: split.fingerprint() for name, split in splits.items()}

    def checkpoint(step: int, name: str = "last.pt") -> None:
        if not world.main:
            return
        payload = {"config": cfg, "step": step, "model": model.state_dict(), "ema": ema.shadow.state_dict(),
                   "optimizer": opt.state_dict(), "best_bpd": best, "data": fingerprints}
        save_checkpoint(ckpt_dir / name, payload)
        if name == "last.pt" and cfg.train.keep_checkpoints > 0 and step % cfg.train.checkpoint_every == 0:
            save_checkpoint(ckpt_dir / f"step-{step:08d}.pt", payload)
            for old_file in sorted(ckpt_dir.glob("step-*.pt"))[:-cfg.train.keep_checkpoints]:
                old_file.unlink(missing_ok=True)

    # CUDA: the uint8 training set lives on the GPU by default (CIFAR-10: 150 MB), so a batch is a device-side
    # gather and the GPU never waits for the host; with data_on_device=false each batch is gathered on the host
    # and copied (a uint8 batch: 0.4 MB for CIFAR-10 at 128).
    images = train_set.images
    if device.type == "cuda" and cfg.train.data_on_device:
        images = images.to(device)
    share = cfg.train.batch_size // world.size  # this rank's images of every batch
    t0, seen = time.perf_counter(), 0
    model.train()
    for step in range(start, cfg.train.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
        idx = batch_indices(len(images), cfg.train.batch_size, cfg.train.seed, step)
        idx = idx[world.rank * share:(world.rank + 1) * share].to(images.device)
        x = images[idx].to(device, non_blocking=True)
        gen = torch.Generator(device).manual_seed(step_seed(cfg.train.seed, step, stream=3))
        out = train_step(model, opt, x, generator=gen, grad_clip=cfg.train.grad_clip, seed=cfg.train.seed,
                         step=step, accumulate=cfg.train.accumulate, ddp=ddp)
        seen += cfg.train.batch_size
        if out.finite:
            bad_run = 0
            ema.update(model, step)
        else:
            bad_run += 1
            if log is not None:
                log.write({"kind": "train", "step": step + 1, "nonfinite": True, "consecutive": bad_run})
            if bad_run >= cfg.train.max_nonfinite:
                last = ckpt_dir / "last.pt"
                raise MulanError(f"training stopped at step {step + 1}: {bad_run} consecutive non-finite losses; "
                                 f"last good checkpoint: {last if last.exists() else 'none'}")
        done = step + 1
        ips = seen / max(time.perf_counter() - t0, 1e-9)
        record = {"kind": "train", "step": done, "loss_bpd": out.loss_bpd, **out.terms,
                  "grad_norm": out.grad_norm, "lr": opt.param_groups[0]["lr"], "images_per_s": ips}
        if log is not None and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
            log.write(record)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0:
            eval_bpd, half, count = evaluate_bpd(ema.shadow, held_out, images=cfg.train.eval_images,
                                                 time_points=cfg.train.eval_time_points,
                                                 batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
            if eval_bpd < best:
                best = eval_bpd
                checkpoint(done, "best.pt")
            if log is not None:
                log.schedule_figure(ema.shadow, held_out.images, done)
                log.write({"kind": "eval", "step": done, f"{held_out.split}_bpd": eval_bpd, "ci95": half,
                           "images": count, "split": held_out.split, "time_points": cfg.train.eval_time_points,
                           "estimator": "elbo"})
            record[f"{held_out.split}_bpd"] = eval_bpd
        if progress is not None and world.main:
            progress(record)
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            world.check_same(ema.shadow, "EMA weights")  # every rank holds what rank 0 is about to save
            checkpoint(done)
    if start >= cfg.train.steps and state is None:
        checkpoint(start)
    if log is not None:
        log.close()
    world.barrier()  # every rank leaves with rank 0's last checkpoint on disk
    return TrainResult(model=ema.shadow.eval(), train_set=train_set, test_set=test_set,
                       step=max(start, cfg.train.steps), best_bpd=best,
                       images_per_s=seen / max(time.perf_counter() - t0, 1e-9) if seen else 0.0)
