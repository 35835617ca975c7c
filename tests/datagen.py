"""Small, learnable stand-ins for the real data sets, written in their real file formats.

Each class is a fixed random template plus per-image noise, so a tiny model learns it in a few steps
and tests of training behaviour (accuracy rises, resume is exact) mean something without the real data.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _smooth_templates(classes: int, shape: tuple[int, ...], cell: int = 4) -> np.ndarray:
    """One template per class: random levels on a grid of cell x cell pixel blocks, so a class stays
    recognisable after the small shifts and flips of training augmentation (as real images do)."""
    h, w = shape[0], shape[1]
    coarse = np.random.default_rng(classes).uniform(
        0, 255, size=(classes, -(-h // cell), -(-w // cell), *shape[2:]))
    return coarse.repeat(cell, axis=1).repeat(cell, axis=2)[:, :h, :w]


def class_images(
    counts: list[int], shape: tuple[int, ...], seed: int, noise: float = 20.0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of the given shape (H, W[, channels]), counts[c] of class c (smooth template of
    class c + per-pixel noise), and their labels, shuffled with `seed`. The templates depend only on
    the number of classes, so a train and a test split made with different seeds share them."""
    templates = _smooth_templates(len(counts), shape)
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


def write_image_tree(
    folder: Path,
    counts: list[int],
    classes: list[str] | None = None,
    size: int = 12,
    seed: int = 0,
    ext: str = "png",
) -> list[tuple[str, int]]:
    """A class-per-folder tree `folder/<class>/<i>.<ext>` of RGB images, counts[c] of class c (named
    classes[c], default "class<c>"); returns the (path relative to `folder`, label) of each image.
    PNG keeps the pixels exact; "jpg" writes JPEG as real data sets ship."""
    names = classes or [f"class{c}" for c in range(len(counts))]
    images, labels = class_images(counts, (size, size, 3), seed)
    written, seen = [], [0] * len(counts)
    for image, label in zip(images, labels):
        rel = f"{names[label]}/{seen[label]:04d}.{ext}"
        seen[label] += 1
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / rel)
        written.append((rel, int(label)))
    return written


def write_file_list_set(
    root: Path, train_counts: list[int], test_per_class: int, size: int = 20, val_per_class: int = 2
) -> Path:
    """A miniature of the ImageNet-LT / Places-LT / iNaturalist format in `root`: JPEG images under
    `images/{train,val,test}/<class>/` and the list files train.txt, val.txt, test.txt of
    `relative/path label` lines (paths relative to `root`, in shuffled order); returns `root`."""
    rng = np.random.default_rng(7)
    splits = {"train": train_counts, "val": [val_per_class] * len(train_counts),
              "test": [test_per_class] * len(train_counts)}
    for seed, (split, counts) in enumerate(splits.items()):
        base = root / "images" / split
        lines = [f"images/{split}/{rel} {label}"
                 for rel, label in write_image_tree(base, counts, None, size, seed, "jpg")]
        rng.shuffle(lines)
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
