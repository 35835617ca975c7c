"""GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022; authors'
PyTorch port juntang-zhuang/GSAM, gsam/gsam.py; JAX original in google-research/big_vision).

Symbols (paper Alg. 1): L the loss, L_p = max_{||e|| <= rho} L(w + e) the perturbed loss, h = L_p - L
the surrogate gap; g = grad L(w), g_p = grad L(w + e); alpha the weight of the gap descent; rho_t the
radius of step t, tied to the learning rate lr_t of that step's base step:

    rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)
    e = rho_t g / (||g|| + eps);  g_perp = g - (<g, g_p> / (||g_p||^2 + eps)) g_p
    d = g_p - alpha g_perp;  restore w; base step with d.                          (2F 2B)

d descends L_p and, orthogonally to g_p, decreases the gap. Whole-vector inner products, as in the
paper and both codes. The eps in the projection has the authors' code's value (gsam.py,
perturb_eps, 1e-12) but not its place: their code writes the coefficient as
c ||g|| / (||g_p|| + eps) with c = <g, g_p> / (||g|| ||g_p|| + eps); the two differ only when
||g_p|| is near eps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim import vector as vec
from samkit.optim.core import EPS, Batch, SharpnessAware, StepOutput, check_range
from samkit.optim.registry import register


@register("gsam")
class GSAM(SharpnessAware):
    """Surrogate-gap guided SAM: SAM's descent plus an orthogonal descent of the gap L_p - L.

    Args:
        rho: rho_max, the radius at lr = lr_max (default 0.05, SAM's usual CIFAR value [samkit]);
            a param group may set its own.
        rho_min: the radius at lr = lr_min (default: rho, a constant radius). The paper's ImageNet
            ResNet-50 uses rho 0.04 -> 0.02, its ViTs 0.6 -> 0 or 0.1.
        alpha: weight of the gap descent, in [0, 1] (default 0.4: the authors' CIFAR example and
            ViT-S/32; the paper's ResNets use 0.01). alpha = 0 is SAM with radius rho_t.
        lr_max, lr_min: the learning rates at which the radius is rho and rho_min (default: each
            group's lr at construction, and 0). They are stored in each param group, so they are
            saved with the optimizer. If lr_max = lr_min the radius is rho. Outside
            [lr_min, lr_max] the map extrapolates, as in the authors' code.
        See :class:`samkit.optim.core.SharpnessAware` for the base, loss and policy arguments
        (``adaptive=True`` gives the authors' CIFAR example's ASAM-form ascent).

    rho_t is read from the lr of each group when the step runs, i.e. the lr the base step then uses:
    call ``scheduler.step()`` after ``opt.step()``, as usual.
    """

    passes = "2F 2B"
    cost_refusals: dict[str, str] = {
        "ascent_every": "it needs the gradient at w every step, so a reused ascent saves no pass",
        "ascent_subset": "it is not of the unified form (its gradient at w enters the final gradient)",
    }
    radius_keys = ("rho", "rho_min")

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        rho_min: float | None = None,
        alpha: float = 0.4,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self._lr_max = None if lr_max is None else check_range("lr_max", lr_max, 0.0)
        self._lr_min = check_range("lr_min", lr_min, 0.0)
        radii = {"rho": rho, "rho_min": rho if rho_min is None else rho_min}
        super().__init__(params, base, radii=radii, **kwargs)
        for group in self.param_groups:
            self._set_lr_range(group)

    def _set_lr_range(self, group: dict[str, Any]) -> None:
        group.setdefault("lr_max", float(group["lr"]) if self._lr_max is None else self._lr_max)
        group.setdefault("lr_min", self._lr_min)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "base"):
            self._set_lr_range(self.param_groups[-1])

    @staticmethod
    def radius(group: dict[str, Any]) -> float:
        """rho_t of a param group at its current lr."""
        span = group["lr_max"] - group["lr_min"]
        if span == 0:
            return float(group["rho"])
        frac = (float(group["lr"]) - group["lr_min"]) / span
        return group["rho_min"] + (group["rho"] - group["rho_min"]) * frac

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        params = self._params()
        (g,), out = self._pass(params, batch)
        # rho_t unit(g), averaged over processes in place; g is read again below: e is a copy
        e = self._ascent(params, g, radius=[self.radius(group) for group in self.param_groups])
        with self._perturbed(params, e):
            (g_p,), _ = self._pass(params, batch)
        idx = vec.present(g, g_p)
        gs, gps = vec.pick(g, idx), vec.pick(g_p, idx)
        if self.ascent_sync:
            self._average(gps)  # decompose the global g_p; else each process its own (the code)
        with torch.no_grad():
            coef = vec.dot(gs, gps) / (vec.norm(gps).square() + EPS)
            # d = g_p - alpha (g - coef g_p) = (1 + alpha coef) g_p - alpha g, written into g_p
            torch._foreach_mul_(gps, (1.0 + self.alpha * coef).to(gps[0].dtype) if gps else 1.0)
            torch._foreach_add_(gps, gs, alpha=-self.alpha)
        self._base_step(params, g_p)
        return out
