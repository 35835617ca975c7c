"""BiSAM (Xie et al., ICML 2024, arXiv 2407.12993): the ascent raises a lower bound of the 0-1 loss.

With margins F_j = f_j(x) - f_y(x) (so F_y = 0), the ascent loss of a sample is

    Q = (1/mu) log sum_{j=1..K} exp(mu * phi(F_j)),
    phi(x) = 1 - softplus(gamma0 - x), gamma0 = log(e - 1)   ("log": phi(0) = 0), or
    phi(x) = tanh(alpha * x)                                 ("tanh"),

and Q - log(K)/mu <= the 0-1 loss. e = rho * unit(grad mean Q(w)); the descent keeps an upper-bound
loss: g = grad L(w + e); base step at w.                                          (2F 2B)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from samkit.optim.core import Batch, SharpnessAware, StepOutput, check_range
from samkit.optim.registry import register

BOUNDS = ("log", "tanh")
GAMMA0 = math.log(math.e - 1)


def lower_bound(
    logits: Tensor, labels: Tensor, bound: str = "log", mu: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """BiSAM's per-sample ascent loss Q (computed in float32 at least, also under autocast)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    margins = z - z.gather(1, labels[:, None])
    if bound == "log":
        phi = 1 - F.softplus(GAMMA0 - margins)
    else:
        phi = torch.tanh(alpha * margins)
    return torch.logsumexp(mu * phi, dim=1) / mu


def _ascent_term(logits: Tensor, labels: Tensor, bound: str, mu: float, alpha: float) -> Tensor:
    """mu Q - c (c = mu for "log", 0 for "tanh"): the ascent direction of Q (unit() drops the scale
    mu, the gradient the constant) in fewer operations, from mu phi(x) = mu + mu log sigmoid(x -
    gamma0) for "log"; its ranking of samples (ascent_subset_mode="topk") is Q's."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = z.gather(1, labels[:, None])
    if bound == "log":
        s = F.logsigmoid(z - (target + GAMMA0))
    else:
        s = torch.tanh(alpha * (z - target))
    return torch.logsumexp(s if mu == 1 else mu * s, dim=1)


@register("bisam", "bi-sam")
class BiSAM(SharpnessAware):
    """Bilevel SAM: ascent on a lower bound of the 0-1 loss, descent on the usual (upper-bound) loss.

    Args:
        rho: the ascent radius (default 0.05).
        bound: "log" (phi = 1 - softplus(gamma0 - x), default, the paper's and the authors'
            script's) or "tanh" (phi = tanh(alpha x), the paper's other bound).
        mu: the log-sum-exp sharpness (default 1, the authors' script), > 0.
        alpha: the tanh slope (default 0.1), > 0.

    The descent loss is ``loss_fn`` (default: cross-entropy, samkit's common default). The authors'
    code descends on a smoothed cross-entropy with 1 - s on the target and s / (K - 1) on each other
    class, s = 0.1: pass ``loss_fn=samkit.losses.SmoothedCrossEntropy(0.1)`` (recipes:
    ``loss.name=bisam-ce``). torch's ``label_smoothing=0.1`` (``CrossEntropy(label_smoothing=0.1)``)
    is a different loss: it puts s / K on every class. The authors' code keeps the perturbed pass
    out of the normalization statistics: ``norm_stats="freeze", model=model``.
    """

    passes = "2F 2B"
    cost_refusals: dict[str, str] = {}

    needs_labels = True

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        bound: str = "log",
        mu: float = 1.0,
        alpha: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}; got {bound!r}")
        self.bound = bound
        self.mu = check_range("mu", mu, 0.0, low_open=True)
        self.alpha = check_range("alpha", alpha, 0.0, low_open=True)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        return self._unified(
            batch,
            clean=None,
            perturbed=[(None, "rho")],
            ascent=lambda z, _, y: [_ascent_term(z, y, self.bound, self.mu, self.alpha)],
        )
