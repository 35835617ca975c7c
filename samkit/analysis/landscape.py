"""Loss-landscape slices: 1D and 2D along filter-normalised random directions, and the line between
two sets of weights.

Filter normalisation (Li, Xu, Taylor, Studer & Goldstein, NeurIPS 2018, "Visualizing the Loss Landscape
of Neural Nets"): a Gaussian direction ``d`` is rescaled filter by filter, ``d_f <- d_f / ||d_f|| *
||w_f||``, where a filter is one output unit of a layer (a slice ``[o]`` along the first dimension of
a weight with two or more dimensions: a conv output channel, a row of a linear layer). This removes the
scale invariance of ReLU networks with normalisation layers, so that slices of different networks are
comparable. Parameters with one dimension (biases, normalisation scales and shifts) get a zero direction
by default (``bias_bn="zero"``, Li et al.'s choice in their plots), or ``bias_bn="keep"``: a Gaussian
direction rescaled to the parameter's norm as a single filter. A parameter whose filter is zero gets
a zero direction there.

Every function evaluates the model through :func:`torch.func.functional_call` with new tensors
``w + a d1 + b d2``: the model's weights are never written, so they are exactly as before, and so are
train/eval flags, buffers and ``.grad`` (see :mod:`samkit.analysis.hvp`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from samkit.analysis.estimators import ProgressArg, _Progress, make_generator
from samkit.analysis.hvp import (
    DataArg,
    DataSource,
    LossFn,
    WeightsArg,
    analysis_mode,
    check_params,
    weighted_batches,
)

__all__ = [
    "BIAS_BN",
    "Slice1D",
    "Slice2D",
    "filter_normalized_direction",
    "interpolation_slice",
    "slice_1d",
    "slice_2d",
]

BIAS_BN = ("zero", "keep")
_ALPHAS_1D = tuple(round(float(a), 12) for a in np.linspace(-1.0, 1.0, 21))
_ALPHAS_2D = tuple(round(float(a), 12) for a in np.linspace(-1.0, 1.0, 11))
_TS = tuple(round(float(a), 12) for a in np.linspace(0.0, 1.0, 11))
Direction = Mapping[str, Tensor]


def filter_normalized_direction(
    model: nn.Module,
    *,
    params: Sequence[Tensor] | None = None,
    bias_bn: str = "zero",
    generator: torch.Generator | int | None = None,
) -> dict[str, Tensor]:
    """A random direction ``{parameter name: tensor}``, filter-normalised as in Li et al. (2018).

    Args:
        model: the model (its weights give the filter norms; not modified).
        params: parameters that get a direction (default: every trainable one); others are left out.
        bias_bn: ``"zero"`` (one-dimensional parameters get a zero direction) or ``"keep"`` (each is
            rescaled to its own norm, as one filter).
        generator: seeded generator (int or torch.Generator; None means seed 0). Draws happen on the
            generator's device in float64 and are then cast, so a seed gives the same direction on
            every device (up to the cast).
    """
    if bias_bn not in BIAS_BN:
        raise ValueError(f"bias_bn must be one of {BIAS_BN}, got {bias_bn!r}")
    chosen, names = check_params(model, params)
    gen = make_generator(generator)
    out: dict[str, Tensor] = {}
    for name, p in zip(names, chosen, strict=True):
        w = p.detach()
        d = torch.randn(w.shape, generator=gen, device=gen.device, dtype=torch.float64)
        d = d.to(device=w.device, dtype=w.dtype)
        if w.ndim <= 1:
            if bias_bn == "zero":
                d.zero_()
            else:
                d.mul_(torch.linalg.vector_norm(w) / (torch.linalg.vector_norm(d) + 1e-10))
        else:
            w_norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
            d_norm = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
            scale = w_norm / (d_norm + 1e-10)
            d.mul_(scale.view(-1, *([1] * (w.ndim - 1))))
        out[name] = d
    return out


@dataclass
class Slice1D:
    """Loss (and accuracy) along a line ``w(t)``.

    Attributes:
        coords: the coordinates ``t`` (step along the direction, or the interpolation parameter with
            ``t = 0`` the start and ``t = 1`` the end).
        loss: the mean loss at each coordinate.
        accuracy: the top-1 accuracy at each coordinate (NaN when the outputs are not class logits).
        kind: ``"direction"`` or ``"interpolation"``.
    """

    coords: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    kind: str = "direction"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "coords": self.coords.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": [None if math.isnan(a) else float(a) for a in self.accuracy],
        }


@dataclass
class Slice2D:
    """Loss (and accuracy) on the plane ``w + a d1 + b d2``; ``loss[i, j]`` is at ``(alphas[i],
    betas[j])``."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas.tolist(),
            "betas": self.betas.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": [
                [None if math.isnan(a) else float(a) for a in row] for row in self.accuracy
            ],
        }


