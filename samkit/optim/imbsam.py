"""ImbSAM (Zhou et al., ICCV 2023, arXiv 2308.07815): flatten only the tail classes.

min_w L_H(w) + kappa * max_{||e|| <= rho} L_T(w + e),     T = {c : n_c < eta},  H = the rest

forward at w; g_H = grad L_H(w); e = rho * unit(grad L_T(w)) (same graph);
g_T = grad kappa L_T(w + e) (whole batch forwarded, tail samples' loss);
base step with g_H + g_T at w.                                              (2F 3B)

L_H and L_T are sums over the batch's head and tail samples divided by the batch size B (the ImbSAM
authors' code), or, with average="group", means over the batch's head samples and over its tail
samples (the ImbSAM baseline of the SSE-SAM authors' code); a group absent from the batch contributes
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Batch, ClassAware, StepOutput, check_range
from samkit.optim.registry import register

AVERAGES = ("batch", "group")


@register("imbsam", "imb-sam")
class ImbSAM(ClassAware):
    """Imbalanced SAM: a plain gradient for head samples, a SAM gradient for tail samples.

    Args:
        class_counts: training-set count of each class (fixes the tail for the whole run).
        rho: the tail ascent radius (default 0.05).
        eta: tail threshold; a class is tail when its count is strictly below eta (default 20).
        kappa: weight of the tail loss; 1 in the paper and the authors' first release, 2 in the
            authors' current code (default 1).
        average: "batch" (default; the ImbSAM authors' code: each group's loss summed and divided
            by B) or "group" (the SSE-SAM authors' ImbSAM baseline: head loss averaged over the
            batch's head samples, tail loss over its tail samples; the batch is all micro-batches
            and, with ascent_sync, all processes). Under "group", a batch with no head (or no tail)
            sample gives that group a zero term, not NaN.

    The normalization statistics update on every pass by default (``norm_stats="update"``), as in
    both authors' codes.
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
        eta: float = 20,
        kappa: float = 1.0,
        average: str = "batch",
        **kwargs: Any,
    ) -> None:
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}; got {average!r}")
        self.average = average
        self.eta = check_range("eta", eta, 1.0)
        self.kappa = check_range("kappa", kappa, 0.0, low_open=True)
        super().__init__(params, base, class_counts, radii={"rho": rho}, **kwargs)
        self.tail = (self.class_counts < self.eta).double()

    def _update(self, batch: Batch) -> StepOutput:
        like = self._params()[0]
        tail = self._table("tail", self.tail, like)
        head = self._table("head", lambda: 1 - tail, like)
        if self.average == "group":
            head, tail = self._group_means(batch, head, tail)
            tail = self.kappa * tail
        elif self.kappa != 1.0:
            tail = self._table(f"{self.kappa} tail", lambda: self.kappa * tail, like)
        return self._unified(batch, clean=head, perturbed=[(tail, "rho")])

    def _group_means(self, batch: Batch, *groups: Tensor) -> list[Tensor]:
        """Rescale each group's per-class coefficients (0/1 tables) from 1/B to 1/n_group, n_group
        the group's samples in the whole batch (all micro-batches; with ascent_sync, all processes,
        otherwise each process's own step), on the device without a host sync; an absent group
        keeps zero coefficients."""
        y = torch.cat(batch.labels)
        counts = torch.stack([g[y].sum() for g in groups])
        world = self._world() if self.ascent_sync else 1
        if self.ascent_sync:
            self._average([counts])  # the mean count per process: times world is the global one
        scale = batch.size * world / (counts * world).clamp(min=1)
        return [g * scale[i] for i, g in enumerate(groups)]
