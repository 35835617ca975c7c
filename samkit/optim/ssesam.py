"""SSE-SAM (Lyu et al., AAAI 2025, arXiv 2412.13715): stage-wise saddle escape for head, then tail.

Head/tail split as in ImbSAM (T = {c : n_c < eta}), each group with its own perturbation:

    stage I  (epoch < gamma * total_epochs):
        g = grad L_H(w + e_H) + grad L_T(w + e_T),
        e_H = rho_head * unit(grad L_H(w)),  e_T = rho_tail * unit(grad L_T(w))   (3F 4B: one shared
                                                                                   forward at w)
    stage II: rho_H = 0, i.e. exactly ImbSAM with radius rho_tail                 (2F 3B)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Batch, ClassAware, StepOutput, check_range
from samkit.optim.registry import register


@register("ssesam", "sse-sam")
class SSESAM(ClassAware):
    """SSE-SAM: SAM on head and tail separately in stage I, ImbSAM in stage II.

    Args:
        class_counts: training-set count of each class.
        total_epochs: the length of training, which places the switch.
        rho_head: head radius in stage I (default 0.05).
        rho_tail: tail radius (default 0.10).
        gamma: the switch fraction, strictly in (0, 1) (default 0.7).
        eta: tail threshold, count strictly below eta (default 100, the authors' CIFAR-100-LT value).

    Call ``set_epoch(epoch)`` (0-based) at the start of each epoch; the epoch is saved in the state.

    The weights follow the authors' code. Its passes do not: the authors' stage I forwards the batch
    four times (one of them a redundant pass at w) and their stage II once more than needed;
    samkit forwards 3 times, then 2. Under ``norm_stats="update"`` (the default, as in their code)
    every forward updates the running statistics, so samkit's saved passes also change how often
    they update, and the statistics differ from the authors' (the weights do not).
    Under ``norm_stats="freeze"`` only samkit's one pass at w per step updates them.
    """

    cost_refusals: dict[str, str] = {}
    passes = "3F 4B, then 2F 3B"

    radius_keys = ("rho_head", "rho_tail")

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        class_counts: Sequence[int] | Tensor | None = None,
        total_epochs: int | None = None,
        rho_head: float = 0.05,
        rho_tail: float = 0.10,
        gamma: float = 0.7,
        eta: float = 100,
        **kwargs: Any,
    ) -> None:
        if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(
                "SSESAM needs total_epochs, the number of training epochs (an integer >= 1) that "
                f"places the stage switch; got {total_epochs!r}"
            )
        self.total_epochs = total_epochs
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, low_open=True, high_open=True)
        self.eta = check_range("eta", eta, 1.0)
        self.epoch = 0
        super().__init__(
            params, base, class_counts, radii={"rho_head": rho_head, "rho_tail": rho_tail}, **kwargs
        )
        self.tail = (self.class_counts < self.eta).double()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def stage(self) -> int:
        """1 while the head is perturbed too, 2 after the switch."""
        return 1 if self.epoch < self.gamma * self.total_epochs else 2

    def extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))

    def _update(self, batch: Batch) -> StepOutput:
        like = self._params()[0]
        tail = self._table("tail", self.tail, like)
        head = self._table("head", lambda: 1 - tail, like)
        if self.stage == 1:
            return self._unified(
                batch, clean=None, perturbed=[(head, "rho_head"), (tail, "rho_tail")]
            )
        return self._unified(batch, clean=head, perturbed=[(tail, "rho_tail")])
