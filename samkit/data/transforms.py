"""Batch augmentation and an in-memory batch loader, all on whole batches on the training device.

Small-image benchmarks (CIFAR, Fashion-MNIST, MNIST-1D) fit in device memory, and a per-sample
Python pipeline (a DataLoader with PIL transforms) is then the bottleneck of a training run. Here
the data set stays on the device as uint8, and each batch is gathered, converted to float,
augmented (random crop with zero padding, horizontal flip) and normalised with a few tensor
operations.

Randomness: every random draw comes from a CPU ``torch.Generator``; the numbers are then moved
to the batch's device. The same seed therefore gives the same batches and the same augmentation
on CPU and GPU. :class:`BatchLoader` reseeds its generator from (seed, epoch, batch index) for
each batch, so a run resumed from :meth:`BatchLoader.state_dict` sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Augment",
    "BatchLoader",
    "channel_stats",
    "compose",
    "crop_at",
    "crop_flip",
    "hflip_where",
    "normalize",
    "random_crop",
    "random_hflip",
]

#: An augmentation: (float batch, CPU generator) -> augmented batch of the same shape.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    else:
        pair = tuple(int(s) for s in size)  # type: ignore[union-attr]
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width), got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {size!r}")
    return pair  # type: ignore[return-value]


def _check_batch(batch: torch.Tensor, what: str) -> None:
    if batch.ndim != 4:
        raise ValueError(
            f"{what} needs a batch of images (N, C, H, W), got shape {tuple(batch.shape)}"
        )


def _crop_geometry(
    batch: torch.Tensor, size: int | Sequence[int], padding: int, what: str
) -> tuple[int, int, int, int]:
    """(crop height, crop width, largest top offset, largest left offset), validated."""
    _check_batch(batch, what)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    crop_h, crop_w = _pair(size, "size")
    height, width = batch.shape[2] + 2 * padding, batch.shape[3] + 2 * padding
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"crop size {(crop_h, crop_w)} is larger than the padded image {(height, width)}; "
            "lower size or raise padding"
        )
    return crop_h, crop_w, height - crop_h, width - crop_w


def crop_at(
    batch: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    size: int | Sequence[int],
    padding: int = 0,
) -> torch.Tensor:
    """Crop each image of ``batch`` (N, C, H, W) at its own offset, after zero padding.

    Image n is padded by ``padding`` zeros on every side, then the ``size`` window whose
    top-left corner is (``top[n]``, ``left[n]``) in padded coordinates is kept. The deterministic
    half of :func:`random_crop`.

    Raises:
        ValueError: on a non-batch input, a negative padding, a window larger than the padded
            image, or offsets of the wrong length or out of range.
    """
    crop_h, crop_w, max_top, max_left = _crop_geometry(batch, size, padding, "crop_at")
    n = batch.shape[0]
    top = torch.as_tensor(top, dtype=torch.int64).to(batch.device)
    left = torch.as_tensor(left, dtype=torch.int64).to(batch.device)
    if top.shape != (n,) or left.shape != (n,):
        raise ValueError(
            f"top and left need one offset per image ({n}), got {tuple(top.shape)} "
            f"and {tuple(left.shape)}"
        )
    if n and (
        int(top.min()) < 0
        or int(top.max()) > max_top
        or int(left.min()) < 0
        or int(left.max()) > max_left
    ):
        raise ValueError(f"offsets must lie in [0, {max_top}] (top) and [0, {max_left}] (left)")
    padded = F.pad(batch, (padding, padding, padding, padding)) if padding else batch
    rows = top[:, None] + torch.arange(crop_h, device=batch.device)  # (N, h)
    cols = left[:, None] + torch.arange(crop_w, device=batch.device)  # (N, w)
    # Select rows, then columns, each as a gather along one axis.
    index_rows = rows[:, None, :, None].expand(n, batch.shape[1], crop_h, padded.shape[3])
    out = padded.gather(2, index_rows)
    index_cols = cols[:, None, None, :].expand(n, batch.shape[1], crop_h, crop_w)
    return out.gather(3, index_cols)


def random_crop(
    batch: torch.Tensor,
    size: int | Sequence[int],
    padding: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop of each image, after zero padding (torchvision's RandomCrop(size, padding)).

    Offsets are drawn from ``generator`` (on its device; the default CPU generator if None):
    first all N top offsets, then all N left offsets, each uniform over the valid range. The result equals
    ``crop_at(batch, top, left, size, padding)`` with those offsets.
    """
    crop_h, crop_w, max_top, max_left = _crop_geometry(batch, size, padding, "random_crop")
    n = batch.shape[0]
    device = generator.device if generator is not None else "cpu"
    top = torch.randint(0, max_top + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, max_left + 1, (n,), generator=generator, device=device)
    return crop_at(batch, top, left, (crop_h, crop_w), padding)


