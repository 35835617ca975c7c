"""Hessian-vector products of a model's (weighted) mean loss, with no side effects on the model.

The object of study is the loss

    L_a(w) = (1/D) sum_b a_b l_b(w),

over one batch or over every batch of a loader, where ``l_b`` is the per-sample loss, ``a_b`` an optional
per-sample weight (1 by default; e.g. ``a_b = [y_b in G]`` for the loss of a class group G), and ``D``
the number of samples (``normalize="batch"``: a group's *share* of the loss, the convention of
spec/ALGORITHMS.md, which makes an empty group contribute exactly zero) or the sum of the weights
(``normalize="weights"``: the group's *mean* loss). Its Hessian with respect to the model's trainable
parameters (or a given subset) is exposed as a linear operator, :class:`HessianOperator`, computed by
double backpropagation (Pearlmutter 1994): ``H v = d/dw <grad L(w), v>``.

No side effects. The model is called directly, or through :func:`torch.func.functional_call` when
tensors must be substituted (perturbed weights, cloned statistics); nothing is ever written into it.
After every call the model's train/eval flags (per module), its buffers (BatchNorm running statistics
and ``num_batches_tracked``: same tensors, same values) and its parameters (values and ``.grad``) are
exactly what they were. By default the model is evaluated in eval mode
(normalisation layers use their running statistics, dropout is off). ``batch_stats=True`` puts only the
normalisation layers in train mode, so they normalise with the batch's statistics as in training, while
everything else stays in eval mode (so dropout cannot make the operator random); their running
statistics are updated in throw-away clones, never in the model.

With eval-mode normalisation (the default), samples whose weight is zero are not forwarded at all,
which makes the loss of one class cheap; this assumes that a sample's output does not depend on the
other samples of the batch, which holds for standard networks in eval mode (with ``batch_stats=True``
every sample is forwarded, since batch statistics couple them).

A loader must yield the same batches on every pass, since each Hessian-vector product is one pass over
it: a list of batches, or a loader with ``state_dict`` / ``load_state_dict`` such as
:class:`samkit.data.BatchLoader`, which is rewound to its initial state before every pass and left in
that state (a BatchLoader then replays the same order and the same seeded augmentation). One-shot
iterators (generators) are materialised once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Batch",
    "DataArg",
    "HessianOperator",
    "LinearOperator",
    "LossFn",
    "MatrixOperator",
    "WeightsArg",
    "analysis_mode",
    "class_weights",
    "dense_hessian",
    "hvp",
]

Batch = tuple[Tensor, Tensor]
#: One batch ``(inputs, labels)`` or an iterable of them (a loader).
DataArg = Batch | Iterable[Batch]
LossFn = Callable[[Tensor, Tensor], Tensor]
#: Per-sample weights: ``None`` (all ones), a ``(B,)`` tensor (single batch only), or a function
#: ``(inputs, labels) -> (B,)`` applied to every batch.
WeightsArg = Tensor | Callable[[Tensor, Tensor], Tensor] | None

NORMALIZATIONS = ("batch", "weights")


@runtime_checkable
class LinearOperator(Protocol):
    """What the estimators need: a symmetric linear map on flat vectors of length ``dim``."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    num_hvps: int

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A v`` for a flat vector ``v`` of length ``dim``."""
        ...


class MatrixOperator:
    """An explicit symmetric matrix as a :class:`LinearOperator` (tests, toy problems, references).

    Args:
        matrix: ``(n, n)`` symmetric tensor. Symmetry is not checked (the estimators assume it).
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_hvps = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.num_hvps += 1
        return self.matrix @ v


