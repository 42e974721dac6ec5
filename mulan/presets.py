"""Named configurations. Every preset also exists with a ``-v`` suffix for v-prediction.

Digits presets are sized for a laptop CPU (the README's main job); CIFAR-10 / ImageNet-32 presets follow
the paper (SPEC "The denoiser") and are meant for GPUs.
"""

from __future__ import annotations

from typing import Callable

from mulan.config import (Config, DataConfig, DenoiserConfig, EvalConfig, LatentConfig, ModelConfig,
                          ScheduleConfig, TrainConfig, validate)
from mulan.diffusion import bits_per_dim
from mulan.errors import ConfigError
from mulan.latent import log_comb


def _small(data: DataConfig, schedule: ScheduleConfig, latent: LatentConfig | None, *, fourier: tuple[int, int],
           batch: int, steps: int, eval_images: int, eval_time_points: int, eval_batch: int,
           eval_every: int = 500, schedule_lr_scale: float = 1.0, schedule_weight_decay: float = 0.01,
           **model) -> Config:
    """A preset sized for a 2-core CPU: the narrow, shallow U-Net (32 channels, 2 blocks) every small preset
    shares, so that small presets differ only in data, schedule, latent and the denoiser's view of the noise."""
    return Config(
        data=data,
        model=ModelConfig(
            schedule=schedule,
            latent=latent or LatentConfig(kind="none"),
            denoiser=DenoiserConfig(channels=32, num_blocks=2, groups=8, dropout=0.1, fourier_min=fourier[0],
                                    fourier_max=fourier[1], **model),
        ),
        train=TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=100, ema_decay=0.999,
                          eval_every=eval_every, eval_images=eval_images, checkpoint_every=500,
                          schedule_lr_scale=schedule_lr_scale, schedule_weight_decay=schedule_weight_decay),
        eval=EvalConfig(time_points=eval_time_points, batch_size=eval_batch, sample_steps=1000, num_samples=64),
    )


def _digits(schedule: ScheduleConfig, latent: LatentConfig | None = None, **model) -> Config:
    # 8x8 images, V = 17: Fourier features at frequencies that resolve 17 levels. ~0.13 s per step on 2 CPU
    # cores: the main job (train, evaluate, sample, plot) fits in 10 minutes. A held-out evaluation of the whole
    # test split costs ~14 s, so the run evaluates (and draws the schedule figure) at half-way and at the end
    # only; evaluations use their own random streams, so this does not change the trained weights.
    # 200 of the 1438 training images are held out for validation (choices read them; the test split is for the
    # final table).
    return _small(DataConfig(name="digits", shape=(1, 8, 8), num_values=17, val_size=200), schedule, latent,
                  fourier=(2, 3),
                  batch=128, steps=2500, eval_images=360, eval_time_points=128, eval_batch=360, eval_every=1250,
                  **model)


def _fashion(schedule: ScheduleConfig, latent: LatentConfig | None = None, **model) -> Config:
    # Fashion-MNIST 28x28, V = 256 (Debian's dataset-fashion-mnist): VDM's Fourier frequencies for 8-bit data;
    # 1.8-3 s per step of batch 64 on one thread of this CPU (VDM to MuLAN with its latent, measured two jobs side
    # by side). The final evaluation of all 10,000 test images uses S = 32. 2,000 of the 60,000 training images are
    # held out for validation.
    return _small(DataConfig(name="fashion-mnist", shape=(1, 28, 28), num_values=256, val_size=2000), schedule, latent,
                  fourier=(6, 7), batch=64, steps=3000, eval_images=1000, eval_time_points=32, eval_batch=250,
                  **model)


# The latent for 64-pixel digits: log C(8, 2) = 3.33 nats = 0.075 bits/dim charged at evaluation
# (0.006 bits/dim over Fashion-MNIST's 784 pixels).
_SMALL_LATENT = LatentConfig(kind="khot", m=8, k=2, encoder_channels=32)


def _mulan_schedule(**kw) -> ScheduleConfig:
    # At 64 pixels the reference's dense decoder is tiny (17k parameters) and the fastest.
    return ScheduleConfig(kind="polynomial", decoder="dense", **kw)


