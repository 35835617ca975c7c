"""Whole-vector arithmetic on per-parameter gradient lists, for the methods that combine gradients
(GSAM, LookSAM, Bilateral SAM, Friendly-SAM, Momentum-SAM).

The papers write their decompositions on the whole parameter vector (<g, g_p>, ||g||), not per
tensor; these helpers keep that reading in one place. Norms and inner products stay 0-d tensors in
float32 at least, so no value is read on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.optim.core import Grads, _global_norm


def present(*lists: Grads) -> list[int]:
    """The indices where every list holds a tensor (a parameter that got all the gradients)."""
    return [i for i in range(len(lists[0])) if all(gs[i] is not None for gs in lists)]


def pick(grads: Grads, idx: Sequence[int]) -> list[Tensor]:
    """The tensors of `grads` at `idx` (all present)."""
    return [grads[i] for i in idx]  # type: ignore[misc]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """<a, b> over all tensors, as a 0-d tensor in float32 at least."""
    if not a:
        return torch.zeros(())
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    return torch.stack(
        [torch.sum(x.to(dtype) * y.to(dtype)) for x, y in zip(a, b, strict=True)]
    ).sum()


def norm(tensors: Sequence[Tensor]) -> Tensor:
    """||t||_2 over all tensors, as a 0-d tensor in float32 at least."""
    return _global_norm(tensors)


def group_members(param_groups: list[dict[str, Any]]) -> list[tuple[dict[str, Any], range]]:
    """Each param group with the positions of its trainable parameters in the optimizer's flat
    parameter list (the order of `SharpnessAware._params`)."""
    out = []
    start = 0
    for group in param_groups:
        n = sum(1 for p in group["params"] if p.requires_grad)
        out.append((group, range(start, start + n)))
        start += n
    return out