def class_weights(classes: Iterable[int]) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-sample weights ``a_b = [y_b in classes]``, for the loss of one class or a group of classes."""
    members = sorted({int(c) for c in classes})

    def weights(inputs: Tensor, labels: Tensor) -> Tensor:
        del inputs
        table = torch.tensor(members, device=labels.device, dtype=labels.dtype)
        return torch.isin(labels, table).to(torch.get_default_dtype())

    weights.classes = members  # type: ignore[attr-defined]
    return weights


def _is_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    )


class DataSource:
    """Re-iterable view of a batch or a loader, yielding batches on ``device`` with floating-point
    inputs cast to ``dtype`` (the analysed parameters' dtype, if given; see the module notes).

    Each pass rewinds a loader that has ``state_dict``/``load_state_dict`` to its state at construction
    and leaves it there afterwards, so passes see the same batches and the loader is not advanced.
    """

    def __init__(
        self, data: DataArg, device: torch.device, dtype: torch.dtype | None = None
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.single = _is_batch(data)
        self._state: Any = None
        if self.single:
            x, y = data  # type: ignore[misc]
            self._data: Any = [(x, y)]
        elif iter(data) is data:  # type: ignore[arg-type]
            self._data = list(data)  # a one-shot iterator: keep its batches
        else:
            self._data = data
            if hasattr(data, "state_dict") and hasattr(data, "load_state_dict"):
                self._state = copy.deepcopy(data.state_dict())

    def __iter__(self) -> Iterator[Batch]:
        if self._state is not None:
            self._data.load_state_dict(copy.deepcopy(self._state))
        try:
            for batch in self._data:
                if not _is_batch(batch):
                    raise ValueError(
                        "every batch must be a pair (inputs, labels) of tensors; got "
                        f"{type(batch).__name__}"
                    )
                x, y = batch
                if self.dtype is not None and x.is_floating_point():
                    x = x.to(device=self.device, dtype=self.dtype)
                yield x.to(self.device), y.to(self.device)
        finally:
            if self._state is not None:
                self._data.load_state_dict(copy.deepcopy(self._state))


@contextlib.contextmanager
def analysis_mode(model: nn.Module, batch_stats: bool = False) -> Iterator[None]:
    """Evaluate ``model`` in eval mode (``batch_stats=True``: normalisation layers in train mode, all
    else in eval mode), restoring every module's ``training`` flag on exit, whatever happens.

    The flags are set and restored directly, not through ``Module.train``, so overridden ``train``
    methods (which may do more than set the flag) are never invoked."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m in model.modules():
            m.training = batch_stats and isinstance(m, nn.modules.batchnorm._NormBase)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _stat_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Named buffers of the modules that are in train mode (they may write them during a forward)."""
    out = []
    for prefix, m in model.named_modules():
        if m.training:
            for name, b in m.named_buffers(prefix=prefix, recurse=False):
                if b is not None:
                    out.append((name, b))
    return out


def forward(model: nn.Module, x: Tensor, overrides: Mapping[str, Tensor] | None = None) -> Tensor:
    """Call ``model(x)`` with some parameters replaced (``overrides``: name -> tensor), without writing
    anything into the model: buffers that a train-mode module would update are replaced by clones."""
    swap = {name: b.clone() for name, b in _stat_buffers(model)}
    if overrides:
        swap.update(overrides)
    if not swap:
        return model(x)
    return functional_call(model, swap, (x,), strict=False)


def resolve_weights(
    weights: WeightsArg, x: Tensor, y: Tensor, dtype: torch.dtype, single: bool
) -> Tensor | None:
    """The ``(B,)`` per-sample weights of a batch in ``dtype``, or None for all ones."""
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        if not single:
            raise ValueError(
                "a weights tensor is only valid for a single batch; for a loader pass a function "
                "(inputs, labels) -> (B,) weights, e.g. samkit.analysis.class_weights([3, 4])"
            )
        a = weights
    else:
        a = weights(x, y)
    a = torch.as_tensor(a).to(device=x.device, dtype=dtype)
    if a.shape != (x.shape[0],):
        raise ValueError(f"weights must have shape ({x.shape[0]},), got {tuple(a.shape)}")
    return a


def weighted_batches(
    model: nn.Module,
    loss_fn: LossFn,
    source: Any,
    weights: Any,
    dtype: torch.dtype | None,
    *,
    subset: bool,
    overrides: Mapping[str, Tensor] | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor]]:
    """For each batch of a DataSource: ``(x, y, a, total, outputs, mask)``, with ``a`` its resolved
    weights and the rest from :func:`weighted_loss_sum`."""
    for x, y in source:
        a = resolve_weights(weights, x, y, dtype, source.single)
        total, logits, mask = weighted_loss_sum(
            model, loss_fn, x, y, a, subset=subset, overrides=overrides, dtype=dtype
        )
        yield x, y, a, total, logits, mask


def weighted_loss_sum(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    a: Tensor | None,
    *,
    subset: bool,
    overrides: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """``(sum_b a_b l_b, outputs, mask)`` on one batch, where ``mask`` marks, among the samples the
    outputs cover, those with a nonzero weight; ``(None, None, mask)`` if every weight is zero and
    ``subset`` allows skipping the forward.

    With ``subset`` (valid when samples do not interact: eval-mode normalisation), only samples with a
    nonzero weight are forwarded, which makes class losses much cheaper; the outputs then cover only
    those samples.
    """
    mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if a is None else a != 0
    if a is not None and subset and not bool(mask.all()):
        index = mask.nonzero().squeeze(1)
        if index.numel() == 0:
            return None, None, mask[:0]
        x, y, a, mask = x[index], y[index], a[index], mask[index]
    logits = forward(model, x, overrides)
    losses = loss_fn(logits, y)
    if losses.shape != (x.shape[0],):
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({x.shape[0]},); got "
            f"{tuple(losses.shape)} (use reduction='none')"
        )
    if dtype is not None:
        losses = losses.to(dtype)
    total = losses.sum() if a is None else (losses * a).sum()
    return total, logits, mask


def check_params(
    model: nn.Module, params: Sequence[Tensor] | None
) -> tuple[list[Tensor], list[str]]:
    """The analysed parameters (default: every trainable one) and their names in ``model``.

    Raises:
        ValueError: if a tensor is not a parameter of ``model``, is repeated, does not require grad,
            or the parameters mix dtypes or devices (flat vectors need one of each).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen = list(params)
        if len({id(p) for p in chosen}) != len(chosen):
            raise ValueError("params contains the same tensor twice")
    if not chosen:
        raise ValueError("no parameters to analyse (none of the model's parameters requires grad)")
    for p in chosen:
        if id(p) not in names:
            raise ValueError("params must be parameters of the model (model.named_parameters())")
        if not p.requires_grad:
            raise ValueError(f"parameter {names[id(p)]!r} does not require grad")
    if len({p.dtype for p in chosen}) > 1 or len({p.device for p in chosen}) > 1:
        raise ValueError(
            "the analysed parameters must share one dtype and one device; got "
            f"{sorted({str(p.dtype) for p in chosen})} on {sorted({str(p.device) for p in chosen})}"
        )
    return chosen, [names[id(p)] for p in chosen]


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]


