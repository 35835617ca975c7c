"""What the integrations share: finding the samkit optimizer inside a library's wrapper, and running
code on the final gradient just before the one base step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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
