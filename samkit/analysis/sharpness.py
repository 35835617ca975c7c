"""Sharpness of class and group losses, the normalised Hessian trace, and saddle indicators.

Three diagnostics that the long-tailed sharpness-aware methods argue from (see spec/ALGORITHMS.md):

* :func:`class_sharpness` / :func:`group_sharpness`: Focal-SAM's class-wise sharpness
  (Li et al., ICML 2025) ``S_G = max_{||e|| <= rho} L^G(w + e) - L^G(w)``, for every class or for named
  groups of classes (head/tail, many/medium/few);
* :func:`normalized_trace`: CR-SAM's normalised Hessian trace ``tr(H) / ||grad L||``
  (Wu, Luo & Wunsch, AAAI 2024);
* :func:`saddle_indicators`: per group, the most negative and the largest Hessian eigenvalues and the
  eigengaps, the quantities of SSE-SAM's saddle-escape argument (Lyu et al., AAAI 2025).

Group losses follow the convention of spec/ALGORITHMS.md: ``L^G(w) = (1/D) sum_{b: y_b in G} l_b(w)``
with ``D`` the number of samples in the data (``normalize="batch"``, the default: the group's *share* of
the loss, as in the Focal-SAM paper and code, so a rare class has a small loss and a small sharpness
because it has few samples), or ``D`` the number of samples of the group (``normalize="group"``: the
group's *mean* loss, which compares classes on an equal footing regardless of their frequency; it is
the batch-normalised value times ``N / N_G``).

Nothing here writes into the model: perturbed weights are passed to :func:`torch.func.functional_call`
as new tensors (``w + e`` is computed afresh from the untouched ``w``), so the parameters are "restored"
exactly, bit for bit, and train/eval flags, buffers and ``.grad`` are as before (see
:mod:`samkit.analysis.hvp`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from samkit.analysis.estimators import (
    EigenEstimate,
    ProgressArg,
    TraceEstimate,
    _Progress,
    extreme_eigenvalues,
    hutchinson_trace,
    hutchpp_trace,
    make_generator,
)
from samkit.analysis.hvp import (
    DataArg,
    DataSource,
    HessianOperator,
    LossFn,
    WeightsArg,
    _zeros_for_none,
    analysis_mode,
    check_params,
    class_weights,
    weighted_batches,
)

__all__ = [
    "NormalizedTrace",
    "SaddleIndicators",
    "SharpnessResult",
    "class_groups",
    "class_sharpness",
    "group_sharpness",
    "head_tail_groups",
    "normalized_trace",
    "saddle_indicators",
    "shot_class_groups",
]

EPS = 1e-12  # unit(g) = g / (||g|| + EPS), as in spec/ALGORITHMS.md
NORMALIZE = ("batch", "group")


# ----------------------------------------------------------------------------------------------------
# Groups


def class_groups(num_classes: int) -> dict[str, list[int]]:
    """One group per class: ``{"0": [0], "1": [1], ...}``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return {str(c): [c] for c in range(num_classes)}


def shot_class_groups(
    train_counts: Sequence[int] | np.ndarray | Tensor,
    many: int | None = None,
    few: int | None = None,
) -> dict[str, list[int]]:
    """Many / medium / few classes from training counts (:func:`samkit.data.shot_groups`; thresholds
    default to :func:`samkit.data.default_thresholds`). Empty groups are kept (with no classes)."""
    from samkit.data import default_thresholds, group_members, shot_groups

    counts = np.asarray(
        train_counts.detach().cpu() if isinstance(train_counts, Tensor) else train_counts
    )
    d_many, d_few = default_thresholds(int(counts.size))
    groups = shot_groups(counts, d_many if many is None else many, d_few if few is None else few)
    return group_members(groups)


def head_tail_groups(
    train_counts: Sequence[int] | np.ndarray | Tensor, eta: int
) -> dict[str, list[int]]:
    """Head and tail classes as in ImbSAM / SSE-SAM: tail = ``{c : n_c < eta}`` (strict), head the
    rest."""
    counts = np.asarray(
        train_counts.detach().cpu() if isinstance(train_counts, Tensor) else train_counts
    )
    return {
        "head": [int(c) for c in np.flatnonzero(counts >= eta)],
        "tail": [int(c) for c in np.flatnonzero(counts < eta)],
    }


