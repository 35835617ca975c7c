"""Per-sample classification losses for long-tailed training.

Every loss maps ``(logits, target)`` with ``logits`` of shape ``(B, C)`` and integer class labels of
shape ``(B,)`` to a tensor of shape ``(B,)``: one loss per sample, never reduced. The class-aware
sharpness-aware optimizers (ImbSAM, Focal-SAM, CC-SAM, SSE-SAM) weight and group the samples themselves,
so they need the per-sample values.

Notation: ``z`` the logits, ``n_c`` the training-set count of class ``c`` (given at construction),
``pi_c = n_c / sum_j n_j`` the class prior, ``CE(u, y) = logsumexp(u) - u_y``.

* :class:`CrossEntropy`: ``CE(z, y)``, with optional label smoothing and class weights.
* :class:`LDAM`: ``CE(s * (z - m_y e_y), y)`` with margins ``m_c`` proportional to ``n_c^(-1/4)``, and
  the deferred re-weighting (DRW) schedule; Cao et al., NeurIPS 2019, "Learning Imbalanced Datasets with
  Label-Distribution-Aware Margin Loss".
* :class:`LogitAdjusted`: ``CE(z + tau log pi, y)``; Menon et al., ICLR 2021, "Long-tail learning via
  logit adjustment".
* :class:`BalancedSoftmax`: ``CE(z + log n, y)``; Ren et al., NeurIPS 2020, "Balanced Meta-Softmax for
  Long-Tailed Visual Recognition". Since ``log n_c = log pi_c + log N`` shifts every logit by the same
  constant, it equals :class:`LogitAdjusted` with ``tau = 1``.
* :class:`VSLoss`: ``CE(z * (n / n_max)^gamma + tau log pi, y)``; Kini et al., NeurIPS 2021,
  "Label-Imbalanced and Group-Sensitive Classification under Overparameterization" (vector scaling).

* :class:`SmoothedCrossEntropy`: ``-(1 - s) log p_y - s/(C - 1) sum_{j != y} log p_j``, the label
  smoothing of the BiSAM authors' code (Xie et al., ICML 2024), which differs from torch's
  ``label_smoothing`` (``s / C`` on every class, the target included).

Every loss has ``set_epoch(epoch)`` so a training loop can call it on any loss; only LDAM's DRW uses it.
Class-dependent constants (log-priors, margins, weights) are registered float32 buffers, so
``.to(device)`` moves them; they are computed in float64 once and applied in the logits' dtype (float64
logits get the float64 values, not float32 ones widened). Arithmetic runs in the logits' dtype; float16
and bfloat16 logits are computed in float32 and the losses come back in float32, as ``torch.autocast``
does for ``cross_entropy``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LDAM",
    "BalancedSoftmax",
    "CrossEntropy",
    "LogitAdjusted",
    "PerSampleLoss",
    "SmoothedCrossEntropy",
    "VSLoss",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_class_counts(class_counts: Sequence[int] | torch.Tensor | None, loss_name: str) -> list[int]:
    """Validate training-set class counts and return them as a list of Python ints.

    Accepts any sequence of integer values (list, tuple, NumPy array, 1D tensor). Raises ``ValueError``
    naming ``loss_name`` if the counts are missing, empty, not integers, or below 1.
    """
    if class_counts is None:
        raise ValueError(
            f"{loss_name} needs class_counts: the number of training samples of each class"
        )
    if isinstance(class_counts, torch.Tensor):
        if class_counts.dim() != 1:
            raise ValueError(
                f"{loss_name}: class_counts must be one-dimensional, got shape "
                f"{tuple(class_counts.shape)}"
            )
        values = class_counts.detach().cpu().tolist()
    else:
        values = list(class_counts)
    if not values:
        raise ValueError(f"{loss_name}: class_counts is empty")
    counts = []
    for index, value in enumerate(values):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(float(value))
            or not float(value).is_integer()
        ):
            raise ValueError(
                f"{loss_name}: class_counts must be integers, got {value!r} for class {index}"
            )
        counts.append(int(value))
    low = min(counts)
    if low < 1:
        raise ValueError(
            f"{loss_name}: every class count must be >= 1, got {low} for class {counts.index(low)}"
        )
    return counts


def _check_real(name: str, value: float, loss_name: str, *, low: float, strict: bool) -> float:
    """Check that ``value`` is a finite real number > low (strict) or >= low; return it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{loss_name}: {name} must be a finite number, got {value!r}")
    if (strict and value <= low) or (not strict and value < low):
        relation = ">" if strict else ">="
        raise ValueError(f"{loss_name}: {name} must be {relation} {low}, got {value!r}")
    return float(value)


