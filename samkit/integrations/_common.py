"""What the integrations share: finding the samkit optimizer inside a library's wrapper, running code
on the final gradient just before the one base step, holding Momentum-SAM's model at w, and K-SAM's
closures that forward only the chosen samples."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from samkit.optim.core import SharpnessAware


def unwrap(optimizer: object) -> SharpnessAware:
    """The samkit optimizer inside a library's wrapper (LightningOptimizer, AcceleratedOptimizer)."""
    inner = optimizer
    # LightningOptimizer subclasses the class it wraps: always go to the innermost `.optimizer`
    for _ in range(4):
        if not isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            break
        inner = inner.optimizer
    if isinstance(inner, SharpnessAware):
        return inner
    raise TypeError(
        f"expected a samkit optimizer (samkit.optim.*), got {type(optimizer).__name__}: create one "
        "with samkit.optim.create(method, params, ...)"
    )


@contextlib.contextmanager
def before_base_step(opt: SharpnessAware, fn: Callable[[], None]) -> Iterator[None]:
    """Run `fn` when p.grad holds the final gradient, just before the base step (gradient
    clipping, a library's pre-step hooks), for the steps taken inside the block."""

    def hook(*_: object) -> None:
        fn()

    handle = opt.base.register_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def clip_grad_norm(opt: SharpnessAware, max_norm: float) -> torch.Tensor:
    """Clip the final gradient of `opt`'s parameters to `max_norm`; the norm before clipping."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def at_w(opt: SharpnessAware) -> contextlib.AbstractContextManager[None]:
    """Hold the model at w for the body (evaluation, checkpointing): Momentum-SAM's model holds the
    perturbed w~ between steps (``MSAM.at_w``); nothing to do for the other methods."""
    held = getattr(opt, "at_w", None)
    return held() if held is not None else contextlib.nullcontext()


def to_w(opt: SharpnessAware) -> None:
    """Move Momentum-SAM's model to w for good (the end of training); a no-op for other methods."""
    move = getattr(opt, "to_w", None)
    if move is not None:
        move()


def select_rows(inputs: Any, index: torch.Tensor, size: int) -> Any:
    """`inputs` (a tensor, or a mapping, list or tuple of them) with only the samples `index`: the
    tensors whose first dimension is the batch `size` are indexed, everything else is kept. K-SAM
    passes the index of its top-k samples so that its passes forward only those."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index] if inputs.dim() > 0 and inputs.shape[0] == size else inputs
    if isinstance(inputs, Mapping):
        return type(inputs)({k: select_rows(v, index, size) for k, v in inputs.items()})
    if isinstance(inputs, (list, tuple)) and not hasattr(inputs, "_fields"):
        return type(inputs)(select_rows(v, index, size) for v in inputs)
    return inputs
