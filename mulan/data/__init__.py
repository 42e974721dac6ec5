"""Datasets: uint8 images (N, C, H, W) with V = ``num_values`` values per pixel, split into train and test.

``load_splits(cfg.data)`` reads any supported format (digits, idx, fashion-mnist, cifar10, imagenet32,
png, synthetic), checks it against the config and returns two :class:`ImageDataset` objects whose
``fingerprint()`` identifies exactly the images used; with ``data.val_size`` the training split loses that many
images to a validation split (``load_split(cfg.data, "val")``, ``load_all_splits``). ``read_input`` reads the images
a user hands to a command (a PNG folder, IDX file or .npz, or a split).
"""

from mulan.data.dataset import ImageDataset
from mulan.data.idx import FASHION_MNIST_DIR
from mulan.data.inputs import read_input
from mulan.data.load import SPLITS, load_all_splits, load_split, load_splits

__all__ = ["FASHION_MNIST_DIR", "SPLITS", "ImageDataset", "load_all_splits", "load_split", "load_splits", "read_input"]
