"""Bilateral SAM (Deng, Pang, Zhang, Huang, arXiv 2409.13173; authors' code ajiaaa/BSAM, bsam.py).

Symbols: MaxS = max_{||e|| <= rho_max} L(w + e) - L(w), SAM's sharpness; MinS = L(w) -
min_{||e|| <= rho_min} L(w + e), the flatness below w. The objective L + MaxS + MinS =
L(w) + max L(w + e) - min L(w + e) is descended with, for g0 = grad L(w), u = unit(g0):

    g_max = grad L(w + rho_max u),  g_min = grad L(w - rho_min u)
    d = g_max + g0 - r g_min;  restore w; base step with d.                         (3F 3B)

r = ||g_max|| / (||g_min|| + eps) in the authors' code (min_scale="norm_ratio", default; the eps is
samkit's, against a zero g_min); the objective's plain gradient has r = 1 (min_scale="one"). With
r = 1 and rho_min = 0 the step is SAM's; with the code's r it is not.

Authors' settings (train_bsam.py): rho_max 0.05; rho_min = 0.05 lr_t / lr_0 (write it into
``param_groups[i]["rho_min"]`` each epoch to follow it); SGD momentum 0.9, wd 1e-3, batch 128, 200
epochs, label smoothing 0.1; ResNet-18 on CIFAR-10/100; BN statistics frozen on passes 2 and 3
(``norm_stats="freeze", model=model``). Not pytorch_optimizer's ``BSAM``, which is Bayesian SAM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim import vector as vec
from samkit.optim.core import EPS, Batch, SharpnessAware, StepOutput
from samkit.optim.registry import register

MIN_SCALES = ("norm_ratio", "one")


@register("bsam", "bilateral-sam")
class BSAM(SharpnessAware):
    """Bilateral SAM: SAM's ascent plus a descent step's flatness around w.

    Args:
        rho_max: the ascent radius (default 0.05, the authors'); a param group may set its own.
        rho_min: the descent-side radius (default 0.05, the authors' value at lr_0).
        min_scale: "norm_ratio" (r = ||g_max|| / ||g_min||, the authors' code) or "one" (r = 1).
        See :class:`samkit.optim.core.SharpnessAware` for the base, loss and policy arguments.
    """

    passes = "3F 3B"
    cost_refusals: dict[str, str] = {
        "ascent_every": "it needs the gradient at w every step, so a reused ascent saves no pass",
        "ascent_subset": "it is not of the unified form (its gradient at w enters the final gradient)",
    }
    radius_keys = ("rho_max", "rho_min")

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho_max: float = 0.05,
        rho_min: float = 0.05,
        min_scale: str = "norm_ratio",
        **kwargs: Any,
    ) -> None:
        if min_scale not in MIN_SCALES:
            raise ValueError(f"min_scale must be one of {MIN_SCALES}; got {min_scale!r}")
        self.min_scale = min_scale
        super().__init__(params, base, radii={"rho_max": rho_max, "rho_min": rho_min}, **kwargs)

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        params = self._params()
        (g0,), out = self._pass(params, batch)
        e_max = self._ascent(params, g0, "rho_max")
        e_min = self._ascent(params, g0, "rho_min", average=False)
        with self._perturbed(params, e_max):
            (g_max,), _ = self._pass(params, batch)
        with self._perturbed(params, e_min, -1.0):
            (g_min,), _ = self._pass(params, batch)
        idx = vec.present(g0, g_max, g_min)
        d, g0s, mins = vec.pick(g_max, idx), vec.pick(g0, idx), vec.pick(g_min, idx)
        if self.ascent_sync:
            self._average(d + mins)  # the global gradients; else each process its own d
        with torch.no_grad():
            if self.min_scale == "norm_ratio" and d:
                r = vec.norm(d) / (vec.norm(mins) + EPS)
                torch._foreach_mul_(mins, r.to(mins[0].dtype))
            # d = g_max + g0 - r g_min, written into g_max
            torch._foreach_add_(d, g0s)
            torch._foreach_sub_(d, mins)
        self._base_step(params, g_max)
        return out
