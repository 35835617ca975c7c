"""ImbSAM (Zhou et al., ICCV 2023, arXiv 2308.07815): flatten only the tail classes.

min_w L_H(w) + kappa * max_{||e|| <= rho} L_T(w + e),     T = {c : n_c < eta},  H = the rest

forward at w; g_H = grad L_H(w); e = rho * unit(grad L_T(w)) (same graph);
g_T = grad kappa L_T(w + e) (whole batch forwarded, tail samples' loss);
base step with g_H + g_T at w.                                              (2F 3B)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Batch, ClassAware, StepOutput, check_range
from samkit.optim.registry import register


@register("imbsam", "imb-sam")
class ImbSAM(ClassAware):
    """Imbalanced SAM: a plain gradient for head samples, a SAM gradient for tail samples.

    Args:
        class_counts: training-set count of each class (fixes the tail for the whole run).
        rho: the tail ascent radius (default 0.05).
        eta: tail threshold; a class is tail when its count is strictly below eta (default 20).
        kappa: weight of the tail loss; 1 in the paper, 2 in the authors' current code.
    """

    passes = "2F 3B"

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        class_counts: Sequence[int] | Tensor | None = None,
        rho: float = 0.05,
        eta: float = 20,
        kappa: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.eta = check_range("eta", eta, 1.0)
        self.kappa = check_range("kappa", kappa, 0.0, low_open=True)
        super().__init__(params, base, class_counts, radii={"rho": rho}, **kwargs)
        self.tail = (self.class_counts < self.eta).double()

    def _update(self, batch: Batch) -> StepOutput:
        tail = self._table("tail", self.tail, self._params()[0])
        return self._unified(batch, clean=1 - tail, perturbed=[(self.kappa * tail, "rho")])