def _check_groups(groups: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    if not groups:
        raise ValueError("groups must name at least one group")
    out = {}
    for name, members in groups.items():
        members = [int(c) for c in members]
        if any(c < 0 for c in members):
            raise ValueError(f"group {name!r} has a negative class index: {members}")
        out[str(name)] = members
    return out


def _group_counts(source: DataSource, groups: dict[str, list[int]]) -> tuple[np.ndarray, int]:
    """Samples of each group in the data, and the total number of samples (one pass, labels only)."""
    counts = np.zeros(len(groups), dtype=np.int64)
    total = 0
    for _, y in source:
        y = y.reshape(-1)
        total += int(y.numel())
        for i, members in enumerate(groups.values()):
            if members:
                table = torch.tensor(members, device=y.device, dtype=y.dtype)
                counts[i] += int(torch.isin(y, table).sum())
    return counts, total


def _global_norm(tensors: Sequence[Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors)))))


# ----------------------------------------------------------------------------------------------------
# Class-wise sharpness


@dataclass
class SharpnessResult:
    """Sharpness of group losses (one entry per group, in the order given).

    Attributes:
        names: group names (class indices as strings for :func:`class_sharpness`).
        classes: the classes of each group.
        counts: samples of each group in the data.
        rho: the radius.
        steps: projected-ascent steps of ``multi_step``.
        normalize: ``"batch"`` (share of the loss) or ``"group"`` (group mean); see the module notes.
        loss: ``L^G(w)``.
        grad_norm: ``||grad L^G(w)||``.
        one_step: ``L^G(w + rho unit(grad L^G(w))) - L^G(w)``, the SAM-style estimate.
        multi_step: the largest increase over the projected-ascent iterates and ``e = 0`` (so it is
            ``>= max(one_step, 0)`` exactly).
        trajectory: ``(groups, steps)`` loss increase at each ascent iterate (the first is one_step).
        num_passes: forward passes over the data spent.
    """

    names: list[str]
    classes: list[list[int]]
    counts: np.ndarray
    rho: float
    steps: int
    normalize: str
    loss: np.ndarray
    grad_norm: np.ndarray
    one_step: np.ndarray
    multi_step: np.ndarray
    trajectory: np.ndarray = field(repr=False)
    num_passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray) -> list:
            return [None if not math.isfinite(float(x)) else float(x) for x in np.ravel(a)]

        return {
            "names": self.names,
            "classes": self.classes,
            "counts": self.counts.tolist(),
            "rho": self.rho,
            "steps": self.steps,
            "normalize": self.normalize,
            "loss": clean(self.loss),
            "grad_norm": clean(self.grad_norm),
            "one_step": clean(self.one_step),
            "multi_step": clean(self.multi_step),
            "trajectory": [clean(row) for row in self.trajectory],
            "num_passes": self.num_passes,
        }


