"""Per-sample classification losses for long-tailed training.

Every loss is an ``nn.Module`` mapping ``(logits (B, C), labels (B,))`` to per-sample losses ``(B,)``
(never reduced), with ``set_epoch(epoch)`` for schedules (LDAM's deferred re-weighting). Build one by name
with :func:`build_loss`; :func:`available_losses` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from samkit.losses.classification import (
    LDAM,
    BalancedSoftmax,
    CrossEntropy,
    LogitAdjusted,
    PerSampleLoss,
    SmoothedCrossEntropy,
    VSLoss,
    as_class_counts,
)

__all__ = [
    "LDAM",
    "LDAM_DRW_EPOCH",
    "BalancedSoftmax",
    "CrossEntropy",
    "LogitAdjusted",
    "PerSampleLoss",
    "SmoothedCrossEntropy",
    "VSLoss",
    "as_class_counts",
    "available_losses",
    "build_loss",
]

#: First epoch with re-weighting for ``"ldam-drw"`` (epoch 160 of 200 in the LDAM-DRW protocol).
LDAM_DRW_EPOCH = 160


def _ldam_drw(class_counts: Sequence[int], **kwargs: Any) -> LDAM:
    kwargs.setdefault("drw_epoch", LDAM_DRW_EPOCH)
    return LDAM(class_counts, **kwargs)


# name -> (factory, whether it needs class counts)
_REGISTRY: dict[str, tuple[Callable[..., PerSampleLoss], bool]] = {
    "ce": (CrossEntropy, False),
    "ldam": (LDAM, True),
    "ldam-drw": (_ldam_drw, True),
    "la": (LogitAdjusted, True),
    "logit-adjusted": (LogitAdjusted, True),
    "balanced-softmax": (BalancedSoftmax, True),
    "vs": (VSLoss, True),
    "smoothed-ce": (SmoothedCrossEntropy, False),
    "bisam-ce": (SmoothedCrossEntropy, False),
}


def available_losses() -> list[str]:
    """The names :func:`build_loss` accepts (aliases included), sorted."""
    return sorted(_REGISTRY)


def build_loss(
    name: str,
    class_counts: Sequence[int] | torch.Tensor | None = None,
    **kwargs: Any,
) -> PerSampleLoss:
    """Build a per-sample loss by name.

    Args:
        name: ``"ce"``, ``"ldam"``, ``"ldam-drw"`` (LDAM with ``drw_epoch=160`` unless given),
            ``"la"`` or ``"logit-adjusted"``, ``"balanced-softmax"``, ``"vs"``, ``"smoothed-ce"``
            or ``"bisam-ce"`` (the BiSAM authors' label smoothing, ``smoothing=0.1``).
        class_counts: training-set count of each class; required by every loss except ``"ce"`` and
            ``"smoothed-ce"``, which ignore it (so a harness can pass the counts to any loss).
        **kwargs: the loss's own options (``tau``, ``max_m``, ``s``, ``drw_epoch``, ``beta``, ``gamma``,
            ``label_smoothing``, ``weight``, ``smoothing``).

    Raises:
        ValueError: for an unknown name (the message lists the valid ones), missing class counts for a
            class-aware loss, or an invalid option.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(available_losses())}")
    factory, needs_counts = _REGISTRY[key]
    if not needs_counts:
        return factory(**kwargs)
    if class_counts is None:
        raise ValueError(
            f"loss {key!r} needs class_counts: the number of training samples of each class"
        )
    return factory(class_counts, **kwargs)
