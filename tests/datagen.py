"""Small, learnable stand-ins for the real data sets, written in their real file formats.

Each class is a fixed random template plus per-image noise, so a tiny model learns it in a few steps
and tests of training behaviour (accuracy rises, resume is exact) mean something without the real data.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def class_images(
    counts: list[int], shape: tuple[int, ...], seed: int, noise: float = 60.0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of the given shape, counts[c] of class c (template of class c + noise), and their
    labels, shuffled with `seed`. The templates depend only on the number of classes, so a train and
    a test split made with different seeds share them."""
    templates = np.random.default_rng(len(counts)).uniform(0, 255, size=(len(counts), *shape))
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c, dtype=np.uint8) for c, n in enumerate(counts)])
    rng.shuffle(labels)
    images = templates[labels] + rng.normal(0, noise, size=(len(labels), *shape))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))


def write_fashion_mnist(folder: Path, train_per_class: int = 300, test_per_class: int = 40) -> Path:
    """Fashion-MNIST-format IDX files (10 classes, 28x28) in `folder`; returns `folder`.

    Load them with a per-class limit (``data.limit_per_class``), since the reader refuses a file of
    another size than the official one otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
        images, labels = class_images([per_class] * 10, (28, 28), seed)
        image_name, label_name = IDX_NAMES[split]
        _write_idx(folder / image_name, images)
        _write_idx(folder / label_name, labels)
    return folder
