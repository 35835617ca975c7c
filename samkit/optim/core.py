"""The shared core of every sharpness-aware optimizer in samkit.

Almost every method is one instance of the unified form of spec/ALGORITHMS.md: a clean group gradient
at the weights w plus K perturbed group gradients, each at its own ascent point,

    g = grad (1/B) sum_b a_b l_b(w) + sum_k grad (1/B) sum_b c^k_b l_b(w + e_k),
    e_k = rho_k * unit(grad (1/B) sum_b c^k_b l_b(w)),   unit(g) = g / (||g||_2 + 1e-12),

followed by exactly one step of a wrapped torch optimizer (the "base") at w. This module holds what the
methods share: the per-sample forward, backward passes that hand their gradient over without copying,
the ascent direction, perturb-and-restore (restore is an exact copy), the normalization-statistics
policy, the base step, and the state-dict layout; and what scale needs: micro-batches (every pass
accumulates its gradient over them, so a step equals one step on their concatenation), a GradScaler
(float16), and averaging over processes (torch.distributed) once per pass that needs it. And the
cost options of spec/ALGORITHMS-EFFICIENT.md ("Generic options for any unified-form method"), once,
for every method of that form: the ascent every K steps and the ascent on a sub-batch.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

EPS = 1e-12  # the eps of unit(g) in spec/ALGORITHMS.md

Grads = list[Tensor | None]
LossFn = Callable[[Tensor, Tensor], Tensor]
#: per-sample terms of a pass: (logits, per-sample losses, labels) -> vectors t_k, each giving one
#: gradient grad (1/B) sum_b t_k[b]
Terms = Callable[[Tensor, Tensor, Tensor], Sequence[Tensor]]
NORM_STATS = ("update", "freeze")  # every method's choices; CR-SAM adds "authors"
ASCENT_BETWEEN = ("reuse_e", "base")  # what a step without a fresh ascent does
ASCENT_SCHEDULES = ("every_K", "bernoulli")  # which steps take a fresh ascent
SUBSET_MODES = ("random", "topk")  # how the ascent sub-batch is chosen
SUBSET_PASSES = ("separate", "graph")  # where the sub-batch's ascent gradient comes from
UNIT = "ascent_u:"  # prefix of the stored unit directions u_j in the base's per-parameter state


class Batch(NamedTuple):
    """The samples of one step: one or more micro-batches (a closure re-evaluating the model on each,
    and its labels), or a torch-style closure (labels None). `size` is B, the number of samples in
    all micro-batches together, which divides every group loss."""

    closures: list[Callable[[], Tensor]]
    labels: list[Tensor] | None
    size: int


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
    try:
        if isinstance(class_counts, (str, bytes)):
            raise TypeError
        counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"class_counts must be a sequence of C positive integers (e.g. [500, 50, 5]); "
            f"got {type(class_counts).__name__} {class_counts!r}"
        ) from None
    if (
        counts.numel() < 1
        or not bool(torch.isfinite(counts).all())
        or bool((counts < 1).any())
        or bool((counts != counts.round()).any())
    ):
        raise ValueError(
            f"class_counts must be a non-empty sequence of positive integers; got {class_counts!r}"
        )
    return counts


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm over all tensors, in float32 at least, as a 0-d tensor (no host sync)."""
    if not tensors:
        return torch.zeros(())
    if all(t.dtype in _WIDE for t in tensors):
        norms = torch._foreach_norm(tensors, 2)  # no cast asked: no per-tensor copies
    else:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.promote_types(tensors[0].dtype,
                                                                           torch.float32))
    try:
        return torch.linalg.vector_norm(torch.stack(norms))
    except RuntimeError:  # tensors on several devices (a model split over them)
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


_WIDE = (torch.float32, torch.float64)


