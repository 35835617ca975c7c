"""Hugging Face accelerate: a prepared optimizer that takes samkit's step on the whole accumulation
window.

    model, loader = accelerator.prepare(model, loader)
    opt = prepare_optimizer(accelerator, samkit.optim.FocalSAM(model.parameters(), ...), model)
    for x, y in loader:
        with accelerator.accumulate(model):
            out = opt.step(lambda x=x: model(x), y)   # None until the window's last micro-batch

Under ``accelerator.accumulate`` each micro-batch's closure (and labels) is only recorded; at the
window's last micro-batch (``accelerator.sync_gradients``) samkit steps once on all of them as
micro-batches, so N accumulated micro-batches give exactly samkit's step on the N micro-batches, for
every method. The step returns what samkit's step returns: ``(loss, logits)`` of the clean pass with
labels, or the loss of a torch-style closure (which computes the loss, calls
``accelerator.backward(loss)`` and returns the loss). Mixed precision: bf16 needs nothing (accelerate
runs the prepared model under autocast); for fp16 the accelerator's GradScaler is handed to samkit,
which scales every pass. Under several processes, pass the prepared model: samkit runs its passes
under ``no_sync`` and averages the gradients itself.

Every samkit method works, the efficient ones included. Momentum-SAM's model holds the perturbed w~
between steps: evaluate and save weights for use inside ``with opt.at_w():`` (exact: the model
returns to w~ by copy), and call ``opt.to_w()`` when training ends (both do nothing for the other
methods, so a loop can use them whatever the method). ``accelerator.save_state`` /
``load_state`` keep w~ with the optimizer state that says so: a resumed run continues exactly.
K-SAM forwards only its top-k samples when the closure takes them:
``opt.step(lambda index=None, x=x: model(x if index is None else x[index]), y)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from samkit.integrations._common import at_w, to_w, unwrap
from samkit.optim.core import SharpnessAware, StepOutput


class SharpnessAwareAcceleratedOptimizer(AcceleratedOptimizer):
    """accelerate's optimizer wrapper for a samkit optimizer (see the module docstring); build it
    with :func:`prepare_optimizer`."""

    def __init__(self, optimizer: SharpnessAware, accelerator: Accelerator,
                 model: nn.Module | None = None) -> None:
        # the GradScaler goes to samkit, which scales each of its passes; accelerate's own
        # scaler path would step the base optimizer outside the sharpness-aware step
        super().__init__(optimizer, device_placement=accelerator.device_placement, scaler=None)
        self.grad_scaler = accelerator.scaler
        if self.grad_scaler is not None:
            optimizer.grad_scaler = self.grad_scaler
        if isinstance(model, DistributedDataParallel):
            optimizer.model = model
        self._pending: list[tuple[Callable[[], Tensor], Tensor | None]] = []
        self._bound: list[list[tuple[Any, Any]]] = []  # each closure's free variables, as recorded
        self._is_accelerate_prepared = True

    def step(self, closure: Callable[[], Tensor] | None = None,
             labels: Tensor | None = None) -> Tensor | StepOutput | None:
        """Record the micro-batch; at the window's end take samkit's step on all of them and return
        its output (None before the window's end)."""
        if closure is None:
            raise TypeError(
                "a samkit step needs a closure: opt.step(lambda: model(x), y) (logits and labels), "
                "or opt.step(closure) with a closure that computes the loss, calls "
                "accelerator.backward(loss) and returns it"
            )
        if self._pending and (labels is None) != (self._pending[0][1] is None):
            raise ValueError(
                "one accumulation window mixes closures with and without labels: give labels to "
                "every micro-batch, or to none"
            )
        self._pending.append((closure, labels))
        self._bound.append([(c, _cell_value(c)) for c in _cells(closure)])
        if not self.gradient_state.sync_gradients:
            return None
        pending, self._pending = self._pending, []
        bound, self._bound = self._bound, []
        for cells in bound[:-1]:
            for cell, value in cells:
                if _cell_value(cell) is not value:
                    raise ValueError(
                        "a closure of this accumulation window reads a variable that has changed "
                        "since it was recorded (a loop variable, say), so it would see a later "
                        "micro-batch: bind it when you create the closure, e.g. "
                        "opt.step(lambda x=x: model(x), y)"
                    )
        opt: SharpnessAware = self.optimizer
        if pending[0][1] is not None:
            out = opt.step([c for c, _ in pending], [y for _, y in pending])
        elif len(pending) == 1:
            out = opt.step(pending[0][0])
        else:
            out = opt.step(lambda: _mean_of([c() for c, _ in pending]))
        self._is_overflow = opt.last_step_skipped
        if self.grad_scaler is not None:
            self.grad_scaler.update()
        return out

    def at_w(self) -> contextlib.AbstractContextManager[None]:
        """Hold the model at w for the body (Momentum-SAM; nothing to do for other methods)."""
        return at_w(self.optimizer)

    def to_w(self) -> None:
        """Move the model to w for good, e.g. when training ends (Momentum-SAM; else nothing)."""
        to_w(self.optimizer)


def _cells(closure: Callable[[], Tensor]) -> list[Any]:
    """The filled free-variable cells of a closure (none for other callables)."""
    return [c for c in getattr(closure, "__closure__", None) or () if _cell_value(c) is not _EMPTY]


_EMPTY = object()


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return _EMPTY


def _mean_of(losses: list[Tensor]) -> Tensor:
    """The window's loss: the mean of its micro-batches' losses (each a mean over equal batches)."""
    total = losses[0].detach()
    for loss in losses[1:]:
        total = total + loss.detach()
    return total / len(losses)


def prepare_optimizer(accelerator: Accelerator, optimizer: Any,
                      model: nn.Module | None = None) -> SharpnessAwareAcceleratedOptimizer:
    """Wrap a samkit optimizer for `accelerator` (registered with it, so ``save_state`` and
    ``load_state`` include it). `model`: the prepared model (needed under several processes)."""
    wrapped = SharpnessAwareAcceleratedOptimizer(unwrap(optimizer), accelerator, model)
    return accelerator.prepare_optimizer(wrapped)