def hflip_where(batch: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images of ``batch`` (N, ..., W) where the bool ``flip[n]`` is set."""
    flip = torch.as_tensor(flip, dtype=torch.bool).to(batch.device)
    if flip.shape != (batch.shape[0],):
        raise ValueError(
            f"flip needs one flag per image ({batch.shape[0]}), got {tuple(flip.shape)}"
        )
    mask = flip.view(-1, *([1] * (batch.ndim - 1)))
    return torch.where(mask, batch.flip(-1), batch)


def random_hflip(
    batch: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Mirror each image with probability ``p`` (one coin per image: N uniforms < p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    device = generator.device if generator is not None else "cpu"
    coins = torch.rand(batch.shape[0], generator=generator, device=device) < p
    return hflip_where(batch, coins)


def normalize(
    batch: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(batch - mean) / std per channel (dimension 1), for a float batch (N, C, ...).

    Raises:
        ValueError: if mean/std do not have one value per channel or a std is not positive.
    """
    if not batch.is_floating_point():
        raise ValueError(f"normalize needs a float batch, got {batch.dtype}; convert it first")
    channels = batch.shape[1]
    mean_t = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).flatten()
    std_t = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).flatten()
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got {mean_t.numel()} and "
            f"{std_t.numel()}"
        )
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be positive, got {std_t.tolist()}")
    shape = (1, channels) + (1,) * (batch.ndim - 2)
    return (batch - mean_t.view(shape)) / std_t.view(shape)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a training set, for :func:`normalize`.

    uint8 images are scaled to [0, 1] first (as the loader does); float data are taken as they
    are. The std is the population std over all images and pixels, accumulated in float64.
    """
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(
            f"channel_stats needs a non-empty batch (N, C, ...), got {tuple(images.shape)}"
        )
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64) * scale
        part = part.transpose(0, 1).reshape(channels, -1)
        total += part.sum(1).cpu()
        total_sq += (part * part).sum(1).cpu()
        count += part.shape[1]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return mean.tolist(), var.sqrt().tolist()


def compose(*augments: Augment) -> Augment:
    """Chain augmentations, applied left to right, all drawing from the same generator."""

    def apply(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for augment in augments:
            batch = augment(batch, generator)
        return batch

    return apply


def crop_flip(size: int | Sequence[int], padding: int = 4, flip: bool = True) -> Augment:
    """The standard CIFAR augmentation: random crop ``size`` with ``padding`` zeros, then a
    horizontal flip with probability 1/2 (when ``flip``)."""
    _pair(size, "size")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")

    def apply(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = random_crop(batch, size, padding, generator)
        return random_hflip(batch, generator) if flip else batch

    return apply


# Streams of derived seeds: the epoch's order, and each batch's augmentation.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def _derived_seed(seed: int, epoch: int, stream: int, index: int = 0) -> int:
    """A 63-bit seed, well mixed from (seed, epoch, stream, index)."""
    entropy = [seed & (2**63 - 1), epoch, stream, index]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class BatchLoader:
    """Iterate an in-memory data set in (images, labels) batches on ``device``.

    Each batch: gather the examples (uint8 stays uint8 until here), convert to float32 (uint8
    divided by 255), apply ``augment`` (e.g. :func:`crop_flip`), then :func:`normalize` with
    ``mean``/``std`` if given. With ``shuffle`` the order is a fresh permutation each epoch.

    Reproducibility: the epoch's permutation comes from a generator seeded by (seed, epoch), and
    each batch's augmentation from one seeded by (seed, epoch, batch index), all on the CPU; so
    a given seed gives the same batches on every device, and :meth:`state_dict` needs only the
    epoch and the position. Iterating resumes where the last iteration stopped (mid-epoch after
    a ``break`` or :meth:`load_state_dict`); a finished pass moves to the next epoch.

    Args:
        images: (N, ...) uint8 or float tensor; moved to ``device`` once.
        labels: (N,) integer labels.
        batch_size: examples per batch.
        shuffle: new random order each epoch (else the data set order).
        seed: base seed of the order and the augmentation.
        drop_last: drop the last incomplete batch.
        device: where the batches (and the data set) live.
        augment: ``augment(batch, generator) -> batch`` applied to float batches, or None.
        mean, std: per-channel normalisation applied after ``augment`` (see
            :func:`channel_stats`), or None.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        augment: Augment | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if images.shape[0] == 0:
            raise ValueError("the data set is empty")
        if drop_last and images.shape[0] < batch_size:
            raise ValueError(
                f"drop_last with {images.shape[0]} examples and batch_size {batch_size} gives "
                "no batch at all; lower batch_size or set drop_last=False"
            )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(device=self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.augment = augment
        self.mean = None if mean is None else list(map(float, mean))
        self.std = None if std is None else list(map(float, std))
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        self._mean_t = None if mean is None else torch.tensor(self.mean, device=self.device)
        self._std_t = None if std is None else torch.tensor(self.std, device=self.device)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._generator = torch.Generator(device="cpu")

    @property
    def num_samples(self) -> int:
        """Number of examples in the data set."""
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        """Number of batches in one full epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        self._generator.manual_seed(_derived_seed(self.seed, epoch, _ORDER_STREAM))
        return torch.randperm(self.num_samples, generator=self._generator)

    def _make_batch(self, index: torch.Tensor, epoch: int, position: int) -> tuple:
        index = index.to(self.device)
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment is not None:
            self._generator.manual_seed(_derived_seed(self.seed, epoch, _AUGMENT_STREAM, position))
            x = self.augment(x, self._generator)
        if self._mean_t is not None:
            x = normalize(x, self._mean_t, self._std_t)  # type: ignore[arg-type]
        return x, self.labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        epoch = self.epoch
        order = self._order(epoch)
        while self.position < len(self):
            position = self.position
            index = order[position * self.batch_size : (position + 1) * self.batch_size]
            batch = self._make_batch(index, epoch, position)
            self.position = position + 1
            yield batch
        self.epoch = epoch + 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self) -> dict:
        """Where the loader stands: epoch, batches handed out in it, and the settings that the
        remaining batches depend on (checked by :meth:`load_state_dict`)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields exactly the batches the
        saved loader had yet to yield.

        Raises:
            ValueError: if the saved loader had a different seed, order, batch size or data
                set size (the remaining batches would differ).
        """
        for key in ("seed", "shuffle", "batch_size", "drop_last", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; build the loader with the same settings"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"invalid state: epoch {epoch}, position {position} of {len(self)}")
        self.epoch, self.position = epoch, position
