"""Long-tailed class profiles and the choice of which images a long-tailed subset keeps.

The long-tail papers samkit reproduces build their training sets by keeping ``n_i`` images of class
``i`` (class 0 the head) out of a balanced set. :func:`long_tail_counts` gives the ``n_i`` for the
exponential profile of Cao et al. (2019, LDAM-DRW) and the step profile, and
:func:`long_tail_indices` picks the images the way the reference codes do, so that a samkit run
trains on the same subset as the paper it is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["PROFILES", "ORDERS", "long_tail_counts", "long_tail_indices"]

#: Valid values of the ``profile`` argument of :func:`long_tail_counts`.
PROFILES: tuple[str, ...] = ("exp", "step")
#: Valid values of the ``order`` argument of :func:`long_tail_indices`.
ORDERS: tuple[str, ...] = ("shuffle", "first")

# Relative tolerance under which a product such as 49 * 49 ** -1 = 0.9999999999999999 is taken to
# be the integer it stands for, instead of being truncated one below.
_SNAP_RTOL = 1e-9


def _floor_snapped(x: float) -> int:
    """Floor of ``x``, treating values a rounding error below an integer as that integer."""
    nearest = round(x)
    if abs(x - nearest) <= _SNAP_RTOL * max(1.0, abs(x)):
        return int(nearest)
    return math.floor(x)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def long_tail_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp") -> list[int]:
    """Number of training images each class keeps in a long-tailed version of a balanced set.

    ``ratio`` is the imbalance ratio n_max / n_min (1 means balanced). Profiles:

    - ``"exp"``: n_i = int(n_max * ratio ** (-i / (C - 1))), the profile of LDAM-DRW, Focal-SAM,
      ImbSAM and SSE-SAM (CIFAR-10-LT ratio 100 gives 5000, 2997, ..., 83, 50).
    - ``"step"``: the first C // 2 classes keep n_max, the others int(n_max / ratio).

    Products a rounding error below an integer count as that integer (49 images at ratio 49 leave
    1, not 0); for every published configuration this equals the reference codes' truncation.
    A single class (C = 1) has no tail and keeps n_max under both profiles.

    Raises:
        ValueError: on a non-integer or non-positive ``n_max`` or ``num_classes``, a ``ratio``
            below 1 or not finite, an unknown ``profile``, or a setting that leaves a class with
            no image (raise ``n_max`` or lower ``ratio``).
    """
    n_max = _check_int("n_max", n_max, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise ValueError(f"ratio must be a number >= 1 (n_max / n_min), got {ratio!r}")
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio < 1.0:
        raise ValueError(
            f"ratio must be a finite number >= 1 (n_max / n_min; 1 means balanced), got {ratio!r}"
        )
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")

    if num_classes == 1:
        return [n_max]
    if profile == "exp":
        counts = [
            _floor_snapped(n_max * ratio ** (-i / (num_classes - 1))) for i in range(num_classes)
        ]
    else:
        head = num_classes // 2
        tail = _floor_snapped(n_max / ratio)
        counts = [n_max] * head + [tail] * (num_classes - head)
    if min(counts) < 1:
        raise ValueError(
            f"n_max={n_max} with ratio={ratio:g} leaves the tail class with "
            f"{min(counts)} images ({profile!r} profile, {num_classes} classes); "
            "raise n_max or lower ratio so that n_max / ratio >= 1"
        )
    return counts


def _as_label_array(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(
            f"labels must be one-dimensional (one label per image), got shape {arr.shape}"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def long_tail_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    counts: Sequence[int],
    seed: int = 0,
    order: str = "shuffle",
) -> np.ndarray:
    """Indices of the images a long-tailed subset keeps: ``counts[c]`` images of each class c.

    ``order`` says which images, as in the reference codes (record it with the results):

    - ``"shuffle"`` (LDAM-DRW, Focal-SAM): a NumPy ``RandomState(seed)`` shuffles the indices of
      class 0, then class 1, ..., and the first ``counts[c]`` are kept; with seed 0 this is the
      same subset as their ``np.random.seed(0)`` + ``np.random.shuffle`` code.
    - ``"first"`` (ImbSAM, SSE-SAM): the first ``counts[c]`` images of each class in file order.

    Returns:
        int64 array, class 0's indices first, then class 1's, ... (within a class in the order
        chosen above), the layout of the reference codes' subset.

    Raises:
        ValueError: on an unknown ``order``, negative counts, labels outside
            ``[0, len(counts))``, or a class with fewer images than asked.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    label_arr = _as_label_array(labels)
    counts = [_check_int(f"counts[{c}]", n, 0) for c, n in enumerate(counts)]
    num_classes = len(counts)
    if num_classes == 0:
        raise ValueError("counts is empty: give one count per class")
    if label_arr.size and (label_arr.min() < 0 or label_arr.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) to match the {num_classes} counts given, "
            f"found values from {int(label_arr.min())} to {int(label_arr.max())}"
        )
    rng = np.random.RandomState(seed) if order == "shuffle" else None
    chosen = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(label_arr == c)
        if idx.size < n_c:
            raise ValueError(
                f"class {c} has {idx.size} images but the profile asks for {n_c}; "
                "lower n_max or use a larger source set"
            )
        if rng is not None:
            rng.shuffle(idx)
        chosen.append(idx[:n_c])
    return np.concatenate(chosen).astype(np.int64, copy=False)
