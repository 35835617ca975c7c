"""Focal-SAM (Li et al., ICML 2025, arXiv 2505.01660): class-wise sharpness with a focal weight.

    min_w L(w) + lam * sum_i (1 - pi_i)^gamma * S_i(w),   S_i(w) = max_{||e|| <= rho} L^i(w + e) - L^i(w)

with pi_i the training-set prior of class i. One shared perturbation from the focal loss
L^gamma = sum_i (1 - pi_i)^gamma L^i: per sample, c_y = lam (1 - pi_y)^gamma, and

    e = rho * unit(grad (1/B) sum c_y l_b(w));
    g = grad (1/B) sum (1 - c_y) l_b(w) + grad (1/B) sum c_y l_b(w + e).          (2F 3B)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Batch, ClassAware, StepOutput, check_range
from samkit.optim.registry import register


@register("focalsam", "focal-sam")
class FocalSAM(ClassAware):
    """Focal-SAM: rare classes get most of the sharpness penalty, at a cost independent of C.

    Args:
        class_counts: training-set count of each class (gives the priors pi).
        rho: the ascent radius (default 0.05; the authors use 0.2 on CIFAR-10-LT, 0.3 on CIFAR-100-LT).
        gamma: focal exponent on (1 - pi), >= 0 (default 1.0; authors 3.0 / 3.2 on CIFAR-LT).
        lam: weight of the sharpness term, >= 0; lam > 1 is allowed (default 0.5; authors 0.5 / 0.8).

    gamma = 0, lam = 1 is SAM; lam = 0 is the base optimizer. The step and the default
    ``norm_stats="update"`` (every pass updates the running statistics) follow the authors' code;
    the defaults of rho, gamma and lam are samkit's (the authors' values are above).
    """

    cost_refusals: dict[str, str] = {}
    passes = "2F 3B"

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        class_counts: Sequence[int] | Tensor | None = None,
        rho: float = 0.05,
        gamma: float = 1.0,
        lam: float = 0.5,
        **kwargs: Any,
    ) -> None:
        self.gamma = check_range("gamma", gamma, 0.0)
        self.lam = check_range("lam", lam, 0.0)
        super().__init__(params, base, class_counts, radii={"rho": rho}, **kwargs)
        prior = self.class_counts / self.class_counts.sum()
        self.focal = self.lam * (1 - prior) ** self.gamma

    def _update(self, batch: Batch) -> StepOutput:
        like = self._params()[0]
        c = self._table("focal", self.focal, like)
        return self._unified(
            batch, clean=self._table("1-focal", lambda: 1 - c, like), perturbed=[(c, "rho")]
        )
