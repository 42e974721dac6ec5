"""Distances between two sets of feature vectors: the Fréchet distance, precision and recall, class histograms.

- Fréchet distance between the Gaussians fitted to two sets (SPEC "Quality offline"):
  ``FD = ||mu_1 - mu_2||^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2})``. The trace of the matrix square
  root is computed as tr (S_1^{1/2} Sigma_2 S_1^{1/2})^{1/2}, whose argument is symmetric positive semi-definite, so
  it is the sum of the square roots of its eigenvalues (no general matrix square root needed).
- Precision and recall on k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019): each set's manifold is the
  union of balls around its points with radius the distance to the point's k-th nearest neighbour in the same
  set; precision is the fraction of generated points inside the real manifold, recall the fraction of real
  points inside the generated one.

Everything is float64; features are (N, d) tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 2048  # rows per block of pairwise distances


def gaussian_fit(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and covariance (d, d) (unbiased, N - 1) of features (N, d), float64."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(f.shape[0] - 1, 1)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0 clipped)."""
    vals, vecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^{1/2}) between two Gaussians."""
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt
    return float(value.clamp_min(0))


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances (len(a), len(b)), float64, computed in blocks of rows."""
    a, b = a.double(), b.double()
    return torch.cat([torch.cdist(a[i:i + CHUNK], b) for i in range(0, a.shape[0], CHUNK)])


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded), (N,)."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k={k} needs 1 <= k < the number of points ({features.shape[0]})")
    radii = [torch.cdist(features[i:i + CHUNK].double(), features.double()).kthvalue(k + 1, dim=1).values
             for i in range(0, features.shape[0], CHUNK)]
    return torch.cat(radii)


def inside(distances: Tensor, radii: Tensor) -> Tensor:
    """(Q, R) bool: query q lies in the ball of reference point r (distances (Q, R), radii (R,))."""
    return distances <= radii[None, :]


def class_histogram(predicted: Tensor, classes: int) -> Tensor:
    """Fraction of points per predicted class, (classes,) float64."""
    return torch.bincount(predicted, minlength=classes).double() / max(predicted.numel(), 1)


def total_variation(p: Tensor, q: Tensor) -> float:
    """1/2 sum |p - q| between two histograms."""
    return float(0.5 * (p - q).abs().sum())