def _paper(dataset: str, mulan: bool) -> Config:
    cifar = dataset == "cifar10"
    data = DataConfig(name=dataset, shape=(3, 32, 32), num_values=256)
    schedule = (ScheduleConfig(kind="polynomial", decoder="dense") if mulan
                else ScheduleConfig(kind="learned_linear"))
    latent = LatentConfig(kind="khot", m=50, k=15, encoder_channels=64) if mulan else LatentConfig(kind="none")
    return Config(
        data=data,
        model=ModelConfig(schedule=schedule, latent=latent,
                          denoiser=DenoiserConfig(channels=128 if cifar else 256, num_blocks=32, dropout=0.1)),
        train=TrainConfig(steps=10_000_000, batch_size=128 if cifar else 512, lr=2e-4, warmup_steps=100,
                          ema_decay=0.9999, eval_every=50_000, eval_images=1024, checkpoint_every=10_000),
        eval=EvalConfig(time_points=128, batch_size=128),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    # VDM family on the bundled digits
    "digits-fixed": lambda: _digits(ScheduleConfig(kind="fixed_linear")),
    "digits-vdm": lambda: _digits(ScheduleConfig(kind="learned_linear")),
    "digits-vdm-net": lambda: _digits(ScheduleConfig(kind="monotone_net")),
    # MuLAN and its ablations on the bundled digits
    "digits-mulan": lambda: _digits(_mulan_schedule(), _SMALL_LATENT),
    "digits-mulan-no-latent": lambda: _digits(_mulan_schedule()),
    "digits-mulan-scalar": lambda: _digits(_mulan_schedule(pixel_mean=True), _SMALL_LATENT),
    "digits-mulan-nonadaptive": lambda: _digits(_mulan_schedule(adaptive=False), _SMALL_LATENT),
    # The best MuLAN configuration on the digits' validation images (benchmarks/mulan_vs_vdm.py, screen on
    # validation): MuLAN's per-pixel schedule with learned ends, its parameters at 10x the learning rate (AdamW's
    # decoupled decay, 0.01, is multiplied by it: schedule_weight_decay states it), the gamma map fed to the
    # denoiser, and no latent (which does not pay at 64 pixels). On the test split, over 3 training seeds, it is
    # not better than learned VDM with the same schedule lr and decay (-0.0060 +- 0.0309 bits/dim).
    "digits-mulan-ends-map": lambda: _digits(_mulan_schedule(learn_ends="scalar"), gamma_input="map",
                                             schedule_lr_scale=10.0),
    # Fashion-MNIST 28x28 (offline, from Debian's dataset-fashion-mnist), sized for a CPU
    "fashion-vdm": lambda: _fashion(ScheduleConfig(kind="learned_linear")),
    "fashion-mulan": lambda: _fashion(ScheduleConfig(kind="polynomial", decoder="conv"), _SMALL_LATENT),
    "fashion-mulan-ends-map": lambda: _fashion(ScheduleConfig(kind="polynomial", decoder="conv", learn_ends="scalar"),
                                               gamma_input="map", schedule_lr_scale=10.0),
    # ... with the paper's k-hot latent back on: at 784 pixels it costs 0.006 bits/dim (its comparison with
    # learned VDM on Fashion-MNIST is in benchmarks/results/mulan_vs_vdm/)
    "fashion-mulan-ends-map-latent": lambda: _fashion(
        ScheduleConfig(kind="polynomial", decoder="conv", learn_ends="scalar"), _SMALL_LATENT, gamma_input="map",
        schedule_lr_scale=10.0),
    # Paper sizes, for GPUs
    "cifar10-vdm": lambda: _paper("cifar10", mulan=False),
    "cifar10-mulan": lambda: _paper("cifar10", mulan=True),
    "imagenet32-vdm": lambda: _paper("imagenet32", mulan=False),
    "imagenet32-mulan": lambda: _paper("imagenet32", mulan=True),
}


def preset_names() -> list[str]:
    """All preset names, each also with a '-v' (v-prediction) variant."""
    return sorted([*PRESETS, *(f"{name}-v" for name in PRESETS)])


def get_preset(name: str) -> Config:
    """The validated config of preset ``name``."""
    base, v = (name[:-2], True) if name.endswith("-v") and name[:-2] in PRESETS else (name, False)
    if base not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    cfg = PRESETS[base]()
    cfg.preset = name
    if v:
        cfg.model.prediction = "v"
    return validate(cfg)


def latent_cost_bpd(cfg: Config) -> float:
    """Bits/dim charged by the strict latent KL at evaluation (log C(m, k) for a k-hot latent, else 0)."""
    lat = cfg.model.latent
    if lat.kind != "khot":
        return 0.0
    return float(bits_per_dim(log_comb(lat.m, lat.k), cfg.data.n))


_SCHEDULES = {
    "fixed_linear": "VDM fixed linear gamma(t)",
    "learned_linear": "VDM learned linear gamma(t)",
    "monotone_net": "VDM learned monotone-network gamma(t)",
    "polynomial": "per-pixel polynomial",
    "pixel_monotone_net": "per-pixel monotone network",
    "pixel_sigmoid": "per-pixel sigmoid",
}


def describe(cfg: Config) -> str:
    """One line saying what a configuration is: data, schedule, latent, prediction, network and training size."""
    m, d = cfg.model, cfg.data
    s, lat, den = m.schedule, m.latent, m.denoiser
    schedule = _SCHEDULES.get(s.kind, s.kind)
    if s.kind in ("polynomial", "pixel_monotone_net", "pixel_sigmoid"):
        adaptive = lat.kind != "none" and s.adaptive
        schedule += " gamma(z, t)" if adaptive else " gamma(t)"
        if s.pixel_mean:
            schedule = f"pixel-mean of a {schedule} (one gamma per image)"
        if lat.kind != "none" and not s.adaptive:
            schedule += " (not fed z)"
        schedule += {"none": ", fixed ends", "scalar": ", learned ends", "pixel": ", learned per-pixel ends"}[s.learn_ends]
    latent = "no latent" if lat.kind == "none" else (
        f"k-hot z (m={lat.m}, k={lat.k})" if lat.kind == "khot" else f"Gaussian z (m={lat.m})")
    shape = "x".join(map(str, d.shape))
    return (f"{d.name} {shape} V={d.num_values}; {schedule}; {latent}; {m.prediction}-prediction; "
            f"U-Net {den.channels} ch x {den.num_blocks} blocks{' fed the gamma map' if den.gamma_input == 'map' else ''}; "
            f"{cfg.train.steps} steps of batch {cfg.train.batch_size}"
            + (f", schedule at {cfg.train.schedule_lr_scale:g}x lr" if cfg.train.schedule_lr_scale != 1 else ""))
