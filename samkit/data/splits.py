"""Many-shot / medium-shot / few-shot class groups of a long-tailed training set.

Long-tail papers report accuracy on three groups of classes chosen by their number of training
images. The thresholds differ between papers and data sets (see the protocols notes), so they are
arguments here, and must be recorded with every result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["GROUPS", "default_thresholds", "group_members", "head_first", "holdout", "shot_groups"]

#: Group names, head to tail.
GROUPS: tuple[str, ...] = ("many", "medium", "few")


def default_thresholds(num_classes: int) -> tuple[int, int]:
    """samkit's default (many, few) thresholds for a data set with ``num_classes`` classes.

    - At most 10 classes: (1000, 200), Focal-SAM's CIFAR-10-LT ratio-100 choice (few < 200,
      medium <= 1000), because the usual (100, 20) leaves no few-shot class on 10-class sets;
      it gives 4 / 3 / 3 classes on Fashion-MNIST-LT ratio 100.
    - More classes: (100, 20), the usual split (OLTR and most papers): 35 / 35 / 30 classes on
      CIFAR-100-LT ratio 100.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return (1000, 200) if num_classes <= 10 else (100, 20)


def shot_groups(
    train_counts: Sequence[int] | np.ndarray | torch.Tensor, many: int = 100, few: int = 20
) -> list[str]:
    """Group of each class from its number of training images.

    "many" when n > ``many``, "few" when n < ``few``, "medium" otherwise (few <= n <= many).

    Raises:
        ValueError: on negative or non-integer counts, negative thresholds, or ``few > many``.
    """
    if isinstance(train_counts, torch.Tensor):
        train_counts = train_counts.detach().cpu().numpy()
    counts = np.asarray(train_counts)
    if counts.ndim != 1:
        raise ValueError(f"train_counts must be one count per class, got shape {counts.shape}")
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        if not np.all(np.equal(np.mod(counts, 1), 0)):
            raise ValueError(f"train_counts must be whole numbers, got {counts.tolist()}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"train_counts must be >= 0, got {counts.tolist()}")
    for name, value in (("many", many), ("few", few)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if few > many:
        raise ValueError(
            f"few ({few}) must be <= many ({many}): few-shot classes have fewer than `few` "
            "images, many-shot classes more than `many`"
        )
    return ["many" if n > many else "few" if n < few else "medium" for n in counts.tolist()]


def group_members(groups: Sequence[str]) -> dict[str, list[int]]:
    """Class indices of each group ("many", "medium", "few"), from :func:`shot_groups`'s list."""
    members: dict[str, list[int]] = {g: [] for g in GROUPS}
    for c, g in enumerate(groups):
        if g not in members:
            raise ValueError(f"class {c} has group {g!r}; valid groups: {GROUPS}")
        members[g].append(c)
    return members


def head_first(counts: Sequence[int]) -> list[int]:
    """Class order by training count, largest first (ties keep their label order): the head
    first, as groups, tables and plots read a long tail."""
    return sorted(range(len(counts)), key=lambda c: (-int(counts[c]), c))


def holdout(
    labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of a data set's indices into (kept, held out).

    Each class holds out round(fraction * n) of its n images (at least one when n >= 2, and
    always keeps at least one), chosen by a NumPy generator seeded with ``seed``; both index
    arrays come back sorted. This is how a class-per-folder tree with no split folders gets its
    test (and validation) set.

    Raises:
        ValueError: if ``fraction`` is not in (0, 1).
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = members.size
        k = min(max(round(fraction * n), 1 if n >= 2 else 0), n - 1)
        held.append(rng.permutation(members)[:k])
    out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(labels.size), out)
    return kept, out
