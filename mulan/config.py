"""Typed, validated configuration.

One dataclass per concept; :class:`Config` holds them all and is stored inside every checkpoint, so a
checkpoint alone is enough to evaluate or sample. Overrides are ``section.field=value`` strings, coerced to
the field's annotated type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` or a tuple of ints). Every
setting acts or is refused: an override that the resulting config would ignore (``learn_ends`` on a scalar schedule,
a latent's size with no latent, ...) is an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mulan.errors import ConfigError


@dataclass
class DataConfig:
    """Which images, and their shape. The shape and ``num_values`` are checked against the files."""

    name: Literal["digits", "idx", "fashion-mnist", "cifar10", "imagenet32", "png", "synthetic"] = "digits"
    path: str = ""  # file or folder of the training data (none for 'digits' and 'synthetic')
    test_path: str = ""  # file or folder of the test data; empty: split `path` by `test_fraction`
    test_fraction: float = 0.2  # held-out fraction when the source has no test split of its own
    split_seed: int = 0  # seed of the fixed train/test permutation (recorded in every report)
    shape: tuple[int, ...] = (1, 8, 8)  # (C, H, W) of every image
    num_values: int = 17  # V: pixel values are integers 0..V-1
    limit: int = 0  # keep only the first `limit` images of each split (0: all)
    # validation images carved from the training split, reproducibly (a permutation seeded by `split_seed`), and
    # never trained on: choices (configurations, settings, best.pt) read them, the test split is for the final table
    val_size: int = 0

    @property
    def n(self) -> int:
        """Number of data dimensions C*H*W."""
        return math.prod(self.shape)


SCALAR_KINDS = ("fixed_linear", "learned_linear", "monotone_net")  # one gamma(t) for every pixel (VDM)
PIXEL_KINDS = ("polynomial", "pixel_monotone_net", "pixel_sigmoid")  # a gamma(z, t) per pixel (MuLAN)


@dataclass
class ScheduleConfig:
    """The noise schedule gamma(z, t) = log(sigma_t^2 / alpha_t^2)."""

    kind: Literal[
        "fixed_linear",  # VDM: gamma = gamma_min + (gamma_max - gamma_min) t
        "learned_linear",  # VDM: gamma = b + |w| t, both end points learned
        "monotone_net",  # VDM: scalar monotone network with learned end points
        "polynomial",  # MuLAN: per-pixel quintic with fixed end points (SPEC "noise schedule")
        "pixel_monotone_net",  # MuLAN ablation: per-pixel monotone network, fixed end points
        "pixel_sigmoid",  # MuLAN ablation: per-pixel sigmoid, fixed end points
    ] = "learned_linear"
    gamma_min: float = -13.3  # gamma at t=0 (initial value for learned end points)
    gamma_max: float = 5.0  # gamma at t=1 (initial value for learned end points)
    # per-pixel schedules: 'none' keeps gamma(0), gamma(1) fixed (the paper); 'scalar' learns both as learned VDM
    # does (gamma(0) = b, gamma(1) = b + |w|); 'pixel' learns one pair per pixel
    learn_ends: Literal["none", "scalar", "pixel"] = "none"
    pixel_mean: bool = False  # average a per-pixel schedule over pixels (the "scalar" ablation)
    adaptive: bool = True  # feed z to the schedule network; False feeds a constant (the "non-adaptive" ablation)
    decoder: Literal["dense", "conv", "lowrank"] = "conv"  # network mapping z to per-pixel coefficients
    hidden: int = 64  # 'conv': channels; 'lowrank': MLP width and rank ('dense' is the reference's, n units wide)
    monotone_features: int = 1024  # hidden units of the scalar monotone network ('monotone_net')
    pixel_features: int = 8  # sigmoid features per pixel of 'pixel_monotone_net'


@dataclass
class LatentConfig:
    """The auxiliary latent z inferred from x by an encoder (SPEC "The auxiliary latent")."""

    kind: Literal["none", "khot", "gaussian"] = "none"
    m: int = 16  # latent size
    k: int = 4  # ones in a k-hot z (khot only)
    noise: Literal["gumbel", "gamma"] = "gumbel"  # perturbation of the logits while training (khot)
    train_kl: Literal["surrogate", "strict"] = "surrogate"  # KL charged while training (evaluation is strict)
    encoder_channels: int = 32  # width of the convolutional encoder


@dataclass
class DenoiserConfig:
    """The VDM U-Net (no resampling; SPEC "The denoiser")."""

    channels: int = 128
    num_blocks: int = 32  # ResNet blocks on the way down; the way up has one more
    attention: bool = True  # attention in the middle block
    dropout: float = 0.1
    groups: int = 32  # GroupNorm groups (must divide `channels`)
    fourier_min: int = 6  # Fourier-feature input channels sin/cos(2^n * 2 pi * x), n in [min, max]
    fourier_max: int = 7  # set fourier_max < fourier_min to disable
    embedding_dim: int = 0  # conditioning width (0: 4 * channels)
    # what the network is told of the noise: 'mean' the pixel-mean of gamma (the paper, as VDM); 'map' also the
    # per-pixel gamma map, rescaled like the mean, as extra input channels
    gamma_input: Literal["mean", "map"] = "mean"
    # two extra input channels holding each pixel's row and column in [-1, 1] (CoordConv). A control: a per-pixel
    # gamma map also tells the network where each pixel is, which a U-Net without resampling hardly knows
    position_input: bool = False


@dataclass
class ModelConfig:
    """The diffusion model and its ELBO (SPEC "Negative ELBO")."""

    prediction: Literal["eps", "v"] = "eps"
    timesteps: int = 0  # 0: continuous-time diffusion loss; T > 0: discrete-time with T steps
    antithetic: bool = True  # low-discrepancy times t_i = (u + i/B) mod 1
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.01
    warmup_steps: int = 100
    ema_decay: float = 0.9999
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    schedule_lr_scale: float = 1.0  # the noise schedule's parameters learn at lr x this
    # AdamW's decoupled weight decay of the schedule's parameters; -1: train.weight_decay. AdamW multiplies it by
    # the group's learning rate, so at schedule_lr_scale s the schedule decays s times faster per step unless this
    # is weight_decay / s; learned ends (gamma(0), gamma(1)) decay toward 0
    schedule_weight_decay: float = -1.0
    seed: int = 0
    log_every: int = 25
    eval_every: int = 0  # evaluate the held-out ELBO every this many steps (0: only at the end)
    eval_images: int = 512  # images used by periodic evaluations (the final one uses the whole split)
    eval_time_points: int = 16  # S of periodic evaluations (the final one uses eval.time_points)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # last K periodic checkpoints kept besides `last.pt` and `best.pt`
    max_nonfinite: int = 20  # consecutive non-finite losses after which training stops
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ... (under torchrun each rank takes cuda:LOCAL_RANK)
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    accumulate: int = 1  # micro-batches per step: batch_size is split over ranks x accumulate
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # denoiser autocast; auto: bf16 on CUDA GPUs that support it
    compile: bool = False  # torch.compile the denoiser (slow to start; pays off on GPUs)
    channels_last: bool = False  # channels-last memory format for the denoiser's convolutions
    data_on_device: bool = True  # CUDA: keep the uint8 training set on the GPU (else copy each batch from the host)


@dataclass
class EvalConfig:
    """Held-out likelihood and sampling after training (and `mulan eval` / `mulan sample` defaults)."""

    time_points: int = 128  # S stratified times per image for the ELBO
    batch_size: int = 256
    ode_rtol: float = 1e-5  # probability-flow ODE: relative tolerance of the adaptive solver (per image)
    ode_atol: float = 1e-5  # ... and absolute tolerance
    ode_method: Literal["dopri5", "bosh3", "adaptive_heun"] = "dopri5"  # torchdiffeq adaptive solver
    ode_divergence: Literal["hutchinson", "exact"] = "hutchinson"  # exact: n backward passes (small n)
    ode_probes: int = 1  # Hutchinson probes, fixed within one solve
    ode_probe_dist: Literal["rademacher", "gaussian"] = "rademacher"
    ode_float64: bool = False  # solve in float64 (the model is converted for the evaluation)
    dequantization: Literal["truncnorm", "uniform"] = "truncnorm"  # q(x_0 | x) inside x's bin (i-DODE / uniform)
    dequant_samples: int = 1  # K importance samples per image: log mean_k p/q
    sample_steps: int = 1000  # T of the ancestral sampler
    num_samples: int = 64  # images in the sample grid


@dataclass
class Config:
    """Everything needed to build, train, evaluate and sample a model."""

    preset: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------------
# Dict round trip (checkpoints store the config as plain data)


def to_dict(cfg: Any) -> dict:
    """The config as nested plain dicts (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from :func:`to_dict` output, validating types; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value)
        else:
            kwargs[name] = _coerce(value, tp, name)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of ``cfg`` with ``section.field=value`` overrides applied, then validated; a setting given
    here that the resulting config would ignore is refused (:func:`refuse_ignored`)."""
    cfg = from_dict(Config, to_dict(cfg))
    given: dict[str, str] = {}  # key -> its text, as given
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=200)")
        *path, leaf = key.strip().split(".")
        node = cfg
        for part in path:
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key.strip())}")
            node = getattr(node, part)
        if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key.strip())}")
        tp = typing.get_type_hints(type(node))[leaf]
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.<field>=...")
        setattr(node, leaf, _parse(text.strip(), tp, key))
        given[key.strip()] = text.strip()
    validate(cfg)
    refuse_ignored(cfg, given)
    return cfg


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. 'train.steps', 'model.schedule.kind'."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _did_you_mean(key: str) -> str:
    """'; did you mean 'train.steps'?' for a near miss, else ''."""
    import difflib

    keys = config_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a right field in a wrong or misspelt section: train.time_points -> eval.time_points
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _parse(text: str, tp: Any, key: str) -> Any:
    """Parse an override's text as type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key} expects an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {text!r}") from None
    if tp is str:
        return text
    if origin is Literal:
        return _coerce(text, tp, key)
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        return _coerce([_parse(p.strip(), int, key) for p in parts], tp, key)
    raise ConfigError(f"{key} cannot be set from the command line")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly convert) a plain value against the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} expects a list of integers, got {value!r}")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key} expects {tp.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config) -> Config:
    """Raise :class:`ConfigError` naming the first out-of-range setting."""
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    s, lat, den = m.schedule, m.latent, m.denoiser

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(len(d.shape) == 3 and all(v > 0 for v in d.shape), f"data.shape must be three positive integers (C,H,W), got {d.shape}")
    need(2 <= d.num_values <= 65536, f"data.num_values must be in [2, 65536], got {d.num_values}")
    need(0.0 < d.test_fraction < 1.0, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    need(d.limit >= 0, f"data.limit must be >= 0, got {d.limit}")
    need(d.val_size >= 0, f"data.val_size must be >= 0, got {d.val_size}")
    need(math.isfinite(s.gamma_min) and math.isfinite(s.gamma_max), "schedule end points must be finite")
    need(s.gamma_min < s.gamma_max, f"model.schedule.gamma_min ({s.gamma_min}) must be below gamma_max ({s.gamma_max})")
    need(s.hidden > 0 and s.monotone_features > 0 and s.pixel_features > 0,
         "model.schedule.hidden, monotone_features and pixel_features must be positive")
    need(m.timesteps >= 0, f"model.timesteps must be >= 0 (0 = continuous time), got {m.timesteps}")
    need(lat.m >= 1, f"model.latent.m must be >= 1, got {lat.m}")
    if lat.kind == "khot":
        need(1 <= lat.k < lat.m, f"model.latent.k must satisfy 1 <= k < m, got k={lat.k}, m={lat.m}")
    need(lat.encoder_channels > 0, "model.latent.encoder_channels must be positive")
    need(den.channels > 0 and den.num_blocks >= 0, "model.denoiser.channels must be positive and num_blocks >= 0")
    need(den.groups > 0 and den.channels % den.groups == 0,
         f"model.denoiser.groups ({den.groups}) must divide channels ({den.channels})")
    need(0.0 <= den.dropout < 1.0, f"model.denoiser.dropout must be in [0, 1), got {den.dropout}")
    need(den.embedding_dim >= 0, "model.denoiser.embedding_dim must be >= 0")
    need(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be positive, got {t.lr}")
    need(t.schedule_lr_scale > 0 and math.isfinite(t.schedule_lr_scale),
         f"train.schedule_lr_scale must be positive, got {t.schedule_lr_scale}")
    need(0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0, "train.beta1 and train.beta2 must be in [0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    need(t.schedule_weight_decay >= 0 or t.schedule_weight_decay == -1,
         f"train.schedule_weight_decay must be >= 0, or -1 for train.weight_decay; got {t.schedule_weight_decay}")
    need(t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
    need(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    need(t.grad_clip >= 0, "train.grad_clip must be >= 0")
    need(t.log_every >= 1 and t.eval_every >= 0 and t.checkpoint_every >= 1,
         "train.log_every and train.checkpoint_every must be >= 1, train.eval_every >= 0")
    need(t.eval_images >= 1 and t.eval_time_points >= 1 and t.keep_checkpoints >= 0 and t.max_nonfinite >= 1,
         "train.eval_images, eval_time_points and max_nonfinite must be >= 1, train.keep_checkpoints >= 0")
    need(t.threads >= 0, "train.threads must be >= 0")
    need(t.accumulate >= 1, f"train.accumulate must be >= 1, got {t.accumulate}")
    need(t.batch_size % t.accumulate == 0,
         f"train.batch_size ({t.batch_size}) must be divisible by train.accumulate ({t.accumulate})")
    for name in ("time_points", "batch_size", "sample_steps", "num_samples"):
        need(getattr(e, name) >= 1, f"eval.{name} must be >= 1, got {getattr(e, name)}")
    need(e.ode_rtol > 0 and e.ode_atol > 0, "eval.ode_rtol and eval.ode_atol must be positive")
    need(e.ode_probes >= 1 and e.dequant_samples >= 1, "eval.ode_probes and eval.dequant_samples must be >= 1")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Settings that would have no effect


def ignored_settings(cfg: Config) -> dict[str, str]:
    """The settings that ``cfg`` ignores, given its kinds (dotted key -> why), whatever their values."""
    d, s, lat, e = cfg.data, cfg.model.schedule, cfg.model.latent, cfg.eval
    why: dict[str, str] = {}
    if s.kind in SCALAR_KINDS:
        ends = {"fixed_linear": "fixed", "learned_linear": "always learned", "monotone_net": "always learned"}[s.kind]
        why["model.schedule.learn_ends"] = (f"model.schedule.kind={s.kind} is a scalar schedule whose ends are {ends}; "
                                            f"learn_ends applies to the per-pixel kinds ({', '.join(PIXEL_KINDS)})")
        for name in ("pixel_mean", "adaptive", "decoder", "hidden"):
            why[f"model.schedule.{name}"] = (f"model.schedule.kind={s.kind} is a scalar schedule; {name} applies to "
                                             f"the per-pixel kinds ({', '.join(PIXEL_KINDS)})")
    else:
        if lat.kind == "none":
            why["model.schedule.adaptive"] = "there is no latent (model.latent.kind=none) to feed the schedule"
        if s.decoder == "dense":
            why["model.schedule.hidden"] = "model.schedule.decoder=dense is as wide as the image (C*H*W units)"
    if s.kind != "monotone_net":
        why["model.schedule.monotone_features"] = f"it sizes kind=monotone_net, not kind={s.kind}"
    if s.kind != "pixel_monotone_net":
        why["model.schedule.pixel_features"] = f"it sizes kind=pixel_monotone_net, not kind={s.kind}"
    if s.kind == "fixed_linear":
        for name in ("schedule_lr_scale", "schedule_weight_decay"):
            why[f"train.{name}"] = "model.schedule.kind=fixed_linear has no parameters to train"
    if lat.kind == "none":
        for name in ("m", "k", "noise", "train_kl", "encoder_channels"):
            why[f"model.latent.{name}"] = "there is no latent (model.latent.kind=none)"
    elif lat.kind == "gaussian":
        for name in ("k", "noise", "train_kl"):
            why[f"model.latent.{name}"] = ("it applies to the k-hot latent; a gaussian one is reparameterised and "
                                           "its KL analytic")
    if e.ode_divergence == "exact":
        for name in ("ode_probes", "ode_probe_dist"):
            why[f"eval.{name}"] = "eval.ode_divergence=exact draws no Hutchinson probes"
    own_test = ("synthetic", "cifar10", "fashion-mnist")  # datasets that bring their own test split
    if d.name in own_test:
        why["data.test_path"] = why["data.test_fraction"] = f"data.name={d.name} has its own test split"
    if d.name in ("digits", "synthetic"):
        why["data.path"] = why["data.test_path"] = f"data.name={d.name} reads no files"
    elif d.test_path and d.name in ("idx", "png", "imagenet32"):
        why["data.test_fraction"] = "data.test_path holds the test images: nothing is split off"
    return why


def refuse_ignored(cfg: Config, given: dict[str, str]) -> None:
    """Raise :class:`ConfigError` (one line naming the key) when a setting given explicitly (``given``: key ->
    its text) with a value other than its default is one ``cfg`` ignores (:func:`ignored_settings`): every
    setting acts or is refused. Defaults pass, so a config can always restate them."""
    ignored = ignored_settings(cfg)
    for key, text in given.items():
        if key in ignored:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            if value != _default(key):
                raise ConfigError(f"{key}={text} would be ignored: {ignored[key]}")


def _default(key: str) -> Any:
    """The dataclass default of a dotted key."""
    cls: Any = Config
    *path, leaf = key.split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    f = next(f for f in dataclasses.fields(cls) if f.name == leaf)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()