class HessianOperator:
    """The Hessian of ``L_a(w) = (1/D) sum_b a_b l_b(w)`` w.r.t. ``params``, as a linear operator.

    ``op(v)`` takes and returns a list of tensors shaped like ``params``; ``op.matvec(v)`` the same on a
    flat vector of length ``op.dim`` (the estimators use this). ``op.num_hvps`` counts the products.

    Args:
        model: any :class:`torch.nn.Module`; never modified (see the module notes).
        loss_fn: per-sample loss ``loss_fn(outputs, labels) -> (B,)``.
        data: one batch ``(inputs, labels)`` or an iterable of batches yielding the same batches on
            every pass; the loss is averaged over all of them. Floating-point inputs are cast to the
            parameters' dtype (so a float32 loader can feed a float64 model).
        params: the parameters to differentiate w.r.t. (default: every parameter with requires_grad).
            They must share one dtype (the operator's: use a float64 model for exact tests).
        weights: per-sample weights ``a_b`` (see :data:`WeightsArg`), e.g. :func:`class_weights`.
        normalize: ``"batch"``: D = number of samples (a group's share of the loss; zero for an empty
            group); ``"weights"``: D = sum of the weights (the group's mean loss).
        batch_stats: normalisation layers use batch statistics (train mode) instead of running ones.
        cache_graph: keep the gradient's autograd graph between products, so a product costs one
            backward pass instead of a forward and two backwards (the graph's activations stay in
            memory). Default: on for a single batch, off for a loader (it would keep every batch's
            graph). If the parameters or buffers are modified in place later (an optimizer step),
            the next call notices it (tensor version counters) and recomputes the graph, gradient
            and loss, so the operator always describes the current weights.

    Gradient and loss of the same objective: :meth:`gradient`, :meth:`loss`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: DataArg,
        *,
        params: Sequence[Tensor] | None = None,
        weights: WeightsArg = None,
        normalize: str = "batch",
        batch_stats: bool = False,
        cache_graph: bool | None = None,
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.params, self.names = check_params(model, params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = int(sum(self.numels))
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.weights = weights
        self.normalize = normalize
        self.batch_stats = bool(batch_stats)
        self.source = DataSource(data, self.device, self.dtype)
        if isinstance(weights, Tensor) and not self.source.single:
            raise ValueError(
                "a weights tensor is only valid for a single batch; for a loader pass a function "
                "(inputs, labels) -> (B,) weights, e.g. samkit.analysis.class_weights([3, 4])"
            )
        self.num_hvps = 0
        self._denominator: float | None = None
        self._grad: list[Tensor] | None = None
        self._loss: float | None = None
        self._graph: list[list[Tensor]] | None = None  # per batch: gradient terms with graph
        self._graph_index: list[list[int]] | None = None
        if cache_graph is None:
            cache_graph = self.source.single
        self.cache_graph = bool(cache_graph)
        self._versions = self._state_versions()
        if self.cache_graph:
            self._build_graph()

    def _state_versions(self) -> tuple[int, ...]:
        tensors = [*self.params, *(b for b in self.model.buffers() if b is not None)]
        return tuple(t._version for t in tensors)

    def _refresh(self) -> None:
        """Drop cached results if the parameters or buffers were modified in place since they were
        computed (e.g. by an optimizer step), so the operator always describes the current weights."""
        versions = self._state_versions()
        if versions != self._versions:
            self._versions = versions
            self._grad = self._loss = self._denominator = None
            self._graph = self._graph_index = None
            if self.cache_graph:
                self._build_graph()

    # -- flat <-> list ------------------------------------------------------------------------------

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate tensors shaped like ``params`` into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Views of a flat vector, shaped like ``params``."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of length {self.dim}, got {tuple(v.shape)}")
        return [c.view(s) for c, s in zip(torch.split(v, self.numels), self.shapes, strict=True)]

    # -- passes -------------------------------------------------------------------------------------

    def _terms(self) -> Iterator[tuple[Tensor | None, float, float]]:
        """For each batch: (sum_b a_b l_b or None, number of samples, sum of weights)."""
        subset = not self.batch_stats
        with analysis_mode(self.model, self.batch_stats):
            for x, y in self.source:
                a = resolve_weights(self.weights, x, y, self.dtype, self.source.single)
                wsum = float(x.shape[0]) if a is None else float(a.sum())
                with torch.enable_grad():
                    total, _, _ = weighted_loss_sum(
                        self.model, self.loss_fn, x, y, a, subset=subset, dtype=self.dtype
                    )
                yield total, float(x.shape[0]), wsum

    def _set_denominator(self, count: float, wsum: float) -> float:
        d = count if self.normalize == "batch" else wsum
        if d <= 0:
            raise ValueError(
                "the loss is empty: no samples"
                if count <= 0
                else "normalize='weights' but the weights sum to zero (no sample of the group)"
            )
        if self._denominator is None:
            self._denominator = d
        elif abs(d - self._denominator) > 1e-9 * max(1.0, abs(d)):
            raise RuntimeError(
                "the data changed between passes (different sample count or weights); the loader "
                "must yield the same batches on every pass"
            )
        return d

    def _first(self, total: Tensor) -> tuple[tuple[Tensor | None, ...], list[int]]:
        """The gradient of one term with its graph kept, and the indices it reaches."""
        g = torch.autograd.grad(total, self.params, create_graph=True, allow_unused=True)
        return g, [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]

    def _build_graph(self) -> None:
        graphs: list[list[Tensor]] = []
        indices: list[list[int]] = []
        grad = [torch.zeros_like(p) for p in self.params]
        loss = 0.0
        count = wsum = 0.0
        for total, n, ws in self._terms():
            count, wsum = count + n, wsum + ws
            if total is None:
                continue
            g, idx = self._first(total)
            graphs.append([g[i] for i in idx])
            indices.append(idx)
            torch._foreach_add_(grad, [gi.detach() for gi in _zeros_for_none(g, self.params)])
            loss += float(total.detach())
        d = self._set_denominator(count, wsum)
        torch._foreach_div_(grad, d)
        self._grad, self._loss = grad, loss / d
        self._graph, self._graph_index = graphs, indices

    def release(self) -> None:
        """Drop the cached graph (frees its memory); later products recompute it per call."""
        self._graph = self._graph_index = None
        self.cache_graph = False

    # -- products -----------------------------------------------------------------------------------

    def _second(
        self, g_terms: Sequence[Tensor], idx: Sequence[int], v: Sequence[Tensor], retain: bool
    ) -> list[Tensor]:
        if not idx:
            return [torch.zeros_like(p) for p in self.params]
        hv = torch.autograd.grad(
            list(g_terms),
            self.params,
            grad_outputs=[v[i] for i in idx],
            retain_graph=retain,
            allow_unused=True,
        )
        return _zeros_for_none(hv, self.params)

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` for ``v`` a list of tensors shaped like ``params`` (detached results)."""
        if len(v) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors, got {len(v)}")
        for vi, p in zip(v, self.params, strict=True):
            if vi.shape != p.shape or vi.dtype != p.dtype:
                raise ValueError(
                    f"v must match the parameters' shapes and dtype ({p.dtype}); got "
                    f"{tuple(vi.shape)} {vi.dtype} for a parameter of shape {tuple(p.shape)}"
                )
        return self._apply([vi.detach() for vi in v])

    def _apply(self, v: list[Tensor]) -> list[Tensor]:
        self._refresh()
        out: list[Tensor] | None = None
        if self._graph is not None:
            for g_terms, idx in zip(self._graph, self._graph_index, strict=True):  # type: ignore[arg-type]
                hv = self._second(g_terms, idx, v, retain=True)
                out = hv if out is None else torch._foreach_add(out, hv)
            d = self._denominator
        else:
            count = wsum = 0.0
            for total, n, ws in self._terms():
                count, wsum = count + n, wsum + ws
                if total is None:
                    continue
                g, idx = self._first(total)
                hv = self._second([g[i] for i in idx], idx, v, retain=False)
                out = hv if out is None else torch._foreach_add(out, hv)
            d = self._set_denominator(count, wsum)
        # Out of place: autograd may hand back an input tensor itself (e.g. v through an identity).
        if out is None:  # no sample with a nonzero weight
            out = [torch.zeros_like(p) for p in self.params]
        else:
            out = list(torch._foreach_div(out, d))
        self.num_hvps += 1
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` on a flat vector of length ``dim``."""
        return self.flatten(self._apply(self.unflatten(v.detach())))

    # -- first order --------------------------------------------------------------------------------

    def _first_order(self) -> None:
        grad = [torch.zeros_like(p) for p in self.params]
        loss, count, wsum = 0.0, 0.0, 0.0
        for total, n, ws in self._terms():
            count, wsum = count + n, wsum + ws
            if total is None:
                continue
            g = torch.autograd.grad(total, self.params, allow_unused=True)
            torch._foreach_add_(grad, _zeros_for_none(g, self.params))
            loss += float(total.detach())
        d = self._set_denominator(count, wsum)
        torch._foreach_div_(grad, d)
        self._grad, self._loss = grad, loss / d

    def gradient(self) -> list[Tensor]:
        """``grad L_a(w)`` (computed once, then cached), shaped like ``params``."""
        self._refresh()
        if self._grad is None:
            self._first_order()
        return [g.clone() for g in self._grad]  # type: ignore[union-attr]

    def loss(self) -> float:
        """``L_a(w)`` as a Python float."""
        self._refresh()
        if self._loss is None:
            self._first_order()
        return float(self._loss)  # type: ignore[arg-type]


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataArg,
    v: Sequence[Tensor],
    **kwargs: Any,
) -> list[Tensor]:
    """One Hessian-vector product ``H v`` (keyword arguments as for :class:`HessianOperator`)."""
    kwargs.setdefault("cache_graph", False)
    return HessianOperator(model, loss_fn, data, **kwargs)(v)


def dense_hessian(op: HessianOperator | LinearOperator) -> Tensor:
    """The full ``(dim, dim)`` matrix, column by column (``dim`` products): small models only."""
    eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
    return torch.stack([op.matvec(eye[i]) for i in range(op.dim)], dim=1)
