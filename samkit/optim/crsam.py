"""CR-SAM (Wu, Luo, Wunsch, AAAI 2024, arXiv 2312.13555): SAM plus a curvature regulariser.

With g0 = grad L(w), v = unit(g0), g+ = grad L(w + rho v), g- = grad L(w - rho v):

    d = g+ + a (g+ + g- - 2 g0) + b (g+ - g-)                                    (3F 3B)

g+ + g- - 2 g0 ~ rho^2 grad(v^T H v) is the curvature along v, g+ - g- ~ 2 rho H v the gradient of the
gradient norm. The normalization running statistics: "update" lets all three passes update them;
"freeze" keeps both perturbed passes out (they see only the clean pass at w); "authors" does what the
authors' released code does: the clean pass at w and the pass at w - rho v update them, the pass at
w + rho v is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Batch, SharpnessAware, StepOutput, check_range
from samkit.optim.registry import register


@register("crsam", "cr-sam")
class CRSAM(SharpnessAware):
    """Curvature-regularised SAM (a = b = 0 is SAM).

    Args:
        rho: the finite-difference radius (default 0.1, the authors' script).
        a: weight of the curvature term, the authors' "gamma" (default 0.1), >= 0.
        b: weight of the gradient-norm term, the authors' "beta" (default 0.01), >= 0.
        norm_stats: "update" (default, every pass: samkit's common default), "freeze" (perturbed
            passes restored), or "authors" (the authors' released code: the statistics update at w
            and at w - rho v, and are frozen at w + rho v; needs ``model``). The weights follow the
            formula above (the paper's and the authors' code) under every choice.
    """

    passes = "3F 3B"
    cost_refusals: dict[str, str] = {
        "ascent_every": "it needs the gradient at w every step, so a reused ascent saves no pass",
        "ascent_subset": "it is not of the unified form (its gradient at w enters the final gradient)",
    }
    norm_stats_choices = ("update", "freeze", "authors")

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.1,
        a: float = 0.1,
        b: float = 0.01,
        **kwargs: Any,
    ) -> None:
        self.a = check_range("a", a, 0.0)
        self.b = check_range("b", b, 0.0)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        params = self._params()
        (g0,), out = self._pass(params, batch)
        e = self._ascent(params, g0)
        with self._perturbed(params, e, +1.0, freeze=self.norm_stats != "update"):
            (g_plus,), _ = self._pass(params, batch)
        with self._perturbed(params, e, -1.0, freeze=self.norm_stats == "freeze"):
            (g_minus,), _ = self._pass(params, batch)
        # d = (1 + a + b) g+ + (a - b) g- - 2a g0, written into g+
        idx = [
            i
            for i, gs in enumerate(zip(g0, g_plus, g_minus, strict=True))
            if all(g is not None for g in gs)
        ]
        if idx:
            with torch.no_grad():
                d = [g_plus[i] for i in idx]
                torch._foreach_mul_(d, 1.0 + self.a + self.b)
                torch._foreach_add_(d, [g_minus[i] for i in idx], alpha=self.a - self.b)
                torch._foreach_add_(d, [g0[i] for i in idx], alpha=-2.0 * self.a)
        self._base_step(params, g_plus)
        return out
