"""The sample-quality score of a set of images against a labelled dataset's test split, beside its noise floor.

``score(images, cfg)`` extracts the classifier's features (:mod:`mulan.quality.classifier`) of the images and of
the test split and reports, each with a 95% percentile bootstrap interval over the scored images (a resample's duplicated images narrow its
covariance, so the Fréchet distance's interval leans above the value; compare intervals at equal image counts):

- ``fd``: the Fréchet distance of the features to the test split's (lower is better);
- ``precision`` / ``recall`` on k-NN manifolds (higher is better); the bootstrap keeps each point's radius from
  the whole set and resamples which scored points are present (a resample holds about 63% distinct points, so
  recall, a union over them, would shift down: its interval is the bootstrap over the test points' coverage
  instead);
- ``class_tv``: the total-variation distance between the histogram of predicted classes and the test split's
  label histogram (lower is better; 0 when every class is as frequent as in the data).

The **floor** is the same score for as many training images as there are scored images (all of them if there
are fewer): what a perfect sampler would get with that many images. A score is only meaningful beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mulan.config import DataConfig
from mulan.data.labels import CLASS_NAMES, LABELLED, load_labelled
from mulan.quality import metrics
from mulan.quality.classifier import Trained, load_or_train

METRICS = {  # name -> (description, better)
    "fd": ("Fréchet distance of classifier features to the test split", "lower"),
    "precision": ("fraction of images on the test split's k-NN feature manifold", "higher"),
    "recall": ("fraction of test images on the scored images' k-NN feature manifold", "higher"),
    "class_tv": ("total variation between predicted-class and test-label histograms", "lower"),
}


@dataclass
class Estimate:
    """A number and its 95% percentile bootstrap interval."""

    value: float
    lo: float
    hi: float

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


@dataclass
class SetScore:
    """Every metric of one scored set, and its class histogram."""

    count: int
    metrics: dict[str, Estimate]
    histogram: list[float]


@dataclass
class ScoreReport:
    """The score of the samples and of the floor (training images), with what identifies the setting."""

    dataset: str
    samples: SetScore
    floor: SetScore
    reference: int  # test images
    classifier_sha256: str
    classifier_accuracy: float
    k: int
    bootstrap: int
    seed: int
    class_names: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        s, f = self.samples, self.floor
        out = [f"quality of {s.count} images against the {self.dataset} test split ({self.reference} images); "
               f"classifier sha256 {self.classifier_sha256[:16]}... (test accuracy {100 * self.classifier_accuracy:.1f}%); "
               f"95% bootstrap intervals over the scored images ({self.bootstrap} resamples, seed {self.seed}); "
               f"k = {self.k}",
               f"{'metric':<10} {'samples':>26}   {f'floor: {f.count} training images':>32}"]
        for name, (_, better) in METRICS.items():
            out.append(f"{name:<10} {s.metrics[name].text():>26}   {f.metrics[name].text():>32}   ({better} is better)")
        hist = ", ".join(f"{n} {100 * p:.0f}%" for n, p in zip(self.class_names, s.histogram))
        out.append(f"predicted classes of the samples: {hist}")
        return out

    def as_dict(self) -> dict:
        def one(x: SetScore) -> dict:
            return {"count": x.count, "histogram": x.histogram,
                    **{k: {"value": e.value, "lo": e.lo, "hi": e.hi} for k, e in x.metrics.items()}}

        return {"dataset": self.dataset, "samples": one(self.samples), "floor": one(self.floor),
                "reference_images": self.reference, "classifier_sha256": self.classifier_sha256,
                "classifier_test_accuracy": self.classifier_accuracy, "k": self.k, "bootstrap": self.bootstrap,
                "seed": self.seed, "class_names": self.class_names}


@dataclass
class Reference:
    """The test split's features, fitted Gaussian, k-NN radii and label histogram."""

    features: Tensor
    mu: Tensor
    cov: Tensor
    radii: Tensor
    histogram: Tensor


def reference_of(features: Tensor, labels: Tensor, classes: int, k: int) -> Reference:
    mu, cov = metrics.gaussian_fit(features)
    return Reference(features, mu, cov, metrics.knn_radii(features, k), metrics.class_histogram(labels, classes))


