"""File-list data sets and their streaming loader: images too many to hold in memory.

The large long-tailed benchmarks ship as an image tree plus text files with one
``relative/path label`` line per image, one file per split; the lists define the long tail, nothing
is re-sampled (Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an Open World", for
ImageNet-LT and Places-LT; the same form serves iNaturalist 2018). :func:`read_file_list` reads any
such list, :class:`FileList` holds its paths and labels (never the pixels), and
:class:`StreamingLoader` decodes the images lazily in DataLoader worker processes, so memory stays
bounded by the batches in flight (``workers x 2`` batches), not by the data set.

Augmentation is the standard ImageNet one, written here with Pillow: for training a random
resized crop (area fraction in [0.08, 1], aspect ratio in [3/4, 4/3], Szegedy et al. 2015) and a
horizontal flip; for evaluation a resize of the shorter side to ``resize`` (256 for 224 crops) and a
center crop. Every image's randomness comes from a seed derived from (seed, epoch, image index) in
the main process, so a run sees the same crops whatever the number of workers, and a resumed run
sees exactly the images an uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from samkit.data.readers import (
    IMAGE_EXTENSIONS,
    decompression_bomb_error,
    decompression_bombs_as_errors,
)
from samkit.data.transforms import _ORDER_STREAM, _derived_seed, normalize

__all__ = [
    "FILE_LIST_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "FileList",
    "Preset",
    "StreamingDataset",
    "StreamingLoader",
    "center_crop_box",
    "load_file_list",
    "random_resized_crop_box",
    "read_file_list",
    "scan_class_folders",
]

PathLike = str | os.PathLike

#: Per-channel mean and std of ImageNet's training set, the usual normalisation of these sets.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_SAMPLE_STREAM = 2  # derived-seed stream of per-image augmentation (0, 1: see transforms.py)


@dataclass(frozen=True)
class Preset:
    """A published file-list benchmark: its list files (relative to the data root), its number of
    classes and training images (PROTOCOLS.md)."""

    train_list: str
    val_list: str
    test_list: str
    num_classes: int
    train_images: int


#: The benchmarks known by name (``data.name``); their list files as the authors ship them.
PRESETS: dict[str, Preset] = {
    "imagenet-lt": Preset("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt",
                          1000, 115_846),
    "places-lt": Preset("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt",
                        365, 62_500),
    # iNaturalist 2018 has no public test labels: its validation set is the test set.
    "inat2018": Preset("iNaturalist18_train.txt", "iNaturalist18_val.txt",
                       "iNaturalist18_val.txt", 8142, 437_513),
}
#: ``data.name`` values served by the streaming path: any list ("filelist") and the presets.
FILE_LIST_NAMES: tuple[str, ...] = ("filelist", *PRESETS)


def read_file_list(path: PathLike) -> tuple[list[str], list[int]]:
    """The (paths, labels) of a list file: one ``relative/path label`` line per image.

    Blank lines and lines starting with ``#`` are skipped; the label is the last field, so a
    path may hold spaces. Labels are integers >= 0.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on a line that is not ``path label`` (the message gives file and line), or an
            empty list.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist; give the path of a text file "
                                "of 'relative/path label' lines")
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{number}: expected 'relative/path label' with an integer "
                                 f"label >= 0, got {line[:80]!r}")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"{path} lists no image; it should hold 'relative/path label' lines")
    return paths, labels


@dataclass(frozen=True)
class FileList:
    """The images of one split as paths and labels (the pixels stay on disk).

    Attributes:
        root: the folder the paths are relative to.
        paths: one path per image, relative to ``root`` (a leading "/" is taken as relative too).
        labels: int64 (N,), in [0, len(classes)).
        classes: class names, index = label.
        source: which list it came from and what was done to it, to be recorded with results.
    """

    root: Path
    paths: tuple[str, ...]
    labels: torch.Tensor
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)

    def class_counts(self) -> list[int]:
        """Number of images of each class, in label order."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: Sequence[int], note: str = "") -> FileList:
        """The images at ``indices`` (in that order); ``note`` is appended to ``source``."""
        index = [int(i) for i in indices]
        source = f"{self.source}; {note}" if note else self.source
        return replace(self, paths=tuple(self.paths[i] for i in index),
                       labels=self.labels[torch.tensor(index, dtype=torch.int64)], source=source)

    def relabel(self, order: Sequence[int], note: str = "") -> FileList:
        """The same images with class ``order[k]`` renamed to class k (e.g. head first)."""
        rank = torch.empty(len(order), dtype=torch.int64)
        rank[torch.as_tensor(list(order))] = torch.arange(len(order))
        source = f"{self.source}; {note}" if note else self.source
        return replace(self, labels=rank[self.labels], classes=[self.classes[o] for o in order],
                       source=source)


def _class_names(paths: Sequence[str], labels: Sequence[int], num_classes: int) -> list[str]:
    """Each class's name: the one parent folder all its images share, else its label number."""
    parents: list[set[str]] = [set() for _ in range(num_classes)]
    for p, label in zip(paths, labels, strict=True):
        parents[label].add(Path(p).parent.name)
    return [next(iter(s)) if len(s) == 1 and next(iter(s)) else str(c)
            for c, s in enumerate(parents)]


