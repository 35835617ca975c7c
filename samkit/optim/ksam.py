"""K-SAM (Ni, Chiang, Geiping, Goldblum, Wilson, Goldstein, "K-SAM: Sharpness-Aware Minimization at
the Speed of SGD", arXiv 2210.12864; no public code found).

Symbols: B the batch size, l_b the loss of sample b, k the number of samples that SAM sees, S the k
samples of highest loss at w. Both SAM gradients use only S:

    1. l_b(w) for all B samples: one forward, no gradient, in train mode  [samkit]
    2. S = top-k of l_b
    3. e = rho unit(grad (1/k) sum_{b in S} l_b(w))
    4. g_p = grad (1/k) sum_{b in S} l_b(w + e);  restore w; base step with g_p.
    Passes: F_B (no grad) + 2 F_k + 2 B_k, i.e. 1 + 6k/B units (SGD 3, SAM 6).

The mean is over k: K-SAM is SAM on the sub-batch S. ``graph=True`` [samkit] keeps the ranking
forward's graph and backpropagates the top-k mean through it instead of re-forwarding S for step 3
(F_B + B_B + F_k + B_k). The paper's k could not be checked (only its abstract was reachable);
samkit's default is k = B/4. Normalization running statistics are updated by the ranking pass only
[samkit] (the passes on S would otherwise see k-sample statistics): this needs ``model=``. With
noisy labels, top-k favours the mislabelled samples.

Closures. A closure that takes an ``index`` argument, ``lambda index=None: model(x if index is None
else x[index])``, lets the passes on S forward only those samples: the saving K-SAM is for. A
closure without it is evaluated on the whole batch and the rows of S are kept (the same step
without BN; no saving). Under torch.distributed with ``ascent_sync=True`` S is the top k of the
global batch (the processes' batches must have equal sizes); with ``ascent_sync=False`` each process
takes its own top k (k from its own batch).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from samkit.optim.core import (
    Batch,
    Grads,
    SharpnessAware,
    StepOutput,
    _norm_buffers,
    check_range,
    takes_index,
)
from samkit.optim.registry import register


@register("ksam", "k-sam")
class KSAM(SharpnessAware):
    """SAM on the k highest-loss samples of each batch.

    Args:
        rho: the ascent radius (default 0.05, SAM's [samkit]); a param group may set its own.
        k: samples per step (default: ``fraction`` of the batch).
        fraction: k = max(1, floor(fraction * B)) when k is not given (default 0.25, samkit's).
        graph: take the ascent gradient through the ranking forward's graph (see above).
        model: the model, so that only the ranking pass updates normalization statistics.
        See :class:`samkit.optim.core.SharpnessAware` for the base, loss and policy arguments.

    ``step(closure, labels)`` returns the mean loss and the logits of the ranking pass (all B).
    """

    passes = "1F (no grad) + 2F 2B on k of B samples"
    cost_refusals: dict[str, str] = {
        "ascent_every": "K-SAM ranks the batch at w and ascends on its top k every step",
        "ascent_subset": "K-SAM already ascends on a sub-batch: set its k or fraction",
    }
    needs_labels = True

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        k: int | None = None,
        fraction: float = 0.25,
        graph: bool = False,
        **kwargs: Any,
    ) -> None:
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"k must be an integer >= 1 (samples per step) or None; got {k!r}")
        self.k = k
        self.fraction = check_range("fraction", fraction, 0.0, 1.0, low_open=True)
        self.graph = bool(graph)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def top_k(self, size: int) -> int:
        """k for a batch of `size` samples."""
        k = self.k if self.k is not None else max(1, math.floor(self.fraction * size))
        if k > size:
            raise ValueError(f"k = {k} exceeds the batch of {size} samples: lower k")
        return k

    @contextlib.contextmanager
    def _frozen_stats(self) -> Iterator[None]:
        """Restore the model's normalization running statistics after the body."""
        stats = _norm_buffers(self.model)
        saved = self._scratch_like("ksam_stats", stats)
        if stats:
            torch._foreach_copy_(saved, stats)
        try:
            yield
        finally:
            if stats:
                with torch.no_grad():
                    torch._foreach_copy_(stats, saved)

    def _rank(self, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        """The ranking forward over every micro-batch: (per-sample losses, logits)."""
        losses, logits = [], []
        for closure, labels in zip(batch.closures, batch.labels or [], strict=True):
            z, loss = self._forward(closure, labels, grad=self.graph)
            losses.append(loss)
            logits.append(z.detach())
        return losses, logits

    def _select(self, scores: Tensor) -> tuple[Tensor, Tensor, float]:
        """(membership mask of this process's samples, top-k indices or empty, loss weight)."""
        world = self._world()
        if world > 1 and self.ascent_sync:
            k = self.top_k(scores.numel() * world)
            everyone = torch.empty(world * scores.numel(), dtype=scores.dtype, device=scores.device)
            dist.all_gather_into_tensor(everyone, scores.contiguous(), group=self.process_group)
            chosen = torch.topk(everyone, k).indices
            mask = torch.zeros_like(everyone, dtype=torch.bool).index_fill_(0, chosen, True)
            rank = dist.get_rank(self.process_group)
            n = scores.numel()
            # each process weighs its share by world / k: the average over processes is (1/k) sum_S
            return mask[rank * n : (rank + 1) * n], chosen[:0], world / k
        k = self.top_k(scores.numel())
        chosen = torch.topk(scores, k).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, chosen, True)
        return mask, chosen, 1.0 / k

    def _subset_pass(
        self, params: list[Tensor], batch: Batch, mask: Tensor, chosen: Tensor, weight: float
    ) -> Grads:
        """grad of weight * sum_{b in S} l_b at the current weights, over every micro-batch."""
        grads: Grads = [None] * len(params)
        start, passes = 0, 0
        for closure, labels in zip(batch.closures, batch.labels or [], strict=True):
            n = labels.shape[0]
            part = mask[start : start + n]
            start += n
            if takes_index(closure):
                # one micro-batch on one process: the top-k indices, without a host sync
                one = len(batch.closures) == 1 and chosen.numel()
                index = chosen if one else part.nonzero()[:, 0]
                if not index.numel():
                    last = passes == 0 and start == batch.size and self._world() > 1
                    if not last:
                        continue
                    # no sample of S here: a zero-weighted pass on one sample gives this
                    # process zero gradients of the shape the others average with
                    index, part = index.new_zeros(1), part.new_zeros(1)
                sub = lambda c=closure, i=index: c(index=i)  # noqa: E731
                if one:  # every sample forwarded is in S
                    total = self._summed_loss(sub, labels[index])
                else:
                    _, losses = self._forward(sub, labels[index])
                    total = (losses * part[index]).sum()
                grads = self._backward(total * weight, params, into=grads)
            else:
                _, losses = self._forward(closure, labels)
                grads = self._backward((losses * part).sum() * weight, params, into=grads)
            passes += 1
        return grads

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        params = self._params()
        self.top_k(batch.size)  # a k above the batch is refused before any pass
        losses, logits = self._rank(batch)
        scores = torch.cat([x.detach() for x in losses]) if len(losses) > 1 else losses[0].detach()
        mask, chosen, weight = self._select(scores)
        with self._frozen_stats():
            if self.graph:
                parts = mask.split([len(x) for x in losses])
                total = sum((x * m).sum() for x, m in zip(losses, parts, strict=True))
                g = self._backward(total * weight, params)
            else:
                g = self._subset_pass(params, batch, mask, chosen, weight)
            with self._perturbed(params, self._ascent(params, g, consume=True)):
                g_p = self._subset_pass(params, batch, mask, chosen, weight)
        self._base_step(params, g_p)
        full = torch.cat(logits) if len(logits) > 1 else logits[0]
        return StepOutput(scores.sum() / batch.size, full)
