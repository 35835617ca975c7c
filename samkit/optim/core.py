"""The shared core of every sharpness-aware optimizer in samkit.

Almost every method is one instance of the unified form of spec/ALGORITHMS.md: a clean group gradient
at the weights w plus K perturbed group gradients, each at its own ascent point,

    g = grad (1/B) sum_b a_b l_b(w) + sum_k grad (1/B) sum_b c^k_b l_b(w + e_k),
    e_k = rho_k * unit(grad (1/B) sum_b c^k_b l_b(w)),   unit(g) = g / (||g||_2 + 1e-12),

followed by exactly one step of a wrapped torch optimizer (the "base") at w. This module holds what the
methods share: the per-sample forward, backward passes that hand their gradient over without copying,
the ascent direction, perturb-and-restore (restore is an exact copy), the normalization-statistics
policy, the base step, and the state-dict layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

EPS = 1e-12  # the eps of unit(g) in spec/ALGORITHMS.md

Grads = list[Tensor | None]
LossFn = Callable[[Tensor, Tensor], Tensor]
NORM_STATS = ("update", "freeze")


class StepOutput(NamedTuple):
    """What a labelled step returns: the mean clean loss at w and the clean pass's logits (detached)."""

    loss: Tensor
    logits: Tensor


def per_sample_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The default per-sample loss: cross-entropy with no reduction."""
    return F.cross_entropy(logits, labels, reduction="none")


def check_range(
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Raise a ValueError naming `name`, its value and the valid interval unless value lies in it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}; got {value!r}")
    return float(value)


def class_counts_tensor(class_counts: Sequence[int] | Tensor | None, method: str) -> Tensor:
    """Validate per-class training counts and return them as a float64 CPU tensor."""
    if class_counts is None:
        raise ValueError(
            f"{method} needs class_counts: the number of training samples of each class "
            "(a sequence of C positive integers, class 0 first)"
        )
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten().cpu()
    if counts.numel() < 1 or bool((counts < 1).any()) or bool((counts != counts.round()).any()):
        raise ValueError(
            f"class_counts must be a non-empty sequence of positive integers; got {class_counts!r}"
        )
    return counts


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm over all tensors, in float32 at least, as a 0-d tensor (no host sync)."""
    if not tensors:
        return torch.zeros(())
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