class SharpnessAware(torch.optim.Optimizer):
    """Base class of samkit's optimizers: wraps a torch optimizer that makes the actual update.

    Args:
        params: parameters or parameter groups, as for any torch optimizer; a group may carry its own
            radius (e.g. ``{"params": ..., "rho": 0.1}``) and ``"adaptive": False`` to keep the
            plain ascent for its parameters. Named parameters (``model.named_parameters()``, or
            groups whose "params" are (name, tensor) pairs; torch keeps the names in
            ``param_groups[i]["param_names"]``) select the ASAM authors' adaptive rule below.
        base: the torch optimizer class (or factory taking param groups and keyword arguments) that
            steps at the restored weights; default ``torch.optim.SGD``. It must step without a
            closure (LBFGS is refused).
        loss_fn: per-sample loss ``loss_fn(logits, labels) -> (B,)`` used by labelled steps; default
            cross-entropy with no reduction.
        norm_stats: ``"update"`` lets every forward pass update normalization running statistics (the
            long-tail authors' codes); ``"freeze"`` restores them after each perturbed pass, so they see
            only clean passes (the BiSAM code and the popular PyTorch SAM's BN bypass). CR-SAM also
            offers ``"authors"``. ``"freeze"`` needs ``model``; its buffers are looked up at each
            step, so ``model.double()``, ``.to(device)`` or ``.half()`` after construction are fine.
        model: the model being trained. Needed by ``norm_stats="freeze"``; under torch.distributed,
            where a DistributedDataParallel model runs every pass under ``no_sync()`` and samkit
            averages gradients itself, once per pass that needs it; and by the non-finite guard to
            restore the running statistics of a skipped step. Without it, a skipped step leaves the
            weights and base state untouched but not the running statistics (samkit cannot find them
            from the parameters alone): pass ``model=`` whenever the model has normalization layers.
        adaptive: use ASAM's scale-invariant ascent, e = rho T_w^2 g / ||T_w g|| with T_w = |w| + eta
            (Kwon et al., ICML 2021); any method's ascent can be made adaptive. With unnamed
            parameters every parameter is scaled (the popular PyTorch SAM's ``adaptive=True``); with
            named parameters only those whose name contains "weight" are (conv, linear and
            normalization weights), every other one (biases) has T = 1 in the norm and in the
            perturbation (the ASAM authors' code, SamsungLabs/ASAM). A group's ``"adaptive"`` key
            overrides this for its parameters.
        asam_eta: ASAM's offset eta (0.01 in the ASAM authors' class, 0 in the popular PyTorch copy).
        check_labels: check that labels lie in [0, C) (in [0, inf) for methods without class
            counts). ``None`` checks only labels on the CPU, where it costs no device
            synchronisation.
        skip_nonfinite: skip the base step (leaving weights, base state and, given ``model``, the
            normalization running statistics untouched) when the final gradient is not finite or a
            pass put a non-finite value into the running statistics (a huge radius under
            ``"update"``, say); costs one host sync per step. ``last_step_skipped`` and
            ``skipped_steps`` report it. Without it (and without a GradScaler) nothing is checked:
            a non-finite step goes into the weights and statistics as with any torch optimizer.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast. Every backward is scaled. An
            overflow in any pass (or non-finite running statistics) skips the whole step, leaving
            weights, base state and (given ``model``) running statistics untouched; in an ascent,
            the perturbation is zeroed too. Call ``grad_scaler.update()`` after each step, as with
            any torch optimizer.
        ascent_sync: under torch.distributed, average the ascent gradients over processes, so all
            take one global perturbation (True, default: equal to one process on the concatenated
            batch); False lets each process ascend along its own gradient (the original SAM's
            m-sharpness, m = the per-process batch). The descent gradient is always averaged.
        process_group: the torch.distributed group to average over (default: the whole world).
        ascent_every: K, the cost option "ascent every K steps" (spec/ALGORITHMS-EFFICIENT.md,
            generic option A; samkit's own, from no paper). A fresh ascent step runs the method
            unchanged and stores u_j = unit(ascent gradient) of each perturbed group j (ASAM's
            T_w^2-scaled direction when adaptive) in the base's per-parameter state, so it is
            saved with ``state_dict()``; the other steps do what ``ascent_between`` says. K = 1
            (default) is the method. Refused by methods without an ascent of that form.
        ascent_between: on the other steps, ``"reuse_e"`` (default) perturbs by e_j = rho_j(t) u_j
            (the CURRENT radius, the stored direction) with no ascent backward; the clean term is
            still computed at w when its coefficients are not all zero (one host sync per such
            step); when the perturbed pass is the step's only pass it updates the normalization
            statistics even under norm_stats="freeze". ``"base"`` takes the method at rho = 0:
            one pass at w on the sum of every group's coefficients (SAM: a plain step; RST and
            SS-SAM, Zhao et al. 2022).
        ascent_schedule: which steps take a fresh ascent: ``"every_K"`` (default; steps t with
            t mod K = 0, t counting the steps taken, a skipped step not counting) or
            ``"bernoulli"`` (each step with probability p = 1/K, drawn from a generator seeded
            with ``ascent_seed`` and saved with ``state_dict()``). A step with no stored
            direction (the first; a new perturbed group) always ascends.
        ascent_subset: m, the cost option "ascent on a sub-batch" (generic option B): an integer
            >= 1, or a fraction of the batch in (0, 1] (m = max(1, floor(fraction * B))). Only the
            direction changes: u_j = unit(grad (1/m_j) sum_{b in S_j} c^j_b l_b(w)), S_j drawn
            only among the samples with c^j_b != 0, m_j = min(m, their count); the clean and
            perturbed terms stay on the whole batch with 1/B. Under torch.distributed each process
            draws its own S_j from its own batch. None (default): the whole batch. Needs labelled
            steps (per-sample losses).
        ascent_subset_mode: ``"random"`` (default; uniform without replacement, from the
            ``ascent_seed`` generator) or ``"topk"`` (the largest detached c^j_b l_b(w), taken from
            the forward at w; a method without a clean term, such as SAM, adds a no-grad forward).
        ascent_subset_pass: ``"separate"`` (default): an extra forward and backward on S_j only
            (F_m + B_m; the normalization layers see S_j's statistics). With a closure that takes
            ``index`` (``lambda index=None: model(x if index is None else x[index])``, as K-SAM's)
            only those samples are forwarded; otherwise the whole batch is and the rows outside
            S_j are masked (no saving). ``"graph"``: the masked ascent term is backpropagated
            through the forward at w (exact, saves nothing; with "topk" every micro-batch's graph
            is kept until the selection).
        ascent_seed: the seed of the generator of "bernoulli" and "random" (default 0).
        **base_kwargs: passed to ``base`` (lr, momentum, weight_decay, ...).
    """

    #: whether `step` needs labels (class-aware methods and BiSAM); if so, `step(closure)` is refused.
    needs_labels: bool = False
    #: the radius keys that each param group carries (validated, defaulted per group).
    radius_keys: tuple[str, ...] = ("rho",)
    #: forward (F) and backward (B) passes through the network per step.
    passes: str = ""
    #: the norm_stats values the method accepts.
    norm_stats_choices: tuple[str, ...] = NORM_STATS
    #: why the method refuses a cost option (ascent_every, ascent_subset); absent: it accepts it.
    cost_refusals: dict[str, str] = {
        "ascent_every": "it has no ascent of the unified form to reuse",
        "ascent_subset": "it has no ascent of the unified form to take on a sub-batch",
    }

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
        grad_scaler: torch.amp.GradScaler | None = None,
        ascent_sync: bool = True,
        process_group: Any = None,
        ascent_every: int = 1,
        ascent_between: str = "reuse_e",
        ascent_schedule: str = "every_K",
        ascent_subset: float | None = None,
        ascent_subset_mode: str = "random",
        ascent_subset_pass: str = "separate",
        ascent_seed: int = 0,
        **base_kwargs: Any,
    ) -> None:
        self._init_cost_options(
            ascent_every,
            ascent_between,
            ascent_schedule,
            ascent_subset,
            ascent_subset_mode,
            ascent_subset_pass,
            ascent_seed,
        )
        for key, value in radii.items():
            check_range(key, value, 0.0)
        choices = type(self).norm_stats_choices
        if norm_stats not in choices:
            raise ValueError(f"norm_stats must be one of {choices}; got {norm_stats!r}")
        if norm_stats != "update" and model is None:
            raise ValueError(
                f"norm_stats={norm_stats!r} needs the model whose normalization statistics to "
                "freeze: pass model=your_model"
            )
        self.adaptive = bool(adaptive)
        self.asam_eta = check_range("asam_eta", asam_eta, 0.0)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else per_sample_cross_entropy
        self.norm_stats = norm_stats
        self.check_labels = check_labels
        self.skip_nonfinite = bool(skip_nonfinite)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ValueError(
                f"grad_scaler must be a torch.amp.GradScaler; got {type(grad_scaler).__name__}"
            )
        self.grad_scaler = grad_scaler
        self.ascent_sync = bool(ascent_sync)
        self.process_group = process_group
        self.model = model
        self._overflow: Tensor | None = None
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._step_stats: list[Tensor] = []  # the running statistics of the step in progress
        self._scratch: dict[str, list[Tensor]] = {}
        super().__init__(params, dict(radii))
        if not self._params():
            raise ValueError(
                "the optimizer has no trainable parameter (every parameter has requires_grad="
                "False): unfreeze some (p.requires_grad_(True)) or pass the ones to train"
            )
        if not callable(base):
            raise ValueError(f"base must be a torch optimizer class or factory; got {base!r}")
        self.base = base(self.param_groups, **base_kwargs)
        if _needs_closure(self.base):
            raise ValueError(
                f"base {type(self.base).__name__} needs a closure at every step, but samkit steps "
                "the base once at w with the gradient it computed: use a base that steps without "
                "one (torch.optim.SGD, AdamW, ...)"
            )
        # Share the groups (so schedulers and per-group radii act on both) and the base's state.
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    # ----------------------------------------------------------------------------------------------
    # torch.optim.Optimizer plumbing

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in self.radius_keys:
            if key in param_group:
                check_range(f"param group {key}", param_group[key], 0.0)
        if not isinstance(param_group.get("adaptive", False), bool):
            raise ValueError(
                f"param group 'adaptive' must be True or False; got {param_group['adaptive']!r}"
            )
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
        state = {
            "method": type(self).__name__,
            "base": self.base.state_dict(),
            "extra": self.extra_state(),
        }
        if self._generator is not None or self.ascent_every > 1:
            state["cost"] = self._cost_state()
        return state

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
        self._load_cost_state(state_dict.get("cost", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r})"

    # ----------------------------------------------------------------------------------------------
    # The step

    def step(
        self,
        closure: Callable[[], Tensor] | Sequence[Callable[[], Tensor]],
        labels: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor | StepOutput:
        """One step of the method, then exactly one base step at w.

        ``step(closure, labels)``: the closure re-evaluates the model and returns its logits; returns
        ``(loss, logits)`` of the clean pass. ``step([closure_1, ...], [labels_1, ...])``: the same on
        micro-batches, each pass accumulating its gradient over them, so the step equals one step on
        their concatenation (logits are concatenated). ``step(closure)``: a torch-style closure that
        computes the loss, calls backward and returns the loss (methods that need no labels); it
        may accumulate micro-batches itself, and under a GradScaler must scale its loss.
        """
        return _hooked(self, SharpnessAware._step, closure, labels)

    # torch.optim.Optimizer wraps step in a profiler scope and its hooks on every call (about 40 us
    # on a CPU); _hooked runs the hooks and the scope only when a hook or a profiler is there
    step.hooked = True  # type: ignore[attr-defined]

    def _step(
        self,
        closure: Callable[[], Tensor] | Sequence[Callable[[], Tensor]],
        labels: Tensor | Sequence[Tensor] | None,
    ) -> Tensor | StepOutput:
        batch = self._batch(closure, labels)
        self._check_radii()
        if self._world() > 1 and self.model is None:
            raise ValueError(
                f"{type(self).__name__} under torch.distributed needs model=the model (its "
                "DistributedDataParallel wrapper, or the plain module): samkit averages gradients "
                "itself, once per pass that needs it"
            )
        no_sync = (
            self.model.no_sync()
            if isinstance(self.model, DistributedDataParallel)
            else contextlib.nullcontext()
        )
        self._overflow = None
        guarded = self._guarded()
        self._step_stats = (
            _norm_buffers(self.model) if guarded or self.norm_stats != "update" else []
        )
        if guarded and self._step_stats:
            # what a skipped step restores: the statistics before any of its passes
            torch._foreach_copy_(
                self._scratch_like("step_stats", self._step_stats), self._step_stats
            )
        self._fresh = self._draw_fresh()
        with no_sync:
            return self._update(batch)

    def _guarded(self) -> bool:
        """Whether a non-finite step is skipped (skip_nonfinite, or an enabled GradScaler)."""
        return self.skip_nonfinite or (
            self.grad_scaler is not None and self.grad_scaler.is_enabled()
        )

    def _check_radii(self) -> None:
        """Refuse a radius made invalid after construction (written into param_groups by hand or
        by a scheduler); the values are Python numbers, so this costs no device sync."""
        for i, group in enumerate(self.param_groups):
            for key in self.radius_keys:
                value = group.get(key)
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not ok or not math.isfinite(value) or value < 0:
                    raise ValueError(
                        f"param_groups[{i}][{key!r}] is {value!r}: a radius must be a finite "
                        "number >= 0 (check what wrote it after construction, e.g. a scheduler)"
                    )

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        """The method's step on a validated batch (each method implements it)."""
        raise NotImplementedError

    def _batch(
        self,
        closure: Callable[[], Tensor] | Sequence[Callable[[], Tensor]],
        labels: Tensor | Sequence[Tensor] | None,
    ) -> Batch:
        """Validate what `step` was given and return it as micro-batches."""
        if labels is None:
            if self.needs_labels:
                raise TypeError(
                    f"{type(self).__name__}.step needs the labels: call opt.step(closure, labels) "
                    "with a closure that re-evaluates the model and returns its logits"
                )
            if not callable(closure):
                raise TypeError(
                    "micro-batches need their labels: call opt.step([closure, ...], [labels, ...]); "
                    "a torch-style closure may accumulate micro-batches itself"
                )
            return Batch([_torch_style(closure)], None, 0)
        if isinstance(labels, Tensor):
            closures, label_list = [closure], [labels]
        else:
            closures, label_list = closure, list(labels)
            if (
                callable(closures)
                or not isinstance(closures, Sequence)
                or len(closures) != len(label_list)
                or not label_list
            ):
                raise ValueError(
                    "micro-batches are given as opt.step([closure_1, ..., closure_k], "
                    "[labels_1, ..., labels_k]): a non-empty list of labels and as many closures"
                )
        for c in closures:
            if not callable(c):
                raise TypeError(f"closure must be callable; got {type(c).__name__}")
        label_list = [self._labels(y) for y in label_list]
        size = sum(y.shape[0] for y in label_list)
        if size == 0:
            raise ValueError("the batch is empty (0 labels): a step needs at least one sample")
        return Batch(list(closures), label_list, size)

    # ----------------------------------------------------------------------------------------------
    # The step's building blocks

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _labels(self, labels: Tensor) -> Tensor:
        """Validate the labels of a micro-batch (and their range when that costs no sync)."""
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                "labels must be a 1-D integer tensor of class indices; got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')} "
                f"of shape {tuple(getattr(labels, 'shape', ()))}"
            )
        num_classes = getattr(self, "num_classes", None)
        check = self.check_labels if self.check_labels is not None else labels.device.type == "cpu"
        if check and labels.numel():
            low, high = (int(v) for v in torch.aminmax(labels))
            if low < 0 or (num_classes is not None and high >= num_classes):
                where = (
                    f"[0, {num_classes}) (class_counts has {num_classes} classes)"
                    if num_classes is not None
                    else "[0, C) for C classes"
                )
                hint = (
                    "; samkit has no ignore_index: drop the samples to ignore (labels of -100, "
                    "say) from the batch"
                    if low < 0
                    else ""
                )
                raise ValueError(
                    f"labels must lie in {where}; got values from {low} to {high}{hint}"
                )
        return labels

    def _logits(self, closure: Callable[[], Tensor], labels: Tensor) -> Tensor:
        """Run a labelled closure and check that it returned logits (B, C) for these labels."""
        logits = closure()
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise TypeError(
                "the closure of a labelled step must return the model's logits, a tensor "
                f"(B, C), not a loss (samkit applies loss_fn itself); got {got}"
            )
        if logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"the closure returned {logits.shape[0]} rows of logits for "
                f"{labels.shape[0]} labels"
            )
        return logits

    def _forward(
        self, closure: Callable[[], Tensor], labels: Tensor, grad: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Re-evaluate the model at the current weights: (logits, per-sample losses); `grad`
        False records no graph."""
        with torch.set_grad_enabled(grad):
            logits = self._logits(closure, labels)
            losses = self.loss_fn(logits, labels)
        if losses.shape != labels.shape:
            raise ValueError(
                "loss_fn must return one loss per sample (reduction='none'): expected shape "
                f"{tuple(labels.shape)}, got {tuple(losses.shape)}"
            )
        return logits, losses

    def _summed_loss(self, closure: Callable[[], Tensor], labels: Tensor) -> Tensor:
        """sum_b l_b over the closure's samples (reduced inside cross_entropy for the default
        loss, see _fused_cross_entropy)."""
        with torch.enable_grad():
            if self.loss_fn is per_sample_cross_entropy:
                return F.cross_entropy(self._logits(closure, labels), labels, reduction="sum")
            return self._forward(closure, labels)[1].sum()

    def _backward(
        self,
        loss: Tensor,
        params: list[Tensor],
        retain_graph: bool = False,
        into: Grads | None = None,
    ) -> Grads:
        """Backpropagate `loss` (scaled under a GradScaler) and hand its gradient over, added to
        `into` (which it consumes); p.grad is left cleared."""
        for i, p in enumerate(params):
            p.grad = None if into is None else into[i]
        if into is not None:
            into[:] = [None] * len(into)  # drop our references: autograd may accumulate in place
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        loss.backward(retain_graph=retain_graph)
        return self._take_grads(params)

    @staticmethod
    def _take_grads(params: list[Tensor]) -> Grads:
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return grads

    def _pass(
        self,
        params: list[Tensor],
        batch: Batch,
        terms: Terms | None = None,
        weights: Sequence[Tensor | None] = (None,),
        output: bool = True,
    ) -> tuple[list[Grads], Tensor | StepOutput | None]:
        """Forward every micro-batch at the current weights and backpropagate each term,
        (1/B) sum_b t_k[b], accumulating over micro-batches: (one gradient per term, the pass's
        output: StepOutput(mean loss, logits), or a torch-style closure's loss). `terms` defaults
        to one term c[y_b] l_b per class table c in `weights` (None: the plain loss). `output`
        False: the caller does not read the output, which may then be None."""
        if batch.labels is None:
            # A gradient already in p.grad when step(closure) is called (accumulated before the
            # step, as torch.optim.SGD allows) is the gradient at w of samples the closure does not
            # re-evaluate. It joins every pass of this step, as the closure's own backward would
            # accumulate onto it: so it shapes the ascent direction, and it enters the final
            # gradient exactly once (every method's final gradient combines its passes with
            # weights summing to 1). Those samples are not re-evaluated at w + e; for an exact
            # sharpness-aware step on all of them, pass them as micro-batches. The first pass
            # takes it and wraps the closure (whose list lives as long as this step) to restore it.
            if any(p.grad is not None for p in params):
                held, run = self._take_grads(params), batch.closures[0]

                def restoring() -> Tensor:
                    for p, g in zip(params, held, strict=True):
                        p.grad = None if g is None else g.clone()
                    return run()

                batch.closures[0] = restoring
            with torch.enable_grad():
                loss = batch.closures[0]()
            return [self._take_grads(params)], loss
        if len(batch.closures) == 1:
            return self._single_pass(params, batch, terms, weights, output)
        if terms is None:
            terms = _weighted_terms(weights)
        grads: list[Grads] = []
        loss_sum: Tensor | float = 0.0
        all_logits = []
        for closure, labels in zip(batch.closures, batch.labels, strict=True):
            logits, losses = self._forward(closure, labels)
            with torch.enable_grad():
                vectors = list(terms(logits, losses, labels))
            grads += [[None] * len(params) for _ in range(len(vectors) - len(grads))]
            for k, v in enumerate(vectors):
                last = k == len(vectors) - 1
                grads[k] = self._backward(
                    v.sum() / batch.size, params, retain_graph=not last, into=grads[k]
                )
            loss_sum = loss_sum + losses.detach().sum()
            all_logits.append(logits.detach())
        return grads, StepOutput(loss_sum / batch.size, torch.cat(all_logits))

    def _single_pass(
        self,
        params: list[Tensor],
        batch: Batch,
        terms: Terms | None,
        weights: Sequence[Tensor | None],
        output: bool,
    ) -> tuple[list[Grads], StepOutput | None]:
        """`_pass` on one closure: the same values, with no accumulation over micro-batches; with
        the default loss and class-table terms, each term reduced inside cross_entropy."""
        closure, labels = batch.closures[0], batch.labels[0]
        if terms is None and self.loss_fn is per_sample_cross_entropy:
            with torch.enable_grad():
                logits = self._logits(closure, labels)
                totals = [_fused_cross_entropy(logits, labels, c) for c in weights]
                fused = all(t is not None for t in totals)
                losses = None if fused else self.loss_fn(logits, labels)
            if fused:
                last = len(totals) - 1
                grads = [
                    self._backward(t, params, retain_graph=k < last) for k, t in enumerate(totals)
                ]
                if not output:
                    return grads, None
                plain = [t for t, c in zip(totals, weights, strict=True) if c is None]
                if plain:
                    mean = plain[0].detach()
                else:
                    with torch.no_grad():
                        mean = F.cross_entropy(logits, labels)
                return grads, StepOutput(mean, logits.detach())
        else:
            logits, losses = self._forward(closure, labels)
        if terms is None:
            terms = _weighted_terms(weights)
        with torch.enable_grad():
            vectors = list(terms(logits, losses, labels))
        grads: list[Grads] = []
        mean = None
        for k, v in enumerate(vectors):
            total = v.sum() / batch.size
            if v is losses:
                mean = total.detach()
            grads.append(self._backward(total, params, retain_graph=k < len(vectors) - 1))
        if mean is None:
            mean = losses.detach().sum() / batch.size
        return grads, StepOutput(mean, logits.detach())

    @torch.no_grad()
    def _ascent(
        self,
        params: list[Tensor],
        grads: Grads,
        radius: str | Sequence[float] | None = "rho",
        scale: Tensor | float | None = None,
        average: bool = True,
        store: str | None = None,
        consume: bool = False,
    ) -> Grads:
        """The perturbation e = rho * unit(g) (or ASAM's adaptive one), rho = the group's `radius`.

        `consume`: the caller hands `grads` over (it does not read them again), so e is built in
        their storage instead of a copy.

        `store` (a radius key) keeps u = e / rho for reuse under ascent_every > 1; it enters the
        state only if the step is taken (`_base_step`).

        `scale` replaces 1 / (||g|| + eps) when a method computes its own normalisation; a `radius`
        of None scales every group by 1, a sequence of numbers gives each group's radius. Under
        torch.distributed with ascent_sync, g is first averaged over processes (in place) unless
        `average` is False (already averaged). A non-finite g (a GradScaler overflow, say) gives
        e = 0 and marks the step for skipping when a GradScaler or skip_nonfinite is in use.
        """
        e: Grads = [None] * len(params)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            raise _no_gradient()
        if average and self.ascent_sync:
            self._average([grads[i] for i in present])
        direction = [grads[i] for i in present]
        if not consume:
            direction = torch._foreach_mul(direction, 1.0)
        modes = self._adaptive_modes()
        scaled = [] if modes is None else [k for k, i in enumerate(present) if modes[i]]
        if scaled:
            # T_w = |w| + eta on the scaled parameters, T = 1 on the others
            t = torch._foreach_abs([params[present[k]] for k in scaled])
            torch._foreach_add_(t, self.asam_eta)
            torch._foreach_mul_([direction[k] for k in scaled], t)
            norm = _global_norm(direction)
            torch._foreach_mul_([direction[k] for k in scaled], t)
        else:
            norm = _global_norm(direction)
        guarded = self.grad_scaler is not None or self.skip_nonfinite
        finite = torch.isfinite(norm) if guarded else None
        if scale is None:
            scale = norm.add_(EPS).reciprocal_()  # 1 / (||g|| + eps), in norm's storage
        if finite is not None:
            self._overflow = ~finite if self._overflow is None else self._overflow | ~finite
            for d in direction:
                torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
            scale = torch.where(finite, scale, torch.zeros_like(scale))
        for i, d in zip(present, direction, strict=True):
            e[i] = d
        if store is not None and self.ascent_every > 1:
            units: Grads = [None] * len(params)
            for i, u in zip(present, torch._foreach_mul(direction, scale), strict=True):
                units[i] = u
            self._pending[store] = units
        radii = (
            [1.0] * len(self.param_groups)
            if radius is None
            else [g[radius] for g in self.param_groups]
            if isinstance(radius, str)
            else radius
        )
        if len(self.param_groups) == 1:
            torch._foreach_mul_(direction, scale * radii[0])
            return e
        start = 0
        for group, r in zip(self.param_groups, radii, strict=True):
            members = [i for i in range(start, start + _n_trainable(group)) if e[i] is not None]
            start += _n_trainable(group)
            if members:
                torch._foreach_mul_([e[i] for i in members], scale * r)
        return e

    def _adaptive_modes(self) -> list[bool] | None:
        """For each trainable parameter, whether the ascent scales it by T_w = |w| + eta: the
        group's "adaptive" (default: the optimizer's); with named parameters, only those whose
        name contains "weight" (the ASAM authors' rule). None when no parameter is scaled."""
        if not self.adaptive and not any(g.get("adaptive") for g in self.param_groups):
            return None  # the plain ascent everywhere (without walking the parameters)
        modes = []
        for group in self.param_groups:
            on = bool(group.get("adaptive", self.adaptive))
            names = group.get("param_names")
            for k, p in enumerate(group["params"]):
                if p.requires_grad:
                    modes.append(on and (names is None or "weight" in names[k]))
        return modes

    @contextlib.contextmanager
    def _perturbed(
        self, params: list[Tensor], e: Grads, sign: float = 1.0, freeze: bool | None = None
    ) -> Iterator[None]:
        """Move to w + sign * e for the body, then restore w exactly (by copy) and, when `freeze`
        (default: norm_stats='freeze'), the normalization running statistics. Autocast's weight
        cache is cleared on both moves."""
        idx = [i for i, t in enumerate(e) if t is not None]
        p_list = [params[i] for i in idx]
        backup = self._scratch_like("w", p_list)
        torch._foreach_copy_(backup, p_list)
        if freeze is None:
            freeze = self.norm_stats == "freeze"
        stats = self._step_stats if freeze else []
        stats_backup = self._scratch_like("norm_stats", stats) if stats else []
        if stats:
            torch._foreach_copy_(stats_backup, stats)
        with torch.no_grad():
            torch._foreach_add_(p_list, [e[i] for i in idx], alpha=sign)
        # autocast caches its low-precision copies of the weights until the outermost autocast
        # region ends: without this, the passes inside the step would see the unperturbed weights
        torch.clear_autocast_cache()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(p_list, backup)
                if stats:
                    torch._foreach_copy_(stats, stats_backup)
            torch.clear_autocast_cache()

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

    # ----------------------------------------------------------------------------------------------
    # Processes and scaling

    def _world(self) -> int:
        """The number of processes gradients are averaged over (1 outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    @torch.no_grad()
    def _average(self, tensors: Sequence[Tensor]) -> None:
        """Average tensors over processes in place: one all-reduce per dtype, on a flat buffer."""
        world = self._world()
        if world == 1 or not tensors:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(world)
            views = [
                v.view_as(t)
                for v, t in zip(flat.split([t.numel() for t in group]), group, strict=True)
            ]
            torch._foreach_copy_(group, views)

    def _inverse_scale(self, like: Tensor) -> Tensor | float:
        """1 / the GradScaler's current scale, as a tensor (no host sync); 1 without a scaler."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        return 1.0 / self.grad_scaler.scale(torch.ones((), device=like.device))

    def _base_step(self, params: list[Tensor], *parts: Grads) -> None:
        """Sum the gradient parts into p.grad, average it over processes, and take exactly one
        base step at w, unless the gradient (or an ascent) is not finite under a GradScaler or
        skip_nonfinite."""
        if len(parts) > 1 and all(g is not None for part in parts for g in part):
            for part in parts[1:]:  # every parameter has every part: one add per part
                torch._foreach_add_(parts[0], part)
            parts = parts[:1]
        if len(parts) == 1:
            for p, g in zip(params, parts[0], strict=True):
                p.grad = g
        else:
            for i, p in enumerate(params):
                total = None
                for part in parts:
                    g = part[i]
                    if g is None:
                        continue
                    total = g if total is None else total.add_(g)
                p.grad = total
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise _no_gradient()
        floats = [b for b in self._step_stats if b.is_floating_point()]
        if self._guarded() and floats:
            # a pass put a non-finite value into the running statistics: skip as an overflow
            bad = ~torch.stack([torch.isfinite(b).all() for b in floats]).all()
            self._overflow = bad if self._overflow is None else self._overflow | bad
        if self._overflow is not None:
            # an ascent overflowed: carry it into the gradient, where the checks below see it
            grads[0].add_(torch.where(self._overflow, math.nan, 0.0).to(grads[0].dtype))
            self._overflow = None
        self._average(grads)
        self.last_step_skipped = False
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            self.last_step_skipped = self.grad_scaler.step(self.base, _stepped) is None
        elif self.skip_nonfinite and not bool(torch.isfinite(_global_norm(grads))):
            self.last_step_skipped = True
        else:
            step = getattr(type(self.base).step, "__wrapped__", None)
            if step is None or "step" in vars(self.base):  # not torch's wrapper, or patched
                self.base.step()
            else:
                _hooked(self.base, step)
        if self.last_step_skipped:
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            if self._step_stats:
                with torch.no_grad():
                    torch._foreach_copy_(self._step_stats, self._scratch["step_stats"])
        elif self.ascent_every > 1:
            self._commit_units(params)
        self._pending = {}

    def _unified(
        self,
        batch: Batch,
        clean: Tensor | None,
        perturbed: Sequence[tuple[Tensor | None, str]],
        ascent: Terms | None = None,
    ) -> Tensor | StepOutput:
        """The unified form with per-class coefficients: a clean group with coefficient clean[y_b]
        at w (skipped when None), and perturbed groups (table c^k, or None for c^k_b = 1; radius
        key), each at w + e_k with e_k = rho_k unit(grad (1/B) sum_b c^k[y_b] l_b(w)). `ascent`
        replaces the per-sample ascent terms c^k_b l_b(w) (BiSAM's lower bound). The cost options
        (ascent every K steps, ascent on a sub-batch) act here, once for every method of this form.
        """
        params = self._params()
        if all(self._reusing(key) for _, key in perturbed):
            return self._between(params, batch, clean, perturbed)
        if self.ascent_subset is not None:
            return self._subset_step(params, batch, clean, perturbed, ascent)
        tables = [] if clean is None else [clean]
        if ascent is None:  # class-weighted losses, from the tables
            grads, out = self._pass(params, batch, weights=tables + [c for c, _ in perturbed])
        else:

            def terms(z: Tensor, losses: Tensor, y: Tensor) -> list[Tensor]:
                return [_weighted(t, y, losses) for t in tables] + list(ascent(z, losses, y))

            grads, out = self._pass(params, batch, terms)
        parts = grads[: len(tables)]
        for (c, key), g in zip(perturbed, grads[len(tables) :], strict=True):
            parts.append(
                self._perturbed_pass(
                    params, batch, c, self._ascent(params, g, key, store=key, consume=True)
                )
            )
        self._base_step(params, *parts)
        return out

    def _perturbed_pass(
        self, params: list[Tensor], batch: Batch, c: Tensor | None, e: Grads, only: bool = False
    ) -> Grads:
        """grad (1/B) sum_b c[y_b] l_b(w + e); `only`: this is the step's only pass over the whole
        batch, so it updates the normalization statistics whatever norm_stats says."""
        with self._perturbed(params, e, freeze=False if only else None):
            (g,), self._last_out = self._pass(params, batch, weights=[c], output=only)
        return g

    # ----------------------------------------------------------------------------------------------
    # Cost options (spec/ALGORITHMS-EFFICIENT.md, "Generic options for any unified-form method")

    def _init_cost_options(
        self,
        every: int,
        between: str,
        schedule: str,
        subset: float | None,
        mode: str,
        subset_pass: str,
        seed: int,
    ) -> None:
        """Validate the cost options (documented in the class docstring) and refuse those the
        method cannot take."""
        name = type(self).__name__
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(
                f"ascent_every must be an integer >= 1 (ascend every K steps; 1 is the method); "
                f"got {every!r}"
            )
        for key, value, choices in (
            ("ascent_between", between, ASCENT_BETWEEN),
            ("ascent_schedule", schedule, ASCENT_SCHEDULES),
            ("ascent_subset_mode", mode, SUBSET_MODES),
            ("ascent_subset_pass", subset_pass, SUBSET_PASSES),
        ):
            if value not in choices:
                raise ValueError(f"{key} must be one of {choices}; got {value!r}")
        if subset is not None:
            ok = isinstance(subset, (int, float)) and not isinstance(subset, bool)
            if ok and isinstance(subset, int):
                ok = subset >= 1
            elif ok:
                ok = math.isfinite(subset) and 0 < subset <= 1
            if not ok:
                raise ValueError(
                    "ascent_subset must be a sample count >= 1 (int) or a fraction of the batch in "
                    f"(0, 1] (float), or None for the whole batch; got {subset!r}"
                )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"ascent_seed must be an integer; got {seed!r}")
        for key, used in (("ascent_every", every > 1), ("ascent_subset", subset is not None)):
            if used and key in self.cost_refusals:
                raise ValueError(
                    f"{name} does not take {key}: {self.cost_refusals[key]}; drop the option"
                )
        self.ascent_every = every
        self.ascent_between = between
        self.ascent_schedule = schedule
        self.ascent_subset = subset
        self.ascent_subset_mode = mode
        self.ascent_subset_pass = subset_pass
        random = (every > 1 and schedule == "bernoulli") or (
            subset is not None and mode == "random"
        )
        self._generator = torch.Generator().manual_seed(seed) if random else None
        self._ascent_steps = 0  # steps taken under ascent_every > 1 (t of "t mod K")
        self._unit_keys: set[str] = set()  # radius keys whose unit directions are stored
        self._pending: dict[str, Grads] = {}  # this step's fresh unit directions, by radius key
        self._fresh = True
        self._last_out: Tensor | StepOutput | None = None  # the last perturbed pass's output

    def _draw_fresh(self) -> bool:
        """Whether this step takes a fresh ascent (ascent_schedule); a reuse step still ascends
        for a group with no stored direction (`_reusing`)."""
        if self.ascent_every == 1:
            return True
        if self.ascent_schedule == "every_K":
            return self._ascent_steps % self.ascent_every == 0
        assert self._generator is not None
        return bool(torch.rand((), generator=self._generator) < 1.0 / self.ascent_every)

    def _reusing(self, key: str) -> bool:
        """Whether this step reuses the stored direction of the perturbed group of radius `key`."""
        return not self._fresh and key in self._unit_keys

    def _commit_units(self, params: list[Tensor]) -> None:
        """A step was taken: count it, and store the unit directions of its fresh ascents."""
        self._ascent_steps += 1
        for key, units in self._pending.items():
            for p, u in zip(params, units, strict=True):
                if u is not None:
                    self.state[p][UNIT + key] = u
                elif p in self.state:
                    self.state[p].pop(UNIT + key, None)
            self._unit_keys.add(key)

    def _reused(self, params: list[Tensor], key: str) -> Grads:
        """e = rho(t) u from the stored unit direction u of radius `key`, rho(t) the group's
        current radius."""
        e: Grads = [None] * len(params)
        start = 0
        for group in self.param_groups:
            n = _n_trainable(group)
            idx = [
                i for i in range(start, start + n) if UNIT + key in self.state.get(params[i], {})
            ]
            start += n
            if idx:
                scaled = torch._foreach_mul(
                    [self.state[params[i]][UNIT + key] for i in idx], group[key]
                )
                for i, t in zip(idx, scaled, strict=True):
                    e[i] = t
        return e

    def _between(
        self,
        params: list[Tensor],
        batch: Batch,
        clean: Tensor | None,
        perturbed: Sequence[tuple[Tensor | None, str]],
    ) -> Tensor | StepOutput:
        """A step without a fresh ascent (ascent_between)."""
        if self.ascent_between == "base":
            tables = ([] if clean is None else [clean]) + [c for c, _ in perturbed]

            def total(z: Tensor, losses: Tensor, y: Tensor) -> list[Tensor]:
                return [sum(_weighted(t, y, losses) for t in tables)]

            (g,), out = self._pass(params, batch, total)
            self._base_step(params, g)
            return out
        parts, out = [], None
        if clean is not None and bool((clean != 0).any()):
            (g_c,), out = self._pass(params, batch, weights=[clean])
            parts.append(g_c)
        for c, key in perturbed:
            parts.append(
                self._perturbed_pass(params, batch, c, self._reused(params, key), out is None)
            )
            if out is None:
                out = self._last_out
        self._base_step(params, *parts)
        return out

    def _subset_size(self, size: int) -> int:
        """m for a batch of `size` samples."""
        m = self.ascent_subset
        if isinstance(m, float):
            return max(1, math.floor(m * size))
        return int(m or 0)

    def _choose(self, eligible: Tensor, scores: Tensor | None, m: int) -> tuple[Tensor, int]:
        """(membership mask of S, m_j): m_j = min(m, eligible count) samples among the eligible,
        uniformly (random) or of the largest score (topk). One host sync (the count)."""
        idx = eligible.nonzero()[:, 0]
        m_j = min(m, idx.numel())
        if scores is None:
            assert self._generator is not None
            order = torch.randperm(idx.numel(), generator=self._generator)[:m_j]
            pick = idx[order.to(idx.device)]
        else:
            pick = idx[torch.topk(scores[idx], m_j).indices]
        mask = torch.zeros_like(eligible).index_fill_(0, pick, True)
        return mask, m_j

    def _subset_step(
        self,
        params: list[Tensor],
        batch: Batch,
        clean: Tensor | None,
        perturbed: Sequence[tuple[Tensor | None, str]],
        ascent: Terms | None,
    ) -> Tensor | StepOutput:
        """A fresh step whose ascent directions come from sub-batches S_j (ascent_subset)."""
        if batch.labels is None:
            raise TypeError(
                "ascent_subset needs per-sample losses: call opt.step(closure, labels) with a "
                "closure that returns the logits"
            )
        y_all = torch.cat(batch.labels) if len(batch.labels) > 1 else batch.labels[0]
        m = self._subset_size(batch.size)
        topk = self.ascent_subset_mode == "topk"
        graph = self.ascent_subset_pass == "graph"
        tables = [] if clean is None else [clean]

        def vectors(z: Tensor, losses: Tensor, y: Tensor) -> list[Tensor]:
            if ascent is not None:
                return list(ascent(z, losses, y))
            return [_weighted(c, y, losses) for c, _ in perturbed]

        def choose(scores: list[Tensor] | None) -> list[tuple[Tensor, int]]:
            picks = []
            for j, (c, _) in enumerate(perturbed):
                eligible = torch.ones_like(y_all, dtype=torch.bool) if c is None else c[y_all] != 0
                picks.append(self._choose(eligible, None if scores is None else scores[j], m))
            return picks

        out: Tensor | StepOutput | None = None
        if graph:
            grads, out = self._pass_selected(params, batch, tables, vectors, choose)
            parts, ascents = grads[: len(tables)], grads[len(tables) :]
        else:
            scores: list[list[Tensor]] = [[] for _ in perturbed]

            def record(z: Tensor, losses: Tensor, y: Tensor) -> list[Tensor]:
                if topk:
                    for j, v in enumerate(vectors(z, losses, y)):
                        scores[j].append(v.detach())
                return [_weighted(t, y, losses) for t in tables]

            parts = []
            if tables:
                parts, out = self._pass(params, batch, record)
            elif topk:  # SAM-like: a no-grad forward at w to rank the samples
                logits, losses_all = [], []
                for closure, y in zip(batch.closures, batch.labels, strict=True):
                    z, losses = self._forward(closure, y, grad=False)
                    record(z, losses, y)
                    logits.append(z)
                    losses_all.append(losses)
                out = StepOutput(torch.cat(losses_all).sum() / batch.size, torch.cat(logits))
            picks = choose([torch.cat(v) for v in scores] if topk else None)
            ascents = [
                self._subset_pass(params, batch, j, mask, m_j, vectors)
                for j, (mask, m_j) in enumerate(picks)
            ]
        for (c, key), g in zip(perturbed, ascents, strict=True):
            e = self._ascent(params, g, key, store=key)
            parts.append(self._perturbed_pass(params, batch, c, e, only=out is None))
            if out is None:
                out = self._last_out
        self._base_step(params, *parts)
        return out

    def _subset_pass(
        self,
        params: list[Tensor],
        batch: Batch,
        j: int,
        mask: Tensor,
        m_j: int,
        vectors: Terms,
    ) -> Grads:
        """grad (1/m_j) sum_{b in S_j} v_j[b] from a forward on S_j only (zeros when S_j is empty)."""
        grads: Grads = [None] * len(params)
        start = 0
        for closure, labels in zip(batch.closures, batch.labels or [], strict=True):
            n = labels.shape[0]
            part = mask[start : start + n]
            start += n
            if m_j == 0:
                continue
            if takes_index(closure):
                index = part.nonzero()[:, 0]
                if not index.numel():
                    continue
                z, losses = self._forward(lambda c=closure, i=index: c(index=i), labels[index])
                v = vectors(z, losses, labels[index])[j]
            else:
                z, losses = self._forward(closure, labels)
                v = vectors(z, losses, labels)[j] * part
            grads = self._backward(v.sum() / m_j, params, into=grads)
        if all(g is None for g in grads):
            return [torch.zeros_like(p) for p in params]
        return grads

    def _pass_selected(
        self,
        params: list[Tensor],
        batch: Batch,
        tables: list[Tensor],
        vectors: Terms,
        choose: Callable[[list[Tensor] | None], list[tuple[Tensor, int]]],
    ) -> tuple[list[Grads], StepOutput]:
        """The pass at w of ascent_subset_pass="graph": forward every micro-batch (keeping the
        graphs), choose the sub-batches from the detached ascent terms, then backpropagate the
        clean terms and each masked ascent term (1/B; the scale cancels in unit())."""
        assert batch.labels is not None
        fwd = []
        for closure, y in zip(batch.closures, batch.labels, strict=True):
            z, losses = self._forward(closure, y)
            with torch.enable_grad():
                fwd.append((z, losses, y, vectors(z, losses, y)))
        topk = self.ascent_subset_mode == "topk"
        picks = choose(
            [torch.cat([f[3][j].detach() for f in fwd]) for j in range(len(fwd[0][3]))]
            if topk
            else None
        )
        n_terms = len(tables) + len(picks)
        grads: list[Grads] = [[None] * len(params) for _ in range(n_terms)]
        start = 0
        for _z, losses, y, vs in fwd:
            n = y.shape[0]
            with torch.enable_grad():
                terms = [_weighted(t, y, losses) for t in tables] + [
                    v * mask[start : start + n] for v, (mask, _) in zip(vs, picks, strict=True)
                ]
            start += n
            for k, v in enumerate(terms):
                grads[k] = self._backward(
                    v.sum() / batch.size, params, retain_graph=k < n_terms - 1, into=grads[k]
                )
        loss = torch.cat([f[1].detach() for f in fwd]).sum() / batch.size
        logits = torch.cat([f[0].detach() for f in fwd])
        return grads, StepOutput(loss, logits)

    def _cost_state(self) -> dict[str, Any]:
        """What the cost options carry across steps, beyond the unit directions (which live in the
        base's per-parameter state): the step count, the stored keys, the generator."""
        state: dict[str, Any] = {"steps": self._ascent_steps, "unit_keys": sorted(self._unit_keys)}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def _load_cost_state(self, state: dict[str, Any]) -> None:
        """Restore what `_cost_state` returned (nothing: a fresh start)."""
        self._ascent_steps = int(state.get("steps", 0))
        self._unit_keys = set(state.get("unit_keys", []))
        if self._generator is not None and "generator" in state:
            self._generator.set_state(state["generator"])


def _hooked(optimizer: torch.optim.Optimizer, step: Callable[..., Any], *args: Any) -> Any:
    """``step(optimizer, *args)`` as torch.optim.Optimizer's step wrapper runs it: its pre- and
    post-hooks and its profiler scope, which are skipped (they would do nothing) when no hook is
    registered and no profiler runs."""
    if (
        torch._C._autograd._profiler_enabled()
        or optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or _GLOBAL_STEP_HOOKS is None
        or any(_GLOBAL_STEP_HOOKS)
    ):
        return torch.optim.Optimizer.profile_hook_step(step)(optimizer, *args)
    out = step(optimizer, *args)
    optimizer._optimizer_step_code()
    return out


def _global_step_hooks() -> tuple[dict, dict] | None:
    """torch's registries of global optimizer step hooks (None if this torch has moved them)."""
    from torch.optim import optimizer as torch_optimizer

    hooks = (getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
             getattr(torch_optimizer, "_global_optimizer_post_hooks", None))
    return None if any(h is None for h in hooks) else hooks


_GLOBAL_STEP_HOOKS = _global_step_hooks()


def _weighted(c: Tensor | None, y: Tensor, losses: Tensor) -> Tensor:
    """The per-sample term c[y_b] l_b (c None: l_b)."""
    return losses if c is None else c[y] * losses


def _weighted_terms(tables: Sequence[Tensor | None]) -> Terms:
    """The terms c[y_b] l_b of a pass, one per class table c."""
    return lambda z, losses, y: [_weighted(c, y, losses) for c in tables]


def _fused_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor | None:
    """(1/B) sum_b c[y_b] CE_b (c = weight, or 1) reduced inside cross_entropy: one operation and
    one autograd node where the per-sample form takes three (on a 1 ms step, a few percent). None
    where cross_entropy cannot take the class weights (low-precision logits outside autocast)."""
    if weight is None:
        return F.cross_entropy(logits, labels)
    if logits.dtype in _WIDE or torch.is_autocast_enabled(logits.device.type):
        # 1/B folded into the class weights, in cross_entropy's precision (float32 at least)
        c = weight.to(torch.promote_types(logits.dtype, torch.float32)) / labels.shape[0]
        return F.cross_entropy(logits, labels, weight=c, reduction="sum")
    return None


def takes_index(closure: Callable[..., Tensor]) -> bool:
    """Whether a closure accepts the sample indices as ``index`` (forwards only those samples)."""
    try:
        return "index" in inspect.signature(closure).parameters
    except (TypeError, ValueError):
        return False


def _stepped() -> bool:
    """The closure handed to the base step under a GradScaler: tells a step taken from one skipped."""
    return True


def _no_gradient() -> TypeError:
    return TypeError(
        "no gradient reached any parameter: a torch-style closure must compute the loss, call "
        "loss.backward() and return the loss; a closure that returns logits needs the labels, "
        "opt.step(closure, labels)"
    )


def _torch_style(closure: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """Wrap a torch-style closure so that what it returns is checked: one loss, not logits or
    per-sample losses (which would otherwise fail later with an obscure message)."""

    def checked() -> Tensor:
        loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(
                "a torch-style closure (opt.step(closure), no labels) must return the loss it "
                f"backpropagated, one number; got {got}. Reduce per-sample losses (.mean()) before "
                "backward, or pass the labels, opt.step(closure, labels), with a closure that "
                "returns the logits"
            )
        return loss

    return checked


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` cannot run without a closure (torch.optim.LBFGS)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


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

    def _logits(self, closure: Callable[[], Tensor], labels: Tensor) -> Tensor:
        logits = super()._logits(closure, labels)
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"class_counts has {self.num_classes} classes but the model returned logits of "
                f"shape {tuple(logits.shape)}: give one count per class, in class order"
            )
        return logits

    def _table(self, name: str, values: Tensor | Callable[[], Tensor], like: Tensor) -> Tensor:
        """A per-class table moved once to the device and dtype of `like`, cached; `values` may be
        a function computing it (from other tables), called only the first time."""
        key = (name, like.device, like.dtype)
        if key not in self._tables:
            table = values() if callable(values) else values
            self._tables[key] = table.to(device=like.device, dtype=like.dtype)
        return self._tables[key]
