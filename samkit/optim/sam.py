"""SAM (Foret et al., ICLR 2021, arXiv 2010.01412) and ASAM (Kwon et al., ICML 2021, arXiv 2102.11600).

    e = rho * unit(grad L(w));  g = grad L(w + e);  base step with g at w.        (2F 2B)

ASAM makes the ascent scale-invariant: e = rho * T_w^2 g / ||T_w g||, T_w = |w| + eta.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Batch, SharpnessAware, StepOutput
from samkit.optim.registry import register


@register("sam")
class SAM(SharpnessAware):
    """Sharpness-Aware Minimization: min_w max_{||e|| <= rho} L(w + e).

    Follows the paper (Foret et al.) and the popular PyTorch SAM (davda54/sam): e = rho g / (||g|| +
    1e-12) over all parameters. Its BN bypass (running statistics only from the pass at w) is
    ``norm_stats="freeze", model=model``; the default ``"update"`` lets both passes update them.

    Args:
        rho: the ascent radius (default 0.05); a param group may set its own.
        See :class:`samkit.optim.core.SharpnessAware` for the base, loss and policy arguments.

    ``step(closure, labels)`` with a closure returning logits returns ``(loss, logits)``;
    ``step(closure)`` with a torch-style closure (forward, backward, return loss) returns the loss.
    """

    passes = "2F 2B"
    cost_refusals: dict[str, str] = {}

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        return self._unified(batch, clean=None, perturbed=[(None, "rho")])


@register("asam")
class ASAM(SAM):
    """Adaptive SAM: SAM with the scale-invariant ascent e = rho T_w^2 g / ||T_w g||.

    Which parameters are scaled: given named parameters (``ASAM(model.named_parameters(), ...)``, as
    ``samkit train`` does), only those whose name contains "weight" get T_w = |w| + eta; every other
    one (biases) has T = 1 in the norm and in the perturbation: the ASAM authors' code
    (SamsungLabs/ASAM). Given unnamed parameters (``model.parameters()``) every parameter is scaled:
    the popular PyTorch SAM's ``adaptive=True``. A param group with ``"adaptive": False`` keeps the
    plain SAM ascent for its parameters.

    Args:
        rho: the radius, about 10x SAM's (0.5 to 2.0 in the paper; default 0.5).
        eta: the offset in T_w = |w| + eta. Default 0.01, the ASAM authors' class default; note that
            their CIFAR example script runs with eta 0.0 (pass ``eta=0.0`` to match it).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.5,
        eta: float = 0.01,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("adaptive", True)
        super().__init__(params, base, rho=rho, asam_eta=eta, **kwargs)
