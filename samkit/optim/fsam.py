"""Friendly SAM (Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization", CVPR 2024,
arXiv 2403.12350; authors' code nblt/F-SAM, utils.py).

Symbols: g_t = grad L(w) on the batch of step t; m an exponential moving average of past batch
gradients with decay lam, standing in for the full gradient E[g]; sigma the weight of its removal.
The full-gradient part of g harms SAM's perturbation, so F-SAM perturbs along the batch noise:

    ema_order="code" (authors' code, default): d = g_t - sigma m_{t-1}, then m_t = lam m_{t-1} + (1-lam) g_t;
        step 0: m_0 = g_0, d = g_0 (a plain SAM step)
    ema_order="paper" (Alg. 1): m_t = lam m_{t-1} + (1-lam) g_t (m_{-1} = 0), then d = g_t - sigma m_t
    e = rho unit(d);  g_adv = grad L(w + e);  restore w; base step with g_adv.       (2F 2B)

For sigma = 1 and the same m_{t-1} both orders give the same unit(d); for sigma != 1 they differ.
sigma = 0 is SAM. m is kept per parameter in the base's state ("fsam_ema"), of unscaled gradients
(under a GradScaler), and is updated only by steps taken (a skipped step leaves it untouched).

Authors' settings (run.sh): sigma 1, rho 0.2, lam 0.6, SGD lr 0.05, momentum 0.9, wd 1e-3, batch 128,
200 epochs cosine, CIFAR-100 ResNet-18 with cutout; BN statistics frozen on the perturbed pass
(``norm_stats="freeze", model=model``). Their class defaults lam to 0.9, their train.py to 0.95.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim import vector as vec
from samkit.optim.core import Batch, SharpnessAware, StepOutput, check_range
from samkit.optim.registry import register

EMA_ORDERS = ("code", "paper")
EMA = "fsam_ema"


@register("fsam", "friendly-sam", "friendlysam")
class FriendlySAM(SharpnessAware):
    """Friendly SAM: SAM perturbed along g - sigma m, m an EMA of past batch gradients.

    Args:
        rho: the ascent radius (default 0.05, pytorch_optimizer's; the authors' CIFAR-100 script
            uses 0.2); a param group may set its own.
        sigma: weight of the EMA's removal, >= 0 (default 1, the authors').
        lam: the EMA's decay, in [0, 1] (default 0.9, the authors' class default).
        ema_order: "code" (d uses the previous EMA; default) or "paper" (d uses the updated one).
        See :class:`samkit.optim.core.SharpnessAware` for the base, loss and policy arguments.
    """

    passes = "2F 2B"
    cost_refusals: dict[str, str] = {
        "ascent_subset": "its direction is the batch gradient minus an EMA of whole-batch gradients"
    }

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lam: float = 0.9,
        ema_order: str = "code",
        **kwargs: Any,
    ) -> None:
        if ema_order not in EMA_ORDERS:
            raise ValueError(f"ema_order must be one of {EMA_ORDERS}; got {ema_order!r}")
        self.sigma = check_range("sigma", sigma, 0.0)
        self.lam = check_range("lam", lam, 0.0, 1.0)
        self.ema_order = ema_order
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        if self._reusing("rho"):  # ascent_every: m moves only on ascent steps (the spec's note)
            return self._unified(batch, clean=None, perturbed=[(None, "rho")])
        params = self._params()
        (g,), out = self._pass(params, batch)
        idx = vec.present(g)
        if self.ascent_sync:
            self._average(vec.pick(g, idx))
        with torch.no_grad():
            gs = vec.pick(g, idx)  # g is not read again: d is built in its storage
            inverse = self._inverse_scale(gs[0]) if gs else 1.0
            if isinstance(inverse, Tensor):  # under an enabled GradScaler; else it is 1
                torch._foreach_mul_(gs, inverse)
            old = [self.state.get(params[i], {}).get(EMA) for i in idx]
            new: list[Tensor | None] = [None] * len(idx)
            have = [k for k, m in enumerate(old) if m is not None]
            if have:  # m = lam m + (1 - lam) g
                moved = torch._foreach_mul([old[k] for k in have], self.lam)
                torch._foreach_add_(moved, [gs[k] for k in have], alpha=1 - self.lam)
                for k, m in zip(have, moved, strict=True):
                    new[k] = m
            for k, m in enumerate(old):
                if m is None:  # the first step: m = g (the code) or (1 - lam) g (the paper)
                    new[k] = gs[k].clone() if self.ema_order == "code" else (1 - self.lam) * gs[k]
            removed = new if self.ema_order == "paper" else old
            sub = [k for k, m in enumerate(removed) if m is not None]
            if sub:  # d = g - sigma m
                torch._foreach_add_(
                    [gs[k] for k in sub], [removed[k] for k in sub], alpha=-self.sigma
                )
        d: list[Tensor | None] = [None] * len(params)
        for i, t in zip(idx, gs, strict=True):
            d[i] = t
        e = self._ascent(params, d, average=False, store="rho", consume=True)
        with self._perturbed(params, e):
            (g_adv,), _ = self._pass(params, batch)
        self._base_step(params, g_adv)
        if not self.last_step_skipped:
            for i, m in zip(idx, new, strict=True):
                self.state[params[i]][EMA] = m
        return out
