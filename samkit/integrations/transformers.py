"""Hugging Face transformers: a Trainer that trains with any samkit method.

    trainer = SharpnessAwareTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                    method="focalsam", method_kwargs={"class_counts": counts})
    trainer.train()

The Trainer's loop is kept (accumulation, schedulers, logging, checkpoints, callbacks); only the step
changes. ``training_step`` records each micro-batch of an accumulation window; at the window's last one
samkit steps once on all of them as micro-batches, so ``gradient_accumulation_steps`` = N gives exactly
samkit's step on the N micro-batches, for every method. The model is called as ``model(**inputs)``
without the labels and must return logits (a tensor, a tuple starting with them, or an output with
``.logits``); the labels are ``inputs[label_names[0]]`` (default ``"labels"``). The logged loss is the
clean pass's mean loss; ``max_grad_norm`` clips the final gradient just before the base step, and the
logged ``grad_norm`` is its norm before clipping. The optimizer is samkit's `method` over the Trainer's
usual parameter groups (no weight decay on biases and normalization weights) with AdamW as the base
(``args.learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``), unless
``base`` (a torch optimizer class) or ``optimizers=(samkit_optimizer, scheduler)`` is given.

Every samkit method works, the efficient ones included. Momentum-SAM's model holds the perturbed w~
between steps: ``evaluate``, ``predict``, ``save_model`` and the Trainer's checkpoints see w (a
checkpoint holds w with the optimizer state that goes with it, and beside them w~, so that
``train(resume_from_checkpoint=...)`` continues bit for bit), and ``train`` leaves the model at w.
K-SAM's passes on its top-k samples forward only those rows (each input tensor whose first dimension
is the batch is indexed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import samkit.optim as so
from samkit.integrations._common import (
    at_w,
    before_base_step,
    clip_grad_norm,
    select_rows,
    to_w,
    unwrap,
)

PERTURBED_FILE = "samkit_at_perturbed.pt"  # in a checkpoint folder: Momentum-SAM's w~ and state


class SharpnessAwareTrainer(Trainer):
    """A ``transformers.Trainer`` whose step is samkit's `method` (see the module docstring).

    Args:
        method: a name of ``samkit.optim.available()`` (default ``"sam"``).
        method_kwargs: the method's own arguments (``rho``, ``class_counts``, ``head``, ...).
        base: the base torch optimizer class (default ``torch.optim.AdamW``, as the Trainer's).
        *args, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, method: str = "sam", method_kwargs: dict[str, Any] | None = None,
                 base: Callable[..., torch.optim.Optimizer] | None = None, **kwargs: Any) -> None:
        so.get(method)  # an unknown name fails here, listing the valid ones
        self.samkit_method = method
        self.samkit_kwargs = dict(method_kwargs or {})
        self.samkit_base = base
        self._samkit_pending: list[dict[str, Any]] = []
        self._samkit_stepped = False
        self._samkit_grad_norm: Tensor | None = None
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in trainable if n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            if self.samkit_base is None:
                base: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW
                base_kwargs = {"betas": (self.args.adam_beta1, self.args.adam_beta2),
                               "eps": self.args.adam_epsilon}
            else:
                base, base_kwargs = self.samkit_base, {}
            self.optimizer = so.create(self.samkit_method, groups, base=base,
                                       lr=self.args.learning_rate, **base_kwargs,
                                       **self.samkit_kwargs)
        opt = unwrap(self.optimizer)
        if not getattr(opt, "_samkit_trainer", False):
            step = opt.step

            def completed_step(closure: Any = None, labels: Any = None) -> Any:
                # the Trainer's optimizer.step() after a window: samkit stepped in training_step
                if closure is not None:
                    return step(closure, labels)
                if not self._samkit_stepped:
                    raise RuntimeError(
                        "SharpnessAwareTrainer steps in training_step, at the end of each "
                        "accumulation window; optimizer.step() came without one"
                    )
                self._samkit_stepped = False
                return None

            opt.step = completed_step  # an instance attribute, as torch's LR schedulers set too
            opt._samkit_trainer = True
        return self.optimizer

    def _samkit_logits(self, model: nn.Module, inputs: dict[str, Any], label: str) -> Tensor:
        out = model(**{k: v for k, v in inputs.items() if k != label})
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)):
            logits = out[0]
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}: SharpnessAwareTrainer needs logits "
                "(a tensor, a tuple starting with them, or an output with .logits)"
            )
        return logits

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        """Record the micro-batch; at the window's end, take samkit's step on the window and return
        its clean mean loss (zero before, so the Trainer's summed loss is the window's)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        label = (self.label_names or ["labels"])[0]
        if label not in inputs:
            raise ValueError(
                f"SharpnessAwareTrainer needs the labels in each batch under {label!r} (the "
                f"Trainer's label_names); got keys {sorted(inputs)}"
            )
        self._samkit_pending.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        pending, self._samkit_pending = self._samkit_pending, []
        opt = unwrap(self.optimizer)
        opt.set_epoch(int(self.state.epoch or 0))
        if isinstance(model, DistributedDataParallel):
            opt.model = model
        # K-SAM calls a closure with `index` (its top-k samples) to forward only those
        closures = [
            lambda index=None, i=i, n=i[label].shape[0]: self._samkit_logits(
                model, i if index is None else select_rows(i, index, n), label
            )
            for i in pending
        ]
        labels = [i[label] for i in pending]
        self._samkit_grad_norm = None

        def clip() -> None:
            self._samkit_grad_norm = clip_grad_norm(opt, self.args.max_grad_norm)

        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            with before_base_step(opt, clip):
                out = opt.step(closures, labels)
        else:
            out = opt.step(closures, labels)
        self._samkit_stepped = True
        return out.loss.detach()

    def _clip_grad_norm(self, model: nn.Module) -> Tensor | None:
        """The final gradient was clipped before the base step: report its norm before clipping."""
        return self._samkit_grad_norm

    # -- Momentum-SAM's model holds w~ between steps: everything outside the step sees w ------------

    def _samkit_at_w(self) -> Any:
        """A context holding the model at w (nothing to do before the optimizer exists)."""
        return contextlib.nullcontext() if self.optimizer is None else at_w(unwrap(self.optimizer))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, leaving the model at w."""
        out = super().train(*args, **kwargs)
        if self.optimizer is not None:
            to_w(unwrap(self.optimizer))
        return out

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self._samkit_at_w():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._samkit_at_w():
            return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        with self._samkit_at_w():
            super().save_model(*args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint holds the weights and optimizer state at w (the optimizer
        records that it is there); beside them, ``PERTURBED_FILE`` keeps Momentum-SAM's w~ and
        its optimizer state there, so that resuming continues bit for bit."""
        opt = None if self.optimizer is None else unwrap(self.optimizer)
        held = None
        if opt is not None and hasattr(opt, "at_w"):
            held = {"params": [p.detach().clone() for p in _params(opt)],
                    "extra": opt.extra_state()}
        with self._samkit_at_w():
            super()._save_checkpoint(model, trial)
        if held is not None and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            torch.save(held, os.path.join(self._get_output_dir(trial=trial), folder,
                                          PERTURBED_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resuming: back to Momentum-SAM's w~ and its optimizer state, as they were saved."""
        super()._load_optimizer_and_scheduler(checkpoint)
        file = None if checkpoint is None else os.path.join(checkpoint, PERTURBED_FILE)
        if file is None or not os.path.isfile(file):
            return
        held = torch.load(file, map_location="cpu", weights_only=True)
        opt = unwrap(self.optimizer)
        params = _params(opt)
        with torch.no_grad():
            torch._foreach_copy_(params, [t.to(p.device) for t, p in zip(held["params"], params,
                                                                        strict=True)])
        opt.load_extra_state(held["extra"])

    def _load_best_model(self) -> None:
        # the best checkpoint holds w: the model leaves w~ first, so the optimizer agrees
        if self.optimizer is not None:
            to_w(unwrap(self.optimizer))
        super()._load_best_model()


def _params(opt: torch.optim.Optimizer) -> list[Tensor]:
    """An optimizer's parameters, in its param groups' order."""
    return [p for group in opt.param_groups for p in group["params"]]