class _Evaluator:
    """Mean (weighted) loss and accuracy of the model with some tensors replaced."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: DataArg,
        weights: WeightsArg,
        batch_stats: bool,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.get_default_dtype()
        self.source = DataSource(data, self.device, self.dtype)
        self.weights = weights
        self.batch_stats = batch_stats

    @torch.no_grad()
    def __call__(self, overrides: Mapping[str, Tensor]) -> tuple[float, float]:
        loss = count = 0.0
        correct = seen = 0
        logits_ok = True
        with analysis_mode(self.model, self.batch_stats):
            for x, y, a, total, logits, mask in weighted_batches(
                self.model,
                self.loss_fn,
                self.source,
                self.weights,
                self.dtype,
                subset=not self.batch_stats,
                overrides=overrides,
            ):
                count += float(x.shape[0])
                if total is None:
                    continue
                loss += float(total)
                assert logits is not None
                if mask.shape[0] != y.shape[0]:  # the forward saw only the weighted samples
                    y = y[a != 0]  # type: ignore[operator]
                if logits.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
                    hits = (logits.argmax(dim=1) == y) & mask
                    correct += int(hits.sum())
                    seen += int(mask.sum())
                else:
                    logits_ok = False
        if count == 0:
            raise ValueError("the data hold no samples")
        accuracy = correct / seen if logits_ok and seen > 0 else math.nan
        return loss / count, accuracy


def _check_direction(
    model: nn.Module, direction: Direction, params: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    out = {}
    for name, d in direction.items():
        if name not in params:
            raise ValueError(f"direction names {name!r}, which is not a parameter of the model")
        w = params[name]
        if d.shape != w.shape:
            raise ValueError(
                f"direction for {name!r} has shape {tuple(d.shape)}, parameter {tuple(w.shape)}"
            )
        out[name] = d.detach().to(device=w.device, dtype=w.dtype)
    return out


def _grid(values: Sequence[float] | np.ndarray | Tensor, name: str) -> np.ndarray:
    arr = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=float)
    if arr.ndim != 1 or arr.size < 1 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a non-empty 1D sequence of finite numbers")
    return arr


def slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    direction: Direction | None = None,
    *,
    alphas: Sequence[float] | np.ndarray = _ALPHAS_1D,
    generator: torch.Generator | int | None = None,
    bias_bn: str = "zero",
    weights: WeightsArg = None,
    batch_stats: bool = False,
    progress: ProgressArg = None,
) -> Slice1D:
    """Loss and accuracy at ``w + a d`` for each ``a`` in ``alphas``.

    ``direction`` (name -> tensor, e.g. from :func:`filter_normalized_direction`) defaults to a
    filter-normalised random one drawn from ``generator`` with ``bias_bn``. The loss is the mean
    ``(1/N) sum_b a_b l_b`` (``weights`` as for :class:`~samkit.analysis.hvp.HessianOperator`);
    accuracy is over the samples with nonzero weight.
    """
    coords = _grid(alphas, "alphas")
    named = dict(model.named_parameters())
    if direction is None:
        direction = filter_normalized_direction(model, generator=generator, bias_bn=bias_bn)
    d = _check_direction(model, direction, named)
    evaluate = _Evaluator(model, loss_fn, data, weights, batch_stats)
    loss, acc = np.empty(coords.size), np.empty(coords.size)
    bar = _Progress(progress, coords.size, "slice")
    try:
        for i, a in enumerate(coords):
            with torch.no_grad():
                over = {n: named[n].detach() + float(a) * t for n, t in d.items()}
            loss[i], acc[i] = evaluate(over)
            bar.update()
    finally:
        bar.close()
    return Slice1D(coords=coords, loss=loss, accuracy=acc, kind="direction")


def slice_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    directions: tuple[Direction, Direction] | None = None,
    *,
    alphas: Sequence[float] | np.ndarray = _ALPHAS_2D,
    betas: Sequence[float] | np.ndarray | None = None,
    generator: torch.Generator | int | None = None,
    bias_bn: str = "zero",
    weights: WeightsArg = None,
    batch_stats: bool = False,
    progress: ProgressArg = None,
) -> Slice2D:
    """Loss and accuracy at ``w + a d1 + b d2`` on the grid ``alphas x betas`` (betas default to
    alphas). ``directions`` default to two independent filter-normalised random directions (nearly
    orthogonal in high dimension, as in Li et al.)."""
    a_grid = _grid(alphas, "alphas")
    b_grid = a_grid.copy() if betas is None else _grid(betas, "betas")
    named = dict(model.named_parameters())
    if directions is None:
        gen = make_generator(generator)
        directions = (
            filter_normalized_direction(model, generator=gen, bias_bn=bias_bn),
            filter_normalized_direction(model, generator=gen, bias_bn=bias_bn),
        )
    d1 = _check_direction(model, directions[0], named)
    d2 = _check_direction(model, directions[1], named)
    keys = sorted(set(d1) | set(d2))
    evaluate = _Evaluator(model, loss_fn, data, weights, batch_stats)
    loss = np.empty((a_grid.size, b_grid.size))
    acc = np.empty_like(loss)
    bar = _Progress(progress, loss.size, "slice")
    try:
        for i, a in enumerate(a_grid):
            for j, b in enumerate(b_grid):
                with torch.no_grad():
                    over = {}
                    for n in keys:
                        t = named[n].detach()
                        if n in d1:
                            t = t + float(a) * d1[n]
                        if n in d2:
                            t = t + float(b) * d2[n]
                        over[n] = t
                loss[i, j], acc[i, j] = evaluate(over)
                bar.update()
    finally:
        bar.close()
    return Slice2D(alphas=a_grid, betas=b_grid, loss=loss, accuracy=acc)


def _state_of(obj: Mapping[str, Tensor] | nn.Module) -> Mapping[str, Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def interpolation_slice(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    start: Mapping[str, Tensor] | nn.Module,
    end: Mapping[str, Tensor] | nn.Module,
    *,
    ts: Sequence[float] | np.ndarray = _TS,
    buffers: str = "interpolate",
    weights: WeightsArg = None,
    batch_stats: bool = False,
    progress: ProgressArg = None,
) -> Slice1D:
    """Loss and accuracy at ``(1 - t) w_start + t w_end`` (Goodfellow, Vinyals & Saxe, ICLR 2015).

    ``start`` and ``end`` are state dicts (or models) of ``model``'s architecture, e.g. two checkpoints;
    ``model`` only serves as the template and is not modified. Every floating-point parameter is
    interpolated. Buffers: ``"interpolate"`` interpolates floating-point buffers too (BatchNorm running
    mean and variance; a convex combination of variances stays positive) and takes integer ones
    (``num_batches_tracked``) from the model; ``"model"`` keeps the model's buffers. With
    ``batch_stats=True`` normalisation layers use batch statistics, so running statistics do not matter
    (the usual remedy when interpolated statistics are off). ``t`` outside ``[0, 1]`` extrapolates.
    """
    if buffers not in ("interpolate", "model"):
        raise ValueError(f"buffers must be 'interpolate' or 'model', got {buffers!r}")
    coords = _grid(ts, "ts")
    a_state, b_state = _state_of(start), _state_of(end)
    template = dict(model.named_parameters())
    if buffers == "interpolate":
        template.update(
            {n: b for n, b in model.named_buffers() if b is not None and b.is_floating_point()}
        )
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for name, ref in template.items():
        if not ref.is_floating_point():
            continue
        if name not in a_state or name not in b_state:
            raise ValueError(f"{name!r} is missing from the start or end state dict")
        a, b = a_state[name], b_state[name]
        if a.shape != ref.shape or b.shape != ref.shape:
            raise ValueError(
                f"{name!r}: shapes {tuple(a.shape)} and {tuple(b.shape)}, expected "
                f"{tuple(ref.shape)}"
            )
        pairs[name] = (
            a.detach().to(device=ref.device, dtype=ref.dtype),
            b.detach().to(device=ref.device, dtype=ref.dtype),
        )
    evaluate = _Evaluator(model, loss_fn, data, weights, batch_stats)
    loss, acc = np.empty(coords.size), np.empty(coords.size)
    bar = _Progress(progress, coords.size, "interpolation")
    try:
        for i, t in enumerate(coords):
            with torch.no_grad():
                over = {n: torch.lerp(a, b, float(t)) for n, (a, b) in pairs.items()}
            loss[i], acc[i] = evaluate(over)
            bar.update()
    finally:
        bar.close()
    return Slice1D(coords=coords, loss=loss, accuracy=acc, kind="interpolation")
