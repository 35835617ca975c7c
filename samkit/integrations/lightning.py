"""PyTorch Lightning: a LightningModule base class that steps any samkit method.

Subclass :class:`SharpnessAwareModule` instead of ``LightningModule``: write ``forward`` (returning
logits) and ``configure_optimizers`` (returning a samkit optimizer, with a scheduler if you like); the
module provides ``training_step``. Both of Lightning's optimization modes work:

* automatic (the default): Trainer flags ``accumulate_grad_batches``, ``gradient_clip_val``,
  ``precision="bf16-mixed"``, checkpoint resume and ``strategy="ddp"`` work as usual. Each batch of an
  accumulation window is only recorded; at the window's last batch (inside Lightning's
  ``optimizer_step``) samkit takes one step on all of them as micro-batches, so N accumulated batches
  give exactly samkit's step on the N micro-batches, for every method. Gradient clipping and the
  ``on_before_optimizer_step`` hooks act on the final gradient, just before the base step.
* manual (``self.automatic_optimization = False``): call :meth:`SharpnessAwareModule.samkit_step`
  from your own ``training_step``; the default ``training_step`` does this once per batch.

Either way ``training_step`` never runs on perturbed weights: ``train_loss`` and ``train_acc`` are
logged from the clean pass (override :meth:`log_clean` to log more), and ``global_step`` counts steps.

Every samkit method works, the efficient ones included. Momentum-SAM's model holds the perturbed w~
between steps: validation runs at w (and training resumes at w~ exactly, by copy), checkpoints hold w
with the optimizer state that goes with it (``load_from_checkpoint`` gives w), and the model is left
at w when ``fit`` ends. A full checkpoint also keeps w~, so that ``fit(ckpt_path=...)`` continues bit
for bit. If you override ``on_validation_start``, ``on_validation_end``, ``on_train_end``,
``on_save_checkpoint`` or ``on_load_checkpoint``, call ``super()``. K-SAM's passes on its top-k
samples forward only those rows (the inputs' tensors whose first dimension is the batch are indexed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from samkit.integrations._common import at_w, before_base_step, select_rows, to_w, unwrap
from samkit.optim.core import SharpnessAware, StepOutput

RESUME_KEY = "samkit_at_perturbed"  # a checkpoint's weights and optimizer state at w~ (Momentum-SAM)


class SharpnessAwareModule(pl.LightningModule):
    """A LightningModule trained by a samkit optimizer (see the module docstring).

    Override :meth:`unpack` when a batch is not ``(inputs, labels)``, and :meth:`log_clean` to log
    more than the clean loss and accuracy.
    """

    def __init__(self) -> None:
        super().__init__()
        self._samkit_pending: list[tuple[Any, Tensor]] = []
        self._samkit_window_end = False
        self._samkit_at_w = contextlib.ExitStack()  # held during validation (Momentum-SAM)

    # -- what a subclass may override -------------------------------------------------------------

    def unpack(self, batch: Any) -> tuple[Any, Tensor]:
        """(inputs, labels) of a batch; the inputs are passed to ``self(inputs)``."""
        x, y = batch[0], batch[1]
        return x, y

    def log_clean(self, out: StepOutput, labels: Tensor) -> None:
        """Log the clean pass of a step: its mean loss and accuracy on the step's samples."""
        acc = (out.logits.argmax(1) == labels).float().mean()
        n = labels.shape[0]
        self.log("train_loss", out.loss, prog_bar=True, batch_size=n)
        self.log("train_acc", acc, prog_bar=True, batch_size=n)

    # -- the step -----------------------------------------------------------------------------------

    def samkit_step(
        self, closures: Callable[[], Tensor] | Sequence[Callable[[], Tensor]],
        labels: Tensor | Sequence[Tensor],
    ) -> StepOutput:
        """One samkit step (closures re-evaluating the model and returning logits, and labels, as
        for ``opt.step``) that Lightning counts: ``global_step`` advances, the
        ``on_before_optimizer_step`` hooks (and in automatic optimization, gradient clipping) run on
        the final gradient, and under DDP samkit averages the gradients itself."""
        lopt = self.optimizers()
        if isinstance(lopt, list):
            raise ValueError(
                "SharpnessAwareModule trains with one optimizer: return a single samkit optimizer "
                "from configure_optimizers"
            )
        opt = unwrap(lopt)
        trainer = self.trainer
        strategy_model = trainer.strategy.model
        if isinstance(strategy_model, DistributedDataParallel):
            opt.model = strategy_model  # samkit runs its passes under no_sync and averages itself
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            opt.grad_scaler = scaler

        def before_step() -> None:
            for callback in trainer.callbacks:
                callback.on_before_optimizer_step(trainer, self, lopt)
            self.on_before_optimizer_step(lopt)
            if self.automatic_optimization:
                self.configure_gradient_clipping(
                    lopt, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
                )

        lopt._on_before_step()  # Lightning's own progress tracking, as LightningOptimizer.step
        with before_base_step(opt, before_step):
            out = opt.step(closures, labels)
        lopt._on_after_step()
        if scaler is not None:
            scaler.update()
        if not isinstance(out, StepOutput):
            raise TypeError("samkit_step needs closures returning logits, with their labels")
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Record the batch; at the end of an accumulation window (every batch in manual mode) take
        one samkit step on the recorded batches and log its clean pass. Returns the clean loss at
        the window's end, a zero (contributing no gradient) before it."""
        x, y = self.unpack(batch)
        self._samkit_pending.append((x, y))
        if self.automatic_optimization and not self._samkit_window_end:
            return torch.zeros((), device=y.device, requires_grad=True)
        pending, self._samkit_pending = self._samkit_pending, []
        # K-SAM calls a closure with `index` (its top-k samples) to forward only those
        closures = [
            lambda index=None, xi=xi, n=yi.shape[0]: self(
                xi if index is None else select_rows(xi, index, n)
            )
            for xi, yi in pending
        ]
        labels = [yi for _, yi in pending]
        out = self.samkit_step(closures, labels)
        self.log_clean(out, torch.cat(labels))
        # Lightning backpropagates what training_step returns: a detached copy gives no gradient
        return out.loss.detach().clone().requires_grad_()

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Lightning's step at the end of an accumulation window: run its closure (so
        ``training_step`` of the window's last batch takes the samkit step), outside DDP's
        gradient synchronisation, which samkit does itself."""
        if optimizer_closure is None:
            raise ValueError("SharpnessAwareModule.optimizer_step needs Lightning's closure")
        model = self.trainer.strategy.model
        no_sync = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel)
            else contextlib.nullcontext()
        )
        self._samkit_window_end = True
        try:
            with no_sync:
                optimizer_closure()
        finally:
            self._samkit_window_end = False

    def _samkit_optimizer(self) -> SharpnessAware | None:
        """The samkit optimizer, once the Trainer has set it up (None before, or with several)."""
        trainer = self._trainer
        if trainer is None or len(trainer.optimizers) != 1:
            return None
        return unwrap(trainer.optimizers[0])

    def on_validation_start(self) -> None:
        """Validate at w: Momentum-SAM's model holds w~ between steps (restored at the end)."""
        opt = self._samkit_optimizer()
        if opt is not None:
            self._samkit_at_w.enter_context(at_w(opt))

    def on_validation_end(self) -> None:
        """Back to where training left the model (w~ for Momentum-SAM, exactly)."""
        self._samkit_at_w.close()

    def on_train_end(self) -> None:
        """Leave the trained model at w (Momentum-SAM)."""
        opt = self._samkit_optimizer()
        if opt is not None:
            to_w(opt)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint holds w and the optimizer state that goes with it, not Momentum-SAM's w~: the
        weights and optimizer state are taken again at w (copies: the model returns to w~). A full
        checkpoint also keeps what Lightning took at w~, under ``RESUME_KEY``, so that resuming a
        fit continues bit for bit (the optimizer's state tensors are shared, saved once)."""
        opt = self._samkit_optimizer()
        if opt is None or not hasattr(opt, "at_w"):
            return
        strategy = self.trainer.strategy
        held = {"state_dict": {k: v.detach().clone() for k, v in checkpoint["state_dict"].items()},
                "optimizer_states": checkpoint.get("optimizer_states")}
        with at_w(opt):
            checkpoint["state_dict"] = {
                k: v.detach().clone() for k, v in strategy.lightning_module_state_dict().items()
            }
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [
                    strategy.optimizer_state(o) for o in self.trainer.optimizers
                ]
        if held["optimizer_states"] is not None:
            checkpoint[RESUME_KEY] = held

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming a fit loads Momentum-SAM's w~ and its optimizer state as they were (see
        :meth:`on_save_checkpoint`); anything else (``load_from_checkpoint``, validate, test)
        loads w."""
        held = checkpoint.pop(RESUME_KEY, None)
        trainer = self._trainer
        if held is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            checkpoint.update(held)

    def on_train_epoch_start(self) -> None:
        """Tell the optimizer the epoch (SSE-SAM switches stage by it)."""
        opt = self.optimizers()
        if not isinstance(opt, list):
            unwrap(opt).set_epoch(self.current_epoch)

