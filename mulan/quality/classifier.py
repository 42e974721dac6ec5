"""The feature network of the quality score: a small CNN classifier per labelled dataset, trained here.

Public FID needs downloaded Inception weights; this score instead uses a classifier trained by the project,
deterministically (fixed seed, fixed order), on the dataset's training split only (never its validation or test
images). Its weights are cached under ``cache_dir()`` ($MULAN_CACHE, else ~/.cache/mulan) in a file named by the
sha256 of everything that determines them (recipe, images, labels), and identified in every score by the sha256
of the weights file; a cached file whose sha256 differs from the one recorded beside it is retrained.

Architecture: two stages of 3x3 conv + ReLU + 2x2 max-pool (32, then 64 channels), a 128-unit ReLU layer (the
features), a linear layer to the classes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.checkpoint import atomic_write
from mulan.config import DataConfig
from mulan.data.labels import LABELLED, Labelled, load_labelled
from mulan.diffusion import encode
from mulan.errors import OutputError

CACHE_ENV = "MULAN_CACHE"
FEATURES = 128
BATCH = 1000  # images per forward pass when extracting features


@dataclass(frozen=True)
class Recipe:
    """How the classifier is trained (part of its cache key)."""

    epochs: int
    batch_size: int = 128
    lr: float = 1e-3  # Adam, cosine-decayed to 0
    seed: int = 0
    version: int = 1  # bump when the architecture or training loop changes


RECIPES = {"digits": Recipe(epochs=40), "fashion-mnist": Recipe(epochs=6)}


def cache_dir(override: str | Path | None = None) -> Path:
    """Where classifier weights live: ``override``, else $MULAN_CACHE, else ~/.cache/mulan."""
    return Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mulan").expanduser()


class Classifier(nn.Module):
    """Images x_tilde (B, C, H, W) in [-1, 1] -> class logits; :meth:`features` gives the 128-d penultimate layer."""

    def __init__(self, shape: tuple[int, ...], classes: int):
        super().__init__()
        c, h, w = shape
        self.convs = nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.hidden = nn.Linear(64 * (h // 4) * (w // 4), FEATURES)
        self.out = nn.Linear(FEATURES, classes)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.hidden(self.convs(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


@dataclass
class Trained:
    """A classifier ready to score, with what identifies it."""

    net: Classifier
    num_values: int
    sha256: str  # of the weights file
    test_accuracy: float  # on the dataset's test split
    path: Path

    @torch.no_grad()
    def features_and_classes(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 128) float64 features and (N,) predicted classes of integer images (N, C, H, W) in 0..V-1."""
        feats, classes = [], []
        for i in range(0, images.shape[0], BATCH):
            f = self.net.features(encode(images[i:i + BATCH], self.num_values))
            feats.append(f.double())
            classes.append(self.net.out(f).argmax(1))
        return torch.cat(feats), torch.cat(classes)


def _key(data: dict[str, Labelled], recipe: Recipe) -> str:
    train = data["train"]
    parts = {"recipe": asdict(recipe), "images": train.images.fingerprint()["sha256"],
             "labels": hashlib.sha256(train.labels.numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def train_classifier(train: Labelled, classes: int, recipe: Recipe) -> Classifier:
    """Train on ``train`` only, deterministically: seeded initialisation and a seeded shuffle every epoch."""
    torch.manual_seed(recipe.seed)
    net = Classifier(tuple(train.images.images.shape[1:]), classes)
    x = encode(train.images.images, train.images.num_values)
    y = train.labels
    gen = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = -(-x.shape[0] // recipe.batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs * steps_per_epoch)
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_or_train(cfg: DataConfig, cache: str | Path | None = None, *, log=print) -> Trained:
    """The classifier of dataset ``cfg.name`` from the cache, trained (and cached) first when missing."""
    data = load_labelled(cfg)
    recipe, classes = RECIPES[cfg.name], LABELLED[cfg.name]
    folder = cache_dir(cache)
    key = _key(data, recipe)
    path = folder / f"classifier-{cfg.name}-{key[:16]}.pt"
    meta_path = path.with_suffix(".json")
    shape = tuple(cfg.shape)
    net = Classifier(shape, classes)
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") == _sha256(path):
            net.load_state_dict(torch.load(path, weights_only=True))
            return Trained(net.eval(), cfg.num_values, meta["sha256"], meta["test_accuracy"], path)
        log(f"cached classifier {path} does not match its recorded sha256; training it again")
    log(f"training the {cfg.name} classifier on {len(data['train'].images)} training images "
        f"({recipe.epochs} epochs); it is cached in {folder}")
    net = train_classifier(data["train"], classes, recipe)
    trained = Trained(net, cfg.num_values, "", 0.0, path)
    _, predicted = trained.features_and_classes(data["test"].images.images)
    accuracy = float((predicted == data["test"].labels).double().mean())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(net.state_dict(), f))
        trained.sha256 = _sha256(path)
        meta = {"sha256": trained.sha256, "test_accuracy": accuracy, "dataset": cfg.name, "recipe": asdict(recipe),
                "train_images": len(data["train"].images), "test_images": len(data["test"].images), "key": key}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    except OSError as e:
        raise OutputError(f"cannot write the classifier cache in {folder}: {e.strerror or e}") from None
    trained.test_accuracy = accuracy
    return trained