class PerSampleLoss(nn.Module):
    """Base class of samkit's losses: ``forward(logits, target)`` returns one loss per sample.

    Subclasses implement :meth:`per_sample`, which receives validated inputs: floating-point logits of
    shape ``(B, C)`` (float16/bfloat16 already cast to float32) and ``int64`` labels of shape ``(B,)``.

    Args:
        num_classes: number of classes the loss was built for (from its class counts or weights), or
            ``None`` when any number of classes is accepted.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.epoch = 0
        self._exact: dict[str, torch.Tensor] = {}  # float64 CPU values of the constant buffers
        self._exact_on: dict[tuple[str, torch.device], torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch (0-based) starts; a no-op except for schedules such as DRW."""
        self.epoch = int(epoch)

    def check_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Validate shapes, dtypes and (for CPU targets) the label range; return ``int64`` labels.

        The label-range check reads the labels' values, so it runs only when they are on the CPU: on an
        accelerator it would force a device synchronisation on every call.
        """
        name = type(self).__name__
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(f"{name}: logits must have shape (B, C), got {shape}")
        if not logits.is_floating_point():
            raise ValueError(f"{name}: logits must be floating point, got {logits.dtype}")
        batch, classes = logits.shape
        if self.num_classes is not None and classes != self.num_classes:
            raise ValueError(
                f"{name} was built for {self.num_classes} classes but the logits have {classes}"
            )
        if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.shape[0] != batch:
            shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
            raise ValueError(
                f"{name}: target must have shape ({batch},) to match logits, got {shape}"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"{name}: target must hold integer class labels, got {target.dtype}")
        if target.device.type == "cpu" and batch > 0:
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= classes:
                raise ValueError(
                    f"{name}: labels must lie in [0, {classes}) for {classes} classes, "
                    f"got labels in [{low}, {high}]"
                )
        return target.long()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample losses, shape ``(B,)``."""
        target = self.check_inputs(logits, target)
        z = logits.float() if logits.dtype in _HALF_DTYPES else logits
        return self.per_sample(z, target)

    def per_sample(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the per-sample losses on validated inputs; implemented by subclasses."""
        raise NotImplementedError

    def _constant(self, name: str, values: torch.Tensor | None) -> None:
        """Register constants computed in float64 as a float32 buffer `name` (float64 is missing on
        some devices), keeping the float64 values for float64 logits."""
        if values is None:
            self.register_buffer(name, None)
            return
        self._exact[name] = values.detach().to("cpu", torch.float64)
        self.register_buffer(name, values.to(torch.float32))

    def _like(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """The constant `name` in the logits' dtype and on their device: from the float64 values
        for float64 logits (moved once per device), from the buffer otherwise."""
        if z.dtype == torch.float64 and name in self._exact:
            key = (name, z.device)
            if key not in self._exact_on:
                self._exact_on[key] = self._exact[name].to(z.device)
            return self._exact_on[key]
        return getattr(self, name).to(device=z.device, dtype=z.dtype)


class CrossEntropy(PerSampleLoss):
    """Per-sample cross-entropy ``CE(z, y)``, the baseline of every long-tail paper.

    Args:
        label_smoothing: in ``[0, 1]``; the target becomes ``(1 - eps) e_y + eps / C`` (Szegedy et al.,
            CVPR 2016), as in :func:`torch.nn.functional.cross_entropy`.
        weight: optional per-class weights (length C, non-negative); sample ``b``'s loss is multiplied by
            ``weight[y_b]`` (with label smoothing, torch's semantics: each class term by its own weight).
            Not renormalised, so the loss stays per sample.
    """

    def __init__(
        self, label_smoothing: float = 0.0, weight: Sequence[float] | torch.Tensor | None = None
    ) -> None:
        smoothing = _check_real(
            "label_smoothing", label_smoothing, "CrossEntropy", low=0.0, strict=False
        )
        if smoothing > 1.0:
            raise ValueError(f"CrossEntropy: label_smoothing must be <= 1, got {label_smoothing!r}")
        weights = None
        if weight is not None:
            weights = torch.as_tensor(weight, dtype=torch.float64)
            if (
                weights.dim() != 1
                or weights.numel() == 0
                or not torch.isfinite(weights).all()
                or (weights < 0).any()
            ):
                raise ValueError(
                    "CrossEntropy: weight must be a non-empty 1D sequence of finite, non-negative "
                    "numbers"
                )
        super().__init__(None if weights is None else weights.numel())
        self.label_smoothing = smoothing
        self._constant("weight", weights)

    def per_sample(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self._like("weight", z)
        return F.cross_entropy(
            z, target, weight=weight, reduction="none", label_smoothing=self.label_smoothing
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, weighted={self.weight is not None}"


class LDAM(PerSampleLoss):
    """Label-distribution-aware margin loss with optional deferred re-weighting (Cao et al., 2019).

    ``loss_b = w_{y_b} * CE(s * (z_b - m_{y_b} e_{y_b}), y_b)`` with margins
    ``m_c = max_m * n_c^(-1/4) / max_j n_j^(-1/4)`` (the rarest class gets ``max_m``). Use it with a
    normed (cosine) head, whose logits lie in ``[-1, 1]``; ``s`` rescales them.

    Deferred re-weighting (DRW): the weights ``w`` are all 1 before epoch ``drw_epoch`` and, from that
    epoch on (see :meth:`set_epoch`), the class-balanced "effective number" weights
    ``w_c = (1 - beta) / (1 - beta^n_c)`` (Cui et al., CVPR 2019) normalised to sum to C. Each sample's
    loss is multiplied by its class weight, as ``F.cross_entropy(weight=w, reduction="none")`` does.

    Args:
        class_counts: training-set count of each class.
        max_m: largest margin, ``>= 0`` (0.5 in the paper).
        s: logit scale, ``> 0`` (30 in the paper).
        drw_epoch: first epoch with re-weighting (160 of 200 in the paper); ``None`` disables DRW.
        beta: effective-number parameter in ``[0, 1)`` (0.9999 in the paper).
    """

    def __init__(
        self,
        class_counts: Sequence[int] | torch.Tensor,
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int | None = None,
        beta: float = 0.9999,
    ) -> None:
        counts = as_class_counts(class_counts, "LDAM")
        super().__init__(len(counts))
        self.max_m = _check_real("max_m", max_m, "LDAM", low=0.0, strict=False)
        self.s = _check_real("s", s, "LDAM", low=0.0, strict=True)
        self.beta = _check_real("beta", beta, "LDAM", low=0.0, strict=False)
        if self.beta >= 1.0:
            raise ValueError(f"LDAM: beta must be < 1, got {beta!r}")
        if drw_epoch is not None and (
            isinstance(drw_epoch, bool)
            or not isinstance(drw_epoch, numbers.Integral)
            or drw_epoch < 0
        ):
            raise ValueError(f"LDAM: drw_epoch must be None or an integer >= 0, got {drw_epoch!r}")
        self.drw_epoch = None if drw_epoch is None else int(drw_epoch)

        n = torch.tensor(counts, dtype=torch.float64)
        inverse_quartic_root = n.pow(-0.25)
        margins = self.max_m * inverse_quartic_root / inverse_quartic_root.max()
        weights = (1.0 - self.beta) / (1.0 - torch.pow(self.beta, n))
        weights = weights / weights.sum() * len(counts)
        self._constant("margins", margins)
        self._constant("drw_weights", weights)
        self.set_epoch(0)

    @property
    def drw_active(self) -> bool:
        """Whether the re-weighting is on for the current epoch."""
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    @property
    def class_weights(self) -> torch.Tensor:
        """The per-class weights in use now: all ones before ``drw_epoch``, the DRW weights after."""
        if self.drw_active:
            return self.drw_weights
        return torch.ones_like(self.drw_weights)

    def per_sample(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margin = self._like("margins", z)[target]
        shifted = z - F.one_hot(target, z.shape[1]).to(z.dtype) * margin.unsqueeze(1)
        weight = self._like("drw_weights", z) if self.drw_active else None
        return F.cross_entropy(self.s * shifted, target, weight=weight, reduction="none")

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, "
            f"drw_epoch={self.drw_epoch}, beta={self.beta}"
        )


class LogitAdjusted(PerSampleLoss):
    """Logit-adjusted cross-entropy ``CE(z + tau * log pi, y)`` (Menon et al., ICLR 2021).

    Adding the scaled log-prior during training makes the argmax of the raw logits Bayes-consistent for
    the balanced error. ``tau = 0`` is plain cross-entropy.

    Args:
        class_counts: training-set count of each class.
        tau: temperature of the adjustment, ``>= 0`` (1 in the paper).
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, tau: float = 1.0) -> None:
        counts = as_class_counts(class_counts, "LogitAdjusted")
        super().__init__(len(counts))
        self.tau = _check_real("tau", tau, "LogitAdjusted", low=0.0, strict=False)
        n = torch.tensor(counts, dtype=torch.float64)
        self._constant("log_prior", torch.log(n / n.sum()))

    def per_sample(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        adjusted = z + self.tau * self._like("log_prior", z)
        return F.cross_entropy(adjusted, target, reduction="none")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"


class BalancedSoftmax(PerSampleLoss):
    """Balanced softmax ``CE(z + log n, y)`` (Ren et al., NeurIPS 2020).

    The softmax is re-weighted by the training counts; it equals :class:`LogitAdjusted` with
    ``tau = 1`` because adding ``log N`` to every logit leaves the cross-entropy unchanged.

    Args:
        class_counts: training-set count of each class.
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor) -> None:
        counts = as_class_counts(class_counts, "BalancedSoftmax")
        super().__init__(len(counts))
        n = torch.tensor(counts, dtype=torch.float64)
        self._constant("log_counts", torch.log(n))

    def per_sample(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z + self._like("log_counts", z), target, reduction="none")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class VSLoss(PerSampleLoss):
    """Vector-scaling loss ``CE(z * (n / n_max)^gamma + tau * log pi, y)`` (Kini et al., NeurIPS 2021).

    A multiplicative adjustment (which shrinks the logits of rare classes, enlarging their margins in the
    separable regime) followed by the additive logit adjustment. ``gamma = 0`` gives
    :class:`LogitAdjusted` with the same ``tau``.

    Args:
        class_counts: training-set count of each class.
        gamma: exponent of the multiplicative adjustment, ``>= 0`` (0.05 to 0.3 across papers).
        tau: temperature of the additive adjustment, ``>= 0`` (0.75 to 1.2 across papers).
    """

    def __init__(
        self, class_counts: Sequence[int] | torch.Tensor, gamma: float = 0.2, tau: float = 1.0
    ) -> None:
        counts = as_class_counts(class_counts, "VSLoss")
        super().__init__(len(counts))
        self.gamma = _check_real("gamma", gamma, "VSLoss", low=0.0, strict=False)
        self.tau = _check_real("tau", tau, "VSLoss", low=0.0, strict=False)
        n = torch.tensor(counts, dtype=torch.float64)
        self._constant("scale", (n / n.max()).pow(self.gamma))
        self._constant("log_prior", torch.log(n / n.sum()))

    def per_sample(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        adjusted = z * self._like("scale", z) + self.tau * self._like("log_prior", z)
        return F.cross_entropy(adjusted, target, reduction="none")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}, tau={self.tau}"


class SmoothedCrossEntropy(PerSampleLoss):
    """Cross-entropy against ``(1 - s) e_y + s/(C - 1) (1 - e_y)``, the BiSAM authors' smoothing.

    ``loss_b = -(1 - s) log p_{y_b} - s/(C - 1) sum_{j != y_b} log p_j`` with ``p = softmax(z_b)``: the
    descent loss of the BiSAM authors' code (Xie et al., ICML 2024; s = 0.1). Not torch's
    ``label_smoothing=s``, which puts ``s / C`` on every class (the target included) and so gives
    ``1 - s + s/C`` to the target. Needs at least 2 classes.

    Args:
        smoothing: ``s`` in ``[0, 1]`` (0.1 in the BiSAM authors' code); 0 is cross-entropy.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        s = _check_real("smoothing", smoothing, "SmoothedCrossEntropy", low=0.0, strict=False)
        if s > 1.0:
            raise ValueError(f"SmoothedCrossEntropy: smoothing must be <= 1, got {smoothing!r}")
        super().__init__(None)
        self.smoothing = s

    def per_sample(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = z.shape[1]
        if classes < 2:
            raise ValueError(
                "SmoothedCrossEntropy spreads s over the C - 1 other classes: it needs logits of at "
                f"least 2 classes, got {classes}"
            )
        log_p = F.log_softmax(z, dim=1)
        target_term = -log_p.gather(1, target[:, None]).squeeze(1)
        others = -log_p.sum(1) - target_term
        return (1 - self.smoothing) * target_term + self.smoothing / (classes - 1) * others

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"