class SharpnessAware(torch.optim.Optimizer):
    """Base class of samkit's optimizers: wraps a torch optimizer that makes the actual update.

    Args:
        params: parameters or parameter groups, as for any torch optimizer; a group may carry its own
            radius (e.g. ``{"params": ..., "rho": 0.1}``).
        base: the torch optimizer class (or factory taking param groups and keyword arguments) that
            steps at the restored weights; default ``torch.optim.SGD``.
        loss_fn: per-sample loss ``loss_fn(logits, labels) -> (B,)`` used by labelled steps; default
            cross-entropy with no reduction.
        norm_stats: ``"update"`` lets every forward pass update normalization running statistics (the
            long-tail authors' codes); ``"freeze"`` restores them after each perturbed pass, so they see
            only clean passes (the BiSAM and CR-SAM codes). ``"freeze"`` needs ``model``.
        model: the module whose normalization buffers ``norm_stats="freeze"`` snapshots.
        adaptive: use ASAM's scale-invariant ascent, e = rho T_w^2 g / ||T_w g|| with T_w = |w| + eta
            (Kwon et al., ICML 2021); any method's ascent can be made adaptive.
        asam_eta: ASAM's offset eta (0.01 in the ASAM authors' code, 0 in the popular PyTorch copy).
        check_labels: check that labels lie in [0, C). ``None`` checks only labels on the CPU, where it
            costs no device synchronisation.
        skip_nonfinite: skip the base step (leaving weights and base state untouched) when the final
            gradient is not finite; costs one host sync per step. ``last_step_skipped`` and
            ``skipped_steps`` report it.
        **base_kwargs: passed to ``base`` (lr, momentum, weight_decay, ...).
    """

    #: whether `step` needs labels (class-aware methods and BiSAM); if so, `step(closure)` is refused.
    needs_labels: bool = False
    #: the radius keys that each param group carries (validated, defaulted per group).
    radius_keys: tuple[str, ...] = ("rho",)
    #: forward (F) and backward (B) passes through the network per step.
    passes: str = ""

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        radii: dict[str, float],
        loss_fn: LossFn | None = None,
        norm_stats: str = "update",
        model: nn.Module | None = None,
        adaptive: bool = False,
        asam_eta: float = 0.01,
        check_labels: bool | None = None,
        skip_nonfinite: bool = False,
        **base_kwargs: Any,
    ) -> None:
        for key, value in radii.items():
            check_range(key, value, 0.0)
        if norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats must be one of {NORM_STATS}; got {norm_stats!r}")
        if norm_stats == "freeze" and model is None:
            raise ValueError(
                "norm_stats='freeze' needs the model whose normalization statistics to freeze: "
                "pass model=your_model"
            )
        self.adaptive = bool(adaptive)
        self.asam_eta = check_range("asam_eta", asam_eta, 0.0)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else per_sample_cross_entropy
        self.norm_stats = norm_stats
        self.check_labels = check_labels
        self.skip_nonfinite = bool(skip_nonfinite)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._norm_buffers = _norm_buffers(model) if norm_stats == "freeze" else []
        self._scratch: dict[str, list[Tensor]] = {}
        super().__init__(params, dict(radii))
        if not callable(base):
            raise ValueError(f"base must be a torch optimizer class or factory; got {base!r}")
        self.base = base(self.param_groups, **base_kwargs)
        # Share the groups (so schedulers and per-group radii act on both) and the base's state.
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    # ----------------------------------------------------------------------------------------------
    # torch.optim.Optimizer plumbing

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in self.radius_keys:
            if key in param_group:
                check_range(f"param group {key}", param_group[key], 0.0)
        if hasattr(self, "base"):
            for key in self.radius_keys:
                param_group.setdefault(key, self.defaults[key])
            self.base.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def set_epoch(self, epoch: int) -> None:
        """Tell the optimizer the current epoch; methods with an epoch schedule (SSE-SAM) use it."""

    def extra_state(self) -> dict[str, Any]:
        """The method's own state beyond the base optimizer's (saved by `state_dict`)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (with the shared param groups) and the method's own."""
        return {
            "method": type(self).__name__,
            "base": self.base.state_dict(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; a plain torch optimizer state dict loads into the base."""
        if "base" not in state_dict:
            if "state" in state_dict and "param_groups" in state_dict:
                state_dict = {"method": type(self).__name__, "base": state_dict, "extra": {}}
            else:
                raise ValueError("not an optimizer state dict: expected keys 'base' and 'extra'")
        if state_dict.get("method", type(self).__name__) != type(self).__name__:
            raise ValueError(
                f"this state dict was saved by {state_dict['method']}, not {type(self).__name__}: "
                "load it into the optimizer that saved it"
            )
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.load_extra_state(state_dict.get("extra", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r})"

    # ----------------------------------------------------------------------------------------------
    # The step's building blocks

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _labels(self, labels: Tensor | None, num_classes: int | None = None) -> Tensor:
        """Validate the labels of a labelled step (and their range when that costs no sync)."""
        if labels is None:
            raise TypeError(
                f"{type(self).__name__}.step needs the labels: call opt.step(closure, labels) with a "
                "closure that re-evaluates the model and returns its logits"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                "labels must be a 1-D integer tensor of class indices; got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')} "
                f"of shape {tuple(getattr(labels, 'shape', ()))}"
            )
        check = self.check_labels if self.check_labels is not None else labels.device.type == "cpu"
        if check and num_classes is not None and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"labels must lie in [0, {num_classes}) (class_counts has {num_classes} "
                    f"classes); got values from {low} to {high}"
                )
        return labels

    def _forward(self, closure: Callable[[], Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        """Re-evaluate the model at the current weights: (logits, per-sample losses)."""
        with torch.enable_grad():
            logits = closure()
            if not isinstance(logits, Tensor) or logits.dim() < 1:
                raise TypeError(
                    "the closure of a labelled step must return the model's logits as a tensor "
                    f"(B, C); got {type(logits).__name__}"
                )
            if logits.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"the closure returned {logits.shape[0]} rows of logits for "
                    f"{labels.shape[0]} labels"
                )
            losses = self.loss_fn(logits, labels)
        if losses.shape != labels.shape:
            raise ValueError(
                "loss_fn must return one loss per sample (reduction='none'): expected shape "
                f"{tuple(labels.shape)}, got {tuple(losses.shape)}"
            )
        return logits, losses

    def _backward(self, loss: Tensor, params: list[Tensor], retain_graph: bool = False) -> Grads:
        """Backpropagate `loss` and hand its gradient over (p.grad is left cleared)."""
        for p in params:
            p.grad = None
        loss.backward(retain_graph=retain_graph)
        return self._take_grads(params)

    @staticmethod
    def _take_grads(params: list[Tensor]) -> Grads:
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return grads

    def _loss_grad(
        self, closure: Callable[[], Tensor], labels: Tensor | None, params: list[Tensor]
    ) -> tuple[Tensor, Tensor | None, Grads]:
        """One forward and backward of the plain mean loss: (loss, logits or None, gradient).

        With labels, the closure returns logits; without, it is a torch closure that computes the
        loss, calls backward and returns the loss.
        """
        if labels is None:
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = closure()
            return loss, None, self._take_grads(params)
        logits, losses = self._forward(closure, labels)
        loss = losses.mean()
        return loss.detach(), logits.detach(), self._backward(loss, params)

    @torch.no_grad()
    def _ascent(
        self,
        params: list[Tensor],
        grads: Grads,
        radius: str | None = "rho",
        scale: Tensor | float | None = None,
    ) -> Grads:
        """The perturbation e = rho * unit(g) (or ASAM's adaptive one), rho = the group's `radius`.

        `scale` replaces 1 / (||g|| + eps) when a method computes its own normalisation; a `radius`
        of None scales every group by 1.
        """
        e: Grads = [None] * len(params)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return e
        p_list = [params[i] for i in present]
        g_list = [grads[i] for i in present]
        if self.adaptive:
            t = torch._foreach_abs(p_list)
            torch._foreach_add_(t, self.asam_eta)
            direction = torch._foreach_mul(t, g_list)
            norm = _global_norm(direction)
            torch._foreach_mul_(direction, t)
        else:
            direction = torch._foreach_mul(g_list, 1.0)
            norm = _global_norm(direction)
        if scale is None:
            scale = 1.0 / (norm + EPS)
        for i, d in zip(present, direction, strict=True):
            e[i] = d
        start = 0
        for group in self.param_groups:
            members = [i for i in range(start, start + _n_trainable(group)) if e[i] is not None]
            start += _n_trainable(group)
            if members:
                factor = scale if radius is None else scale * group[radius]
                torch._foreach_mul_([e[i] for i in members], factor)
        return e

    @contextlib.contextmanager
    def _perturbed(self, params: list[Tensor], e: Grads, sign: float = 1.0) -> Iterator[None]:
        """Move to w + sign * e for the body, then restore w exactly (by copy) and, under
        norm_stats='freeze', the normalization running statistics."""
        idx = [i for i, t in enumerate(e) if t is not None]
        p_list = [params[i] for i in idx]
        backup = self._scratch_like("w", p_list)
        torch._foreach_copy_(backup, p_list)
        stats = self._norm_buffers
        stats_backup = self._scratch_like("norm_stats", stats) if stats else []
        if stats:
            torch._foreach_copy_(stats_backup, stats)
        with torch.no_grad():
            torch._foreach_add_(p_list, [e[i] for i in idx], alpha=sign)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(p_list, backup)
                if stats:
                    torch._foreach_copy_(stats, stats_backup)

    def _scratch_like(self, name: str, like: list[Tensor]) -> list[Tensor]:
        """Reusable buffers shaped like `like` (reallocated only when the tensors change)."""
        buf = self._scratch.get(name)
        if (
            buf is None
            or len(buf) != len(like)
            or any(
                b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                for b, t in zip(buf, like, strict=True)
            )
        ):
            buf = [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]
            self._scratch[name] = buf
        return buf

    def _base_step(self, params: list[Tensor], *parts: Grads) -> None:
        """Sum the gradient parts into p.grad and take exactly one base step at w."""
        for i, p in enumerate(params):
            total = None
            for part in parts:
                g = part[i]
                if g is None:
                    continue
                total = g if total is None else total.add_(g)
            p.grad = total
        self.last_step_skipped = False
        if self.skip_nonfinite:
            norm = _global_norm([p.grad for p in params if p.grad is not None])
            if not bool(torch.isfinite(norm)):
                for p in params:
                    p.grad = None
                self.last_step_skipped = True
                self.skipped_steps += 1
                return
        self.base.step()

    @staticmethod
    def _output(loss: Tensor, logits: Tensor | None) -> Tensor | StepOutput:
        """A labelled step returns (loss, logits); a plain closure step returns the loss alone."""
        return loss if logits is None else StepOutput(loss.detach(), logits.detach())

    def _unified(
        self,
        closure: Callable[[], Tensor],
        labels: Tensor,
        clean: Tensor | None,
        perturbed: Sequence[tuple[Tensor, str]],
    ) -> StepOutput:
        """The unified form: a clean group with per-sample coefficients `clean` at w (skipped when
        None), and perturbed groups (coefficients c^k, radius key) each at w + e_k."""
        params = self._params()
        logits, losses = self._forward(closure, labels)
        batch = losses.shape[0]
        active = [(c, key) for c, key in perturbed if c is not None]
        parts: list[Grads] = []
        if clean is not None:
            parts.append(
                self._backward((clean * losses).sum() / batch, params, retain_graph=bool(active))
            )
        ascents = [
            self._backward((c * losses).sum() / batch, params, retain_graph=k < len(active) - 1)
            for k, (c, _) in enumerate(active)
        ]
        for (c, key), g in zip(active, ascents, strict=True):
            with self._perturbed(params, self._ascent(params, g, key)):
                _, losses_e = self._forward(closure, labels)
                parts.append(self._backward((c * losses_e).sum() / batch, params))
        self._base_step(params, *parts)
        return StepOutput(losses.detach().mean(), logits.detach())


def _n_trainable(group: dict[str, Any]) -> int:
    return sum(1 for p in group["params"] if p.requires_grad)


def _norm_buffers(model: nn.Module | None) -> list[Tensor]:
    """The running statistics of every normalization layer that tracks them."""
    if model is None:
        return []
    buffers = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            buffers += [
                b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None
            ]
    return buffers


class ClassAware(SharpnessAware):
    """A method whose per-sample coefficients depend on the class of each sample (needs labels and
    training-set class counts)."""

    needs_labels = True

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer],
        class_counts: Sequence[int] | Tensor | None,
        **kwargs: Any,
    ) -> None:
        self.class_counts = class_counts_tensor(class_counts, type(self).__name__)
        self._tables: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        super().__init__(params, base, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.class_counts.numel()

    def _forward(self, closure: Callable[[], Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        logits, losses = super()._forward(closure, labels)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"class_counts has {self.num_classes} classes but the model returned logits of "
                f"shape {tuple(logits.shape)}: give one count per class, in class order"
            )
        return logits, losses

    def _table(self, name: str, values: Tensor, like: Tensor) -> Tensor:
        """A per-class table moved once to the device and dtype of `like`, cached."""
        key = (name, like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = values.to(device=like.device, dtype=like.dtype)
        return self._tables[key]
