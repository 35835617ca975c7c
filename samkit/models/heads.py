"""Classifier heads: the last layer of every samkit model, mapping features to logits.

Every samkit model keeps its classifier in one attribute, ``model.head``, and calls it exactly once per
forward, on the final features, with nothing after it. Optimizers that perturb only the classifier
(CC-SAM, Zhou et al., CVPR 2023) rely on this: they re-evaluate ``model.head`` on the features it
received, so the head must be the whole map from features to logits.

Two kinds are provided:

* ``"linear"``: a plain :class:`torch.nn.Linear` (weights and bias).
* ``"normed"``: :class:`NormedLinear`, the cosine classifier of LDAM (Cao et al., NeurIPS 2019,
  "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss"): the logit of class ``c`` is
  the cosine between the feature vector and the class weight vector, so it lies in ``[-1, 1]``; the LDAM
  loss multiplies it by a scale ``s`` (30 in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEAD_KINDS", "NormedLinear", "make_head"]

#: The head kinds accepted by :func:`make_head` and by every model's ``head=`` argument.
HEAD_KINDS: tuple[str, ...] = ("linear", "normed")


class NormedLinear(nn.Module):
    """Cosine classifier: ``logits = normalize(x, dim=1) @ normalize(W, dim=0)``.

    The weight has shape ``(in_features, out_features)`` (one column per class, transposed with respect
    to :class:`torch.nn.Linear`), as in LDAM's code. It is initialised uniformly in ``(-1, 1)`` and each
    column is then rescaled to norm at most 1 (``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)``); only
    the direction matters for the output, but the scale interacts with the learning rate and weight decay,
    so it is kept as in the LDAM-DRW protocol. There is no bias. Outputs lie in ``[-1, 1]``.

    Args:
        in_features: size of each input feature vector.
        out_features: number of classes.
        eps: lower bound on the norms in the normalisation (avoids division by zero for a zero feature).
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-12) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"NormedLinear needs in_features >= 1 and out_features >= 1, "
                f"got {in_features} and {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in (-1, 1), then every class column rescaled to norm <= 1 (LDAM's init)."""
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each row of ``x`` (shape ``(B, in_features)``) with each class column."""
        return F.normalize(x, dim=1, eps=self.eps) @ F.normalize(self.weight, dim=0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    """Build a classifier head of the given kind.

    Args:
        kind: ``"linear"`` (:class:`torch.nn.Linear` with bias) or ``"normed"`` (:class:`NormedLinear`).
        in_features: size of the feature vector the model feeds to the head.
        num_classes: number of outputs (logits).

    Raises:
        ValueError: for an unknown kind or a non-positive size.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "normed":
        return NormedLinear(in_features, num_classes)
    raise ValueError(f"unknown head kind {kind!r}; valid kinds: {', '.join(HEAD_KINDS)}")


class Classifier(nn.Module):
    """A network laid out as body -> features -> head, the layout every samkit model shares.

    ``head`` is the only classifier and runs last, once per forward (CC-SAM's classifier form
    perturbs it and re-evaluates it on the features it received). Subclasses set ``body`` and
    ``head``, or override :meth:`features`.
    """

    body: nn.Module
    head: nn.Module

    def _assemble(self, layers: list[nn.Module], feature_dim: int, num_classes: int,
                  head: str) -> None:
        """Set the body from `layers` and the head on its `feature_dim` outputs."""
        self.body = nn.Sequential(*layers)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = make_head(head, feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, feature_dim)`` features that the head receives."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