def score_features(features: Tensor, classes: Tensor, ref: Reference, *, k: int = 3, bootstrap: int = 200,
                   generator: torch.Generator | None = None) -> SetScore:
    """Every metric of a scored set (features (N, d), predicted classes (N,)) against ``ref``, with intervals."""
    n = features.shape[0]
    num_classes = ref.histogram.numel()
    d_to_ref = metrics.pairwise_distances(features, ref.features)  # (N, R)
    on_real = metrics.inside(d_to_ref, ref.radii).any(1)  # precision per scored point
    covers = metrics.inside(d_to_ref.T, metrics.knn_radii(features, k))  # (R, N): real r in the ball of point j

    covered = covers.any(1).double()  # (R,) test points on the scored manifold
    r = covered.numel()

    def all_metrics(idx: Tensor, ref_idx: Tensor) -> dict[str, float]:
        mu, cov = metrics.gaussian_fit(features[idx])
        return {"fd": metrics.frechet_distance(mu, cov, ref.mu, ref.cov),
                "precision": float(on_real[idx].double().mean()),
                "recall": float(covered[ref_idx].mean()),
                "class_tv": metrics.total_variation(metrics.class_histogram(classes[idx], num_classes), ref.histogram)}

    point = all_metrics(torch.arange(n), torch.arange(r))
    draws = [all_metrics(torch.randint(n, (n,), generator=generator), torch.randint(r, (r,), generator=generator))
             for _ in range(bootstrap)]
    estimates = {}
    for name, value in point.items():
        values = torch.tensor([d[name] for d in draws], dtype=torch.float64)
        q_lo, q_hi = (torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                      if bootstrap > 1 else (value, value))
        estimates[name] = Estimate(value, q_lo, q_hi)
    return SetScore(n, estimates, metrics.class_histogram(classes, num_classes).tolist())


def check_images(images: Tensor, cfg: DataConfig, num_values: int, what: str) -> None:
    """ValueError (one line) unless ``images`` are (N, C, H, W) of the dataset's shape with values in 0..V-1."""
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(cfg.shape):
        raise ValueError(f"{what} has images of shape {tuple(images.shape[1:])}, but {cfg.name} images are "
                         f"{tuple(cfg.shape)}")
    if num_values != cfg.num_values:
        raise ValueError(f"{what} has num_values={num_values}, but {cfg.name} has {cfg.num_values}")
    if images.shape[0] < 2:
        raise ValueError(f"{what} holds {images.shape[0]} image(s); the score needs at least 2")
    if int(images.min()) < 0 or int(images.max()) >= num_values:
        raise ValueError(f"{what} has values outside 0..{num_values - 1}")


def score(images: Tensor, cfg: DataConfig, *, cache=None, k: int = 3, bootstrap: int = 200, seed: int = 0,
          classifier: Trained | None = None, log=print) -> ScoreReport:
    """The score of integer images (N, C, H, W) in 0..V-1 against the test split of dataset ``cfg``, with its floor.

    ``cfg`` names a labelled dataset (:data:`mulan.data.labels.LABELLED`) and how it is split. ``k`` must be below
    the number of scored images. Raises ValueError (one line) for images that do not fit the dataset.
    """
    if cfg.name not in LABELLED:
        raise ValueError(f"the score needs a labelled dataset ({', '.join(LABELLED)}), not {cfg.name!r}")
    check_images(images, cfg, cfg.num_values, "the scored set")
    if not 1 <= k < images.shape[0]:
        raise ValueError(f"k={k}: must be >= 1 and below the number of scored images ({images.shape[0]})")
    net = classifier or load_or_train(cfg, cache, log=log)
    data = load_labelled(cfg)
    ref_feats, _ = net.features_and_classes(data["test"].images.images)
    ref = reference_of(ref_feats, data["test"].labels, LABELLED[cfg.name], k)
    gen = torch.Generator().manual_seed(seed)
    feats, classes = net.features_and_classes(images)
    samples = score_features(feats, classes, ref, k=k, bootstrap=bootstrap, generator=gen)
    train = data["train"].images.images
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[: images.shape[0]]
    floor_feats, floor_classes = net.features_and_classes(train[pick.sort().values])
    floor = score_features(floor_feats, floor_classes, ref, k=k, bootstrap=bootstrap, generator=gen)
    return ScoreReport(cfg.name, samples, floor, len(data["test"].images), net.sha256, net.test_accuracy, k,
                       bootstrap, seed, CLASS_NAMES[cfg.name])
