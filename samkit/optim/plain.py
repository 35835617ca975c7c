"""The base optimizer alone, behind the same step API: the "SGD" row of every comparison."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Batch, SharpnessAware, StepOutput
from samkit.optim.registry import register


@register("plain", "sgd", "base")
class Plain(SharpnessAware):
    """One forward and backward at w, then the base step (1F 1B): no sharpness term.

    Lets a training loop switch between plain training and any sharpness-aware method by name.
    """

    radius_keys = ()
    passes = "1F 1B"
    cost_refusals: dict[str, str] = {
        "ascent_every": "the base optimizer has no ascent",
        "ascent_subset": "the base optimizer has no ascent",
    }

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base, radii={}, **kwargs)

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        params = self._params()
        (g,), out = self._pass(params, batch)
        self._base_step(params, g)
        return out
