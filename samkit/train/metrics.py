"""Accuracy and calibration metrics for long-tailed classification.

On the balanced test sets of the long-tail benchmarks, overall top-1 accuracy equals the mean of
the per-class accuracies, and the many / medium / few numbers are unweighted means of the
per-class accuracies of each group; computing everything from per-class accuracies keeps the
four numbers consistent, and stays class-balanced on a slightly unbalanced test set (MNIST-1D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["per_class_accuracy", "group_accuracy", "expected_calibration_error"]

_GROUPS = ("many", "medium", "few")


def _predictions(preds_or_logits: torch.Tensor, n: int) -> torch.Tensor:
    x = torch.as_tensor(preds_or_logits)
    if x.ndim == 2:
        x = x.argmax(dim=1)
    elif x.ndim != 1:
        raise ValueError(
            f"expected predicted labels (N,) or scores (N, C), got shape {tuple(x.shape)}"
        )
    if x.shape[0] != n:
        raise ValueError(f"{x.shape[0]} predictions but {n} labels; they must match one to one")
    return x.to(torch.int64)


def per_class_accuracy(
    preds_or_logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Top-1 accuracy of each class, in [0, 1].

    Args:
        preds_or_logits: predicted labels (N,), or scores (N, C) whose argmax is taken (logits,
            probabilities, anything monotone in them).
        labels: true labels (N,), in [0, num_classes).
        num_classes: number of classes C.

    Returns:
        float64 tensor (C,); NaN for a class with no example in ``labels``.

    Raises:
        ValueError: on mismatched lengths, bad shapes or labels out of range.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    labels = torch.as_tensor(labels).to(torch.int64).flatten()
    preds = _predictions(preds_or_logits, labels.shape[0]).to(labels.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels range from {int(labels.min())} to {int(labels.max())}, outside "
            f"[0, {num_classes}); check num_classes"
        )
    total = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).to(torch.float64)
    acc = correct / total  # 0 / 0 -> NaN for classes absent from the test set
    return acc.cpu()


def _nanmean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def group_accuracy(
    per_class_acc: torch.Tensor | Sequence[float],
    groups: Sequence[str] | Mapping[str, Sequence[int]],
) -> dict[str, float]:
    """Overall, many-, medium- and few-shot accuracy from per-class accuracies.

    Args:
        per_class_acc: accuracy of each class (as from :func:`per_class_accuracy`).
        groups: the group of each class ("many", "medium", "few"; e.g. from
            :func:`samkit.data.shot_groups`), or a mapping group name -> class indices.

    Returns:
        ``{"overall", "many", "medium", "few"}``: unweighted means of the per-class accuracies
        (all classes for "overall"). A group with no class is NaN (``math.nan``), so the dict
        always holds floats; test with ``math.isnan``. Classes whose accuracy is NaN (no test
        example) are left out of every mean.

    Raises:
        ValueError: if ``groups`` does not give one valid group per class, or names an unknown
            group or a class index out of range.
    """
    acc = torch.as_tensor(per_class_acc, dtype=torch.float64).flatten().cpu()
    num_classes = acc.shape[0]
    if isinstance(groups, Mapping):
        members: dict[str, list[int]] = {g: [] for g in _GROUPS}
        for name, idx in groups.items():
            if name not in members:
                raise ValueError(f"unknown group {name!r}; valid groups: {_GROUPS}")
            idx = [int(i) for i in idx]
            if any(i < 0 or i >= num_classes for i in idx):
                raise ValueError(f"group {name!r} has class indices outside [0, {num_classes})")
            members[name] = idx
    else:
        groups = list(groups)
        if len(groups) != num_classes:
            raise ValueError(
                f"groups gives {len(groups)} entries for {num_classes} classes; give one group "
                "per class"
            )
        members = {g: [] for g in _GROUPS}
        for c, g in enumerate(groups):
            if g not in members:
                raise ValueError(f"class {c} has group {g!r}; valid groups: {_GROUPS}")
            members[g].append(c)
    result = {"overall": _nanmean(acc)}
    for name in _GROUPS:
        idx = members[name]
        result[name] = _nanmean(acc[idx]) if idx else math.nan
    return result


def expected_calibration_error(
    probs_or_logits: torch.Tensor,
    labels: torch.Tensor,
    bins: int = 15,
    *,
    from_logits: bool | None = None,
) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (Guo et al. 2017).

    The confidence of an example is its largest class probability; bin b holds confidences in
    (b / bins, (b + 1) / bins] (bin 0 also takes 0). ECE = sum over bins of
    (examples in bin / N) * |accuracy in bin - mean confidence in bin|.

    Args:
        probs_or_logits: (N, C) probabilities or logits.
        labels: (N,) true labels.
        bins: number of bins (15 in the long-tail papers).
        from_logits: True to apply a softmax, False if the input already holds probabilities,
            None to decide from the input (probabilities when every row lies in [0, 1] and sums
            to 1 within 1e-4).

    Returns:
        The ECE, in [0, 1].
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    x = torch.as_tensor(probs_or_logits).to(torch.float64).cpu()
    labels = torch.as_tensor(labels).to(torch.int64).flatten().cpu()
    if x.ndim != 2:
        raise ValueError(f"expected (N, C) probabilities or logits, got shape {tuple(x.shape)}")
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"{x.shape[0]} rows but {labels.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("cannot compute the ECE of an empty set")
    if from_logits is None:
        row_sums = x.sum(dim=1)
        looks_like_probs = bool(
            (x >= 0).all() and (x <= 1).all() and ((row_sums - 1).abs() <= 1e-4).all()
        )
        from_logits = not looks_like_probs
    probs = torch.softmax(x, dim=1) if from_logits else x
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(torch.float64)
    inner_edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)[1:-1]
    which = torch.bucketize(confidence, inner_edges, right=False)
    conf_sum = torch.bincount(which, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(which, weights=correct, minlength=bins)
    return float((conf_sum - acc_sum).abs().sum() / x.shape[0])
