"""LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022, arXiv 2203.02714; no official code; ports rollovd/LookSAM and MSAM's optimizer/looksam.py).

Symbols (paper Alg. 1): k the period of the full SAM step, alpha the weight of the reused direction,
g = grad L(w) (every step), g_s = grad L(w + rho unit(g)), g_v the component of g_s orthogonal to g.
On step t:

    t mod k = 0:  g_s at w + rho unit(g);  g_v = g_s - (<g_s, g> / ||g||^2) g;  d = g_s
    otherwise:    d = g + alpha (||g|| / (||g_v|| + eps)) g_v                       (1F 1B)
    base step with d at w.                                Passes, averaged: (1 + 1/k)F (1 + 1/k)B

Whole-vector decomposition, as the paper writes it and the MSAM authors' port does (rollovd's port
and pytorch_optimizer's LookSAM decompose per tensor). The eps in the reuse step is samkit's
(rollovd's unit() has none and gives NaN on a zero gradient); the projection has none, so that
rho = 0 gives g_v = 0 exactly (a zero g gives g_v = g_s). The step counter t lives in the
optimizer's state (saved with it), so the period does not restart each epoch as rollovd's batch
index does; it counts steps taken (a skipped step does not count). g_v is kept per parameter in the
base's state ("looksam_gv"). k = 1 is SAM; alpha = 0 is "SAM-k" (SAM every k steps, the base step
otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim import vector as vec
from samkit.optim.core import EPS, Batch, SharpnessAware, StepOutput, check_range
from samkit.optim.registry import register

GV = "looksam_gv"


@register("looksam")
class LookSAM(SharpnessAware):
    """SAM every k steps; in between, the last ascent's orthogonal direction g_v is reused.

    Args:
        rho: the ascent radius (default 0.05, SAM's [samkit]; pytorch_optimizer's is
            0.1); a param group may set its own.
        k: the period (default 10, the ports' value); k = 1 is SAM.
        alpha: weight of the reused direction, >= 0 (default 0.7, the ports' value).
        See :class:`samkit.optim.core.SharpnessAware` for the base, loss and policy arguments.
    """

    passes = "2F 2B every k-th step, 1F 1B otherwise"
    cost_refusals: dict[str, str] = {
        "ascent_every": "LookSAM has its own period: set its k",
        "ascent_subset": "it is not of the unified form (its gradient at w enters the final gradient)",
    }

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        k: int = 10,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (the period of the SAM step); got {k!r}")
        self.k = k
        self.alpha = check_range("alpha", alpha, 0.0)
        self.looksam_step = 0
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def extra_state(self) -> dict[str, Any]:
        return {"looksam_step": self.looksam_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.looksam_step = int(state.get("looksam_step", 0))

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        params = self._params()
        (g,), out = self._pass(params, batch)
        stored = [self.state.get(p, {}).get(GV) for p in params]
        ascent = self.looksam_step % self.k == 0 or all(v is None for v in stored)
        if ascent:
            with self._perturbed(params, self._ascent(params, g)):
                (d,), _ = self._pass(params, batch)
            idx = vec.present(g, d)
            gs, ds = vec.pick(g, idx), vec.pick(d, idx)
            if self.ascent_sync:
                self._average(ds)
            with torch.no_grad():
                # no eps here: with g_s = g (rho = 0) the quotient is exactly 1 and g_v exactly 0
                gg = vec.dot(gs, gs)
                coef = vec.dot(ds, gs) / gg.clamp_min(torch.finfo(gg.dtype).tiny)
                g_v = torch._foreach_mul(gs, -coef.to(gs[0].dtype)) if gs else []
                torch._foreach_add_(g_v, ds)
        else:
            d = g
            idx = vec.present(g, stored)
            gs, vs = vec.pick(g, idx), vec.pick(stored, idx)
            if self.ascent_sync:
                self._average(vec.pick(g, vec.present(g)))
            with torch.no_grad():
                ratio = self.alpha * vec.norm(gs) / (vec.norm(vs) + EPS)
                torch._foreach_add_(
                    gs, torch._foreach_mul(vs, ratio.to(vs[0].dtype) if vs else 1.0)
                )
        self._base_step(params, d)
        if not self.last_step_skipped:
            self.looksam_step += 1
            if ascent:
                for i, v in zip(idx, g_v, strict=True):
                    self.state[params[i]][GV] = v
        return out