class _GroupObjective:
    """``L^G`` at ``w + e`` and its gradient w.r.t. ``e``, by functional calls (no writes)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        source: DataSource,
        params: list[Tensor],
        names: list[str],
        members: list[int],
        denominator: float,
        batch_stats: bool,
    ) -> None:
        self.model, self.loss_fn, self.source = model, loss_fn, source
        self.w = [p.detach() for p in params]
        self.names = names
        self.weights = class_weights(members)
        self.denominator = denominator
        self.batch_stats = batch_stats
        self.dtype = params[0].dtype
        self.passes = 0

    def __call__(
        self, e: list[Tensor] | None, need_grad: bool
    ) -> tuple[float, list[Tensor] | None]:
        if e is None:
            q = [w.clone() for w in self.w]
        else:
            q = torch._foreach_add(self.w, e)
        if need_grad:
            for t in q:
                t.requires_grad_(True)
        overrides = dict(zip(self.names, q, strict=True))
        grad = [torch.zeros_like(w) for w in self.w] if need_grad else None
        loss = 0.0
        self.passes += 1
        with analysis_mode(self.model, self.batch_stats), torch.set_grad_enabled(need_grad):
            for *_, total, _, _ in weighted_batches(
                self.model,
                self.loss_fn,
                self.source,
                self.weights,
                self.dtype,
                subset=not self.batch_stats,
                overrides=overrides,
            ):
                if total is None:
                    continue
                if need_grad:
                    g = torch.autograd.grad(total, q, allow_unused=True)
                    torch._foreach_add_(grad, _zeros_for_none(g, self.w))
                loss += float(total.detach())
        if grad is not None:
            torch._foreach_div_(grad, self.denominator)
        return loss / self.denominator, grad


def _ascent(obj: _GroupObjective, rho: float, steps: int) -> tuple[float, float, list[float]]:
    """Projected normalised gradient ascent in the ball ``||e|| <= rho``.

    ``e_0 = 0``; ``e_t = P(e_{t-1} + (rho / t) unit(grad L(w + e_{t-1})))`` with ``P`` the projection
    onto the ball, so ``e_1 = rho unit(grad L(w))`` is SAM's point and later steps shrink (a diminishing,
    non-summable step: the classical condition for projected (sub)gradient methods). Returns the loss
    at ``w``, its gradient norm, and the increases at ``e_1..e_steps``. If the gradient vanishes the
    ascent stops there (the remaining increases repeat the last one).
    """
    base, grad = obj(None, need_grad=True)
    assert grad is not None
    gnorm0 = _global_norm(grad)
    e = [torch.zeros_like(w) for w in obj.w]
    increases: list[float] = []
    for t in range(1, steps + 1):
        gn = _global_norm(grad)  # type: ignore[arg-type]
        if gn == 0.0:
            increases += [increases[-1] if increases else 0.0] * (steps - t + 1)
            break
        torch._foreach_add_(e, grad, alpha=(rho / t) / (gn + EPS))  # type: ignore[arg-type]
        en = _global_norm(e)
        if en > rho:
            torch._foreach_mul_(e, rho / en)
        value, grad = obj(e, need_grad=t < steps)
        increases.append(value - base)
    return base, gnorm0, increases


def group_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    groups: Mapping[str, Sequence[int]],
    *,
    rho: float = 0.05,
    steps: int = 5,
    normalize: str = "batch",
    params: Sequence[Tensor] | None = None,
    batch_stats: bool = False,
    progress: ProgressArg = None,
) -> SharpnessResult:
    """Sharpness ``S_G = max_{||e|| <= rho} L^G(w + e) - L^G(w)`` of each group's loss.

    Two estimates per group, both lower bounds of ``S_G`` (every evaluated point lies in the ball):

    * ``one_step``: SAM's first-order maximiser, ``L^G(w + rho unit(g)) - L^G(w)``, ``g = grad L^G(w)``;
    * ``multi_step``: ``steps`` projected normalised-gradient ascent steps from ``e = 0`` with step
      ``rho / t`` (the first step lands exactly on the one-step point), keeping the best value over the
      iterates and ``e = 0``. Hence ``multi_step >= one_step`` and ``multi_step >= 0`` hold exactly,
      while the last iterate alone need not beat the first on a non-concave loss.

    The true ``S_G`` is non-decreasing in ``rho``; the estimates follow it whenever the ascent finds the
    maximiser's neighbourhood, which holds for small radii (second-order regime) but is not guaranteed
    in general.

    Cost per group: ``steps + 1`` passes over the data (``steps`` of them with a backward). With
    eval-mode normalisation (the default) only the group's samples are forwarded, so all classes
    together cost about ``steps + 1`` passes; with ``batch_stats=True`` every sample is forwarded for
    every group, since batch statistics couple the samples.

    Args:
        model, loss_fn, data: as for :class:`~samkit.analysis.hvp.HessianOperator`.
        groups: name -> classes, e.g. :func:`class_groups`, :func:`shot_class_groups`,
            :func:`head_tail_groups`.
        rho: radius (the global L2 norm over ``params``).
        steps: ascent steps (>= 1; 1 gives ``multi_step = max(one_step, 0)``).
        normalize: ``"batch"`` or ``"group"`` (see the module notes).
        params: the perturbed parameters (default: every trainable one).
        batch_stats: normalisation layers use batch statistics (as in training) instead of running ones.
        progress: None, True (tqdm over groups), or a callback ``(groups_done, groups_total)``.

    Groups with no sample in the data get NaN (their sharpness is undefined) and count 0.
    """
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    chosen, names = check_params(model, params)
    groups = _check_groups(groups)
    source = DataSource(data, chosen[0].device, chosen[0].dtype)
    counts, total = _group_counts(source, groups)
    if total == 0:
        raise ValueError("the data hold no samples")
    n_groups = len(groups)
    nan = np.full(n_groups, np.nan)
    loss, gnorm, one, multi = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    traj = np.full((n_groups, steps), np.nan)
    passes = 1
    bar = _Progress(progress, n_groups, "sharpness")
    try:
        for i, members in enumerate(groups.values()):
            if counts[i] > 0:
                denominator = float(total if normalize == "batch" else counts[i])
                obj = _GroupObjective(
                    model, loss_fn, source, chosen, names, members, denominator, batch_stats
                )
                base, g0, inc = _ascent(obj, float(rho), steps)
                loss[i], gnorm[i] = base, g0
                traj[i] = inc
                one[i] = inc[0]
                multi[i] = max(0.0, *inc)
                passes += obj.passes
            bar.update()
    finally:
        bar.close()
    return SharpnessResult(
        names=list(groups),
        classes=list(groups.values()),
        counts=counts,
        rho=float(rho),
        steps=steps,
        normalize=normalize,
        loss=loss,
        grad_norm=gnorm,
        one_step=one,
        multi_step=multi,
        trajectory=traj,
        num_passes=passes,
    )


def class_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    num_classes: int | None = None,
    **kwargs: Any,
) -> SharpnessResult:
    """Focal-SAM's class-wise sharpness ``S_i`` for every class ``0..num_classes-1`` (default: one more
    than the largest label in the data). Keyword arguments as for :func:`group_sharpness`."""
    if num_classes is None:
        device = next(model.parameters()).device
        num_classes = 1 + max(int(y.max()) for _, y in DataSource(data, device))
    return group_sharpness(model, loss_fn, data, class_groups(num_classes), **kwargs)


# ----------------------------------------------------------------------------------------------------
# Normalised trace (CR-SAM)


@dataclass
class NormalizedTrace:
    """CR-SAM's normalised Hessian trace ``C = tr(H) / ||grad L||``.

    Attributes:
        value: ``C``.
        stderr: its standard error, ``trace.stderr / ||grad L||`` (the gradient of the given data is
            computed exactly, so only the trace is random).
        trace: the trace estimate.
        grad_norm: ``||grad L(w)||``.
        loss: ``L(w)``.
    """

    value: float
    stderr: float
    trace: TraceEstimate
    grad_norm: float
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "stderr": self.stderr,
            "grad_norm": self.grad_norm,
            "loss": self.loss,
            "trace": self.trace.to_dict(),
        }


def normalized_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    *,
    method: str = "hutchinson",
    params: Sequence[Tensor] | None = None,
    weights: WeightsArg = None,
    batch_stats: bool = False,
    generator: torch.Generator | int | None = None,
    progress: ProgressArg = None,
    **estimator_kwargs: Any,
) -> NormalizedTrace:
    """``tr(H) / ||grad L||`` (Wu et al., AAAI 2024, CR-SAM's curvature measure; large values mean
    curvature that the gradient does not "see", which plain SAM's first-order ascent misses).

    ``method``: ``"hutchinson"`` (:func:`hutchinson_trace`, keyword arguments ``rtol``, ``min_probes``,
    ``max_probes``) or ``"hutch++"`` (:func:`hutchpp_trace`, keyword argument ``num_hvps``). A zero
    gradient gives ``inf`` (or NaN for a zero trace).
    """
    op = HessianOperator(
        model, loss_fn, data, params=params, weights=weights, batch_stats=batch_stats
    )
    gen = make_generator(generator)
    if method == "hutchinson":
        trace = hutchinson_trace(op, generator=gen, progress=progress, **estimator_kwargs)
    elif method == "hutch++":
        trace = hutchpp_trace(op, generator=gen, progress=progress, **estimator_kwargs)
    else:
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    gn = _global_norm(op.gradient())
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(np.float64(trace.estimate) / np.float64(gn))
        stderr = float(np.float64(trace.stderr) / np.float64(gn))
    return NormalizedTrace(value=value, stderr=stderr, trace=trace, grad_norm=gn, loss=op.loss())


# ----------------------------------------------------------------------------------------------------
# Saddle indicators (SSE-SAM)


@dataclass
class SaddleIndicators:
    """Curvature of one group's loss at ``w`` (all NaN for a group with no sample in the data).

    Attributes:
        name, classes, count: the group, its classes, its samples in the data.
        loss, grad_norm: ``L^G(w)`` and ``||grad L^G(w)||`` (a saddle has a small gradient).
        lambda_min: the most negative (smallest algebraic) Hessian eigenvalue; ``< 0`` means a saddle
            or a non-minimum, with ``-lambda_min`` the curvature along the best escape direction.
        lambda_min2: the next smallest eigenvalue.
        bottom_gap: ``lambda_min2 - lambda_min >= 0``, the eigengap at the bottom: how far the escape
            direction stands out from the rest of the spectrum (a large gap gives one clear escape
            direction, which gradient noise or an ascent step amplifies fastest relative to the others;
            a small one a flat cluster of weak escape directions; it also sets how fast Lanczos
            resolves ``lambda_min``, so read it together with ``residual_min``).
        lambda_max, lambda_max2, top_gap: the largest two eigenvalues and ``lambda_max - lambda_max2``.
        negative_ratio: ``-lambda_min / lambda_max``, the relative size of the negative curvature.
        residual_min, residual_max: Lanczos residuals of ``lambda_min`` and ``lambda_max``.
        eigen: the full :class:`~samkit.analysis.estimators.EigenEstimate` (None for an empty group).
    """

    name: str
    classes: list[int]
    count: int
    loss: float
    grad_norm: float
    lambda_min: float
    lambda_min2: float
    bottom_gap: float
    lambda_max: float
    lambda_max2: float
    top_gap: float
    negative_ratio: float
    residual_min: float
    residual_max: float
    eigen: EigenEstimate | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key == "eigen":
                out[key] = None if value is None else value.to_dict()
            elif isinstance(value, float) and not math.isfinite(value):
                out[key] = None
            else:
                out[key] = value
        return out


def saddle_indicators(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    groups: Mapping[str, Sequence[int]],
    *,
    max_steps: int = 100,
    tol: float = 1e-3,
    normalize: str = "batch",
    params: Sequence[Tensor] | None = None,
    batch_stats: bool = False,
    generator: torch.Generator | int | None = None,
    progress: ProgressArg = None,
) -> dict[str, SaddleIndicators]:
    """Most negative and largest Hessian eigenvalues, and the eigengaps, of each group's loss.

    SSE-SAM (Lyu et al., AAAI 2025) argues that SAM escapes saddle points of the head loss and of the
    tail loss at different rates, and perturbs the two separately; these indicators make the argument
    measurable: per group (e.g. :func:`head_tail_groups`), the Hessian of ``L^G`` is probed by
    Lanczos (:func:`~samkit.analysis.estimators.extreme_eigenvalues` with ``k = 2``, both ends,
    ``max_steps`` and ``tol`` as there) for ``lambda_min``, the next one, ``lambda_max`` and the next
    one. ``bottom_gap = lambda_min2 - lambda_min`` is the gap between the most negative eigenvalue and
    the next, ``top_gap = lambda_max - lambda_max2``. ``normalize`` as in :func:`group_sharpness`
    (eigenvalues scale with ``1/D``). The groups draw their start vectors, in order, from one
    generator (``generator``: a seed or a torch.Generator).
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    groups = _check_groups(groups)
    chosen, _ = check_params(model, params)
    counts, _ = _group_counts(DataSource(data, chosen[0].device), groups)
    gen = make_generator(generator)
    out: dict[str, SaddleIndicators] = {}
    for (name, members), count in zip(groups.items(), counts, strict=True):
        if count == 0:
            nan = math.nan
            out[name] = SaddleIndicators(
                name, members, 0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan
            )
            continue
        op = HessianOperator(
            model,
            loss_fn,
            data,
            params=chosen,
            weights=class_weights(members),
            normalize="batch" if normalize == "batch" else "weights",
            batch_stats=batch_stats,
        )
        eig = extreme_eigenvalues(
            op, 2, which="both", max_steps=max_steps, tol=tol, generator=gen, progress=progress
        )
        bottom, top = eig.bottom, eig.top
        l_min2 = float(bottom[1]) if bottom.size > 1 else math.nan
        l_max2 = float(top[1]) if top.size > 1 else math.nan
        l_min, l_max = float(bottom[0]), float(top[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = float(np.float64(-l_min) / np.float64(l_max))
        out[name] = SaddleIndicators(
            name=name,
            classes=members,
            count=int(count),
            loss=op.loss(),
            grad_norm=_global_norm(op.gradient()),
            lambda_min=l_min,
            lambda_min2=l_min2,
            bottom_gap=l_min2 - l_min,
            lambda_max=l_max,
            lambda_max2=l_max2,
            top_gap=l_max - l_max2,
            negative_ratio=ratio,
            residual_min=float(eig.bottom_residuals[0]),
            residual_max=float(eig.top_residuals[0]),
            eigen=eig,
        )
        op.release()
    return out