def load_file_list(
    list_file: PathLike,
    root: PathLike,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
) -> FileList:
    """A :class:`FileList` from a list file whose paths are relative to ``root``.

    ``list_file`` is taken relative to ``root`` when it is not found as given. The number of
    classes is ``num_classes`` (a preset's), else ``len(classes)``, else the largest label + 1;
    class names are ``classes`` if given, else each class's image folder when all its images
    share one, else the label number. Whether the images exist is checked when they are read.

    Raises:
        FileNotFoundError: if the list file or ``root`` is missing.
        ValueError: on a malformed list or a label out of range.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a folder; give the folder the list's "
                                "image paths are relative to")
    path = Path(list_file).expanduser()
    if not path.is_file() and not path.is_absolute():
        path = root / path
    paths, labels = read_file_list(path)
    top = max(labels)
    count = num_classes if num_classes is not None else (
        len(classes) if classes is not None else top + 1)
    if top >= count:
        raise ValueError(f"{path} has label {top} but the data set has {count} classes (labels 0 to "
                         f"{count - 1}); is it the list of another data set?")
    names = list(classes) if classes is not None else _class_names(paths, labels, count)
    return FileList(root, tuple(p.lstrip("/") for p in paths),
                    torch.tensor(labels, dtype=torch.int64), names, f"file list {path}")


def scan_class_folders(root: PathLike) -> FileList:
    """A :class:`FileList` of a class-per-folder tree ``root/<class>/<image>`` (sorted class names
    are the labels, files in sorted order), to stream images of any size without list files.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        ValueError: if no class folder holds an image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of class folders (<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f.name for f in (root / name).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        paths.extend(f"{name}/{f}" for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise ValueError(f"{root} has no class folder with images ({', '.join(IMAGE_EXTENSIONS)})")
    return FileList(root, tuple(paths), torch.tensor(labels, dtype=torch.int64), classes,
                    f"class folders {root}")


# --------------------------------------------------------------------------------------------
# Transforms (Pillow)
# --------------------------------------------------------------------------------------------


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering a fraction in ``scale`` of the image
    area with an aspect ratio (width / height) in ``ratio``, log-uniform (Szegedy et al. 2015).

    Ten draws are tried; if none fits, the largest centered crop with the ratio clamped into
    ``ratio`` is used.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, size: int, resize: int) -> tuple[float, ...]:
    """(left, top, right, bottom), in the image's own pixels, of the ``size`` x ``size`` center
    crop taken after resizing the shorter side to ``resize``: one resize of this box gives the
    crop directly."""
    side = size * min(width, height) / resize
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


class StreamingDataset(torch.utils.data.Dataset):
    """The decoded, augmented images of a :class:`FileList`, one at a time, for a DataLoader.

    Items are indexed by ``(index, seed)`` pairs (what :class:`StreamingLoader` samples), the seed
    driving the image's random crop and flip; ``dataset[i]`` alone uses seed 0. An item is
    ``(uint8 tensor (3, size, size), label)``.

    Args:
        files: the images.
        size: side of the square crops (224 for the ImageNet protocols).
        train: random resized crop + flip; else resize + center crop.
        resize: shorter side before the evaluation crop (default size / 0.875: 256 for 224).
    """

    def __init__(self, files: FileList, size: int = 224, train: bool = True,
                 resize: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.files = files
        self.size = int(size)
        self.train = train
        self.resize = int(resize) if resize is not None else round(size / 0.875)

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, index: int) -> Image.Image:
        file = self.files.root / self.files.paths[index]
        try:
            with decompression_bombs_as_errors(), Image.open(file) as image:
                if not self.train and image.format == "JPEG":
                    w, h = image.size
                    k = self.resize / min(w, h)  # decode at a reduced scale when that is enough
                    image.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
                return image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise decompression_bomb_error(f"{file} (from {self.files.source})", exc) from None
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{file} (line {index + 1} of {self.files.source}) does not exist; data.root must "
                "be the folder the list's paths are relative to") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{file} (from {self.files.source}) is not a readable image ({exc}); "
                             "replace it or remove its line from the list") from None

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = (item, 0) if isinstance(item, int) else item
        image = self._open(int(index))
        out = (self.size, self.size)
        if self.train:
            rng = np.random.default_rng(seed)
            box = random_resized_crop_box(*image.size, rng)
            image = image.resize(out, Image.BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            box = center_crop_box(*image.size, self.size, self.resize)
            image = image.resize(out, Image.BILINEAR, box=box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        return pixels.permute(2, 0, 1), int(self.files.labels[index])


class _Batches:
    """The batch sampler a DataLoader asks for each pass: the loader's remaining batches."""

    def __init__(self, loader: StreamingLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.loader._plan()

    def __len__(self) -> int:
        return len(self.loader) - self.loader.position


class StreamingLoader:
    """Batches of a :class:`StreamingDataset` on ``device``: decoded by ``workers`` processes,
    converted to float (divided by 255) and normalised with ``mean`` / ``std`` there.

    The interface is :class:`samkit.data.BatchLoader`'s (``len``, iteration that resumes where
    it stopped, ``position``, :meth:`set_epoch`, :meth:`state_dict`, :meth:`load_state_dict`),
    so the trainer drives either. The epoch's order comes from (seed, epoch) and each image's
    augmentation from (seed, epoch, image index). Under torch.distributed every process draws the
    same global batches and decodes only its slice (``rank`` of ``world``, the slice
    ``x.chunk(world)[rank]`` would give), so ``batch_size`` is the global batch.

    Args:
        dataset: the images.
        batch_size: images per (global) batch.
        shuffle: a new order each epoch (else the list order).
        seed: base seed of the order and the augmentation.
        drop_last: drop the last incomplete batch.
        device: where the batches go.
        mean, std: per-channel normalisation, or None.
        workers: DataLoader worker processes (0: decode in this process).
        rank, world: this process's slice of every batch.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        workers: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if len(dataset) == 0:
            raise ValueError("the data set is empty")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"drop_last with {len(dataset)} images and batch_size {batch_size} "
                             "gives no batch at all; lower batch_size or set drop_last=False")
        if world > 1 and (batch_size % world or not drop_last):
            raise ValueError(f"batch_size {batch_size} must be divisible by the {world} processes "
                             "and drop_last set, so that every process gets an equal slice")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.sliced = world > 1  # the trainer must not slice these batches again
        self._mean = None if mean is None else torch.tensor(list(mean), device=self.device)
        self._std = None if std is None else torch.tensor(list(std), device=self.device)
        self.epoch = 0
        self.position = 0
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Batches(self), num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None)

    @property
    def num_samples(self) -> int:
        """Number of images in the data set."""
        return len(self.dataset)

    def __len__(self) -> int:
        """Number of batches in one full epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _plan(self) -> Iterator[list[tuple[int, int]]]:
        """This process's (index, seed) items of the current epoch's batches from ``position``."""
        epoch = self.epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(_derived_seed(self.seed, epoch,
                                                                    _ORDER_STREAM))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        share = self.batch_size // self.world
        for position in range(self.position, len(self)):
            batch = order[position * self.batch_size:(position + 1) * self.batch_size]
            if self.world > 1:
                batch = batch[self.rank * share:(self.rank + 1) * share]
            yield [(i, _derived_seed(self.seed, epoch, _SAMPLE_STREAM, i)) for i in batch]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        for x, y in self._loader:
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            if self._mean is not None:
                x = normalize(x, self._mean, self._std)  # type: ignore[arg-type]
            self.position += 1
            yield x, y.to(self.device, non_blocking=True)
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        """Where the loader stands and the settings its remaining batches depend on."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the settings must match (else ValueError)."""
        for key in ("seed", "shuffle", "batch_size", "drop_last", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; build it with the same settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"invalid state: epoch {epoch}, position {position} of {len(self)}")
        self.epoch, self.position = epoch, position
