"""CC-SAM (Zhou et al., CVPR 2023): class-conditional perturbations with PAC-Bayes radii.

Each class c gets its own perturbation of the parameters W, with a radius that grows for rare classes:

    rho_c = sqrt(||W|| / (2 ||g_c||)) * k^(-1/4) * (n_c - 1)^(-1/4),
    e_c   = s * sqrt(k) * rho_c * unit(g_c),
    loss  = (1 - beta) L(w) + beta (1/B) sum_c sum_{b in c} l_b(w + e_c),

g_c the gradient of class c's loss, n_c class c's training count, k the number of perturbed
parameters and s a global scale (the authors' "noise_ratio"). Two forms:

- "classifier" (the authors' code): W is the classifier only, re-evaluated for every class on the
  unperturbed features of the clean pass; all classes at once, no host sync: about 1F 1B. Two
  variants:
  "authors" (default; the authors' released code, train_cifar.py): g_c is the gradient of the
  class-MEAN loss (1/m_c) sum_{b in c} l_b over the batch's m_c samples of class c, and each head
  tensor t (weight, bias) is perturbed on its own: rho_{c,t} from that tensor's ||W_t|| and
  ||g_{c,t}|| (k stays the whole head's size), e_{c,t} = s sqrt(k) rho_{c,t} g_{c,t} / ||g_{c,t}||;
  "joint" (samkit's form before 0.x, the formula above read literally): g_c from (1/B) sum_{b in c}
  l_b, one unit() over the whole head. A tuned s does not carry over between the two.
- "full" (samkit's extension, not in the authors' code): W is every parameter, g_c from
  (1/B) sum_{b in c} l_b, one unit() over all parameters; one extra forward and two backwards per
  class present in the batch, (1 + P)F (1 + 2P)B; finding the P classes present costs one host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from samkit.optim.core import EPS, Batch, ClassAware, Grads, StepOutput, _global_norm, check_range
from samkit.optim.registry import register

FORMS = ("classifier", "full")
VARIANTS = ("authors", "joint")


@register("ccsam", "cc-sam")
class CCSAM(ClassAware):
    """Class-conditional SAM.

    Args:
        class_counts: training-set count of each class; every class needs at least 2 samples.
        head: the classifier module (e.g. ``model.head``) for ``form="classifier"``; it must be
            called once per forward, on the final features, and its parameters optimized here.
        s: the global scale of the perturbations, >= 0. The authors' released configs use 1e-6,
            which makes e negligible (the default here, so the method is as released); treat s as
            the radius to tune. rho_c grows as ||g_c||^(-1/2), so a class whose gradient nearly
            vanishes gets a large perturbation: on Fashion-MNIST-LT with the small CNN, s = 0.01
            collapsed training to the head class and s = 1e-4 trained well.
        beta: weight of the perturbed loss in [0, 1] (0.3 on CIFAR-10, 0.5 on CIFAR-100).
        form: "classifier" (default, the authors' code) or "full" (samkit's extension).
        variant: the classifier form's class gradient and normalisation: "authors" (default, the
            authors' released code: class-mean loss, weight and bias normalised separately) or
            "joint" (samkit's earlier form: class loss over B, one norm over the whole head).

    The normalization statistics update on every pass by default (``norm_stats="update"``); the
    classifier form forwards the body once per step, as the authors' code does.
    """

    passes = "~1F 1B (classifier); (1+P)F (1+2P)B (full, P classes in the batch)"
    cost_refusals: dict[str, str] = {
        "ascent_every": "CC-SAM perturbs per class, with no shared ascent to reuse",
        "ascent_subset": "CC-SAM perturbs per class, with no shared ascent to take on a sub-batch",
    }

    radius_keys = ()

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        class_counts: Sequence[int] | Tensor | None = None,
        head: nn.Module | None = None,
        s: float = 1e-6,
        beta: float = 0.5,
        form: str = "classifier",
        variant: str = "authors",
        **kwargs: Any,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}; got {form!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        self.form = form
        self.variant = variant
        self.s = check_range("s", s, 0.0)
        self.beta = check_range("beta", beta, 0.0, 1.0)
        super().__init__(params, base, class_counts, radii={}, **kwargs)
        if bool((self.class_counts < 2).any()):
            raise ValueError(
                "CCSAM's radius has the factor (n_c - 1)^(-1/4): every class needs at least 2 "
                f"training samples; class_counts has {self.class_counts.min():.0f}"
            )
        self.count_factor = (self.class_counts - 1) ** -0.25
        self.head = head
        self._grab = _FeatureGrab()
        if form == "classifier":
            if head is None:
                raise ValueError(
                    "CCSAM(form='classifier') needs head=model.head, the classifier module it "
                    "perturbs; or use form='full' to perturb every parameter"
                )
            ours = {id(p) for p in self._params()}
            if not any(p.requires_grad for p in head.parameters()) or any(
                id(p) not in ours for p in head.parameters() if p.requires_grad
            ):
                raise ValueError(
                    "head's trainable parameters must be among the optimizer's parameters"
                )
            head.register_forward_pre_hook(self._grab)

    def _update(self, batch: Batch) -> StepOutput:
        if self.form == "classifier":
            return self._step_classifier(batch)
        return self._step_full(batch)

    def _radius(self, w_norm: Tensor, g_norm: Tensor, k: int, n_factor: Tensor) -> Tensor:
        """s * sqrt(k) * rho_c: the length of e_c (of each of its tensors in the authors' variant)."""
        rho_c = torch.sqrt(w_norm / (2 * (g_norm + EPS))) * k**-0.25 * n_factor
        return self.s * math.sqrt(k) * rho_c

    def _head_forward(
        self, closure: Callable[[], Tensor], labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Forward a micro-batch, capturing the head's input: (features, logits, losses)."""
        self._grab.on = True
        try:
            logits, losses = self._forward(closure, labels)
        finally:
            self._grab.on = False
        features, self._grab.features = self._grab.features, None
        if features is None:
            raise RuntimeError(
                "the closure's forward did not call the head given to CCSAM (under torch.compile, "
                "create CCSAM before the compiled model's first call: a hook added later is not "
                "traced)"
            )
        return features, logits, losses

    def _step_classifier(self, batch: Batch) -> StepOutput:
        params = self._params()
        names, weights = zip(
            *[(n, p) for n, p in self.head.named_parameters() if p.requires_grad], strict=True
        )
        num_classes, size = self.num_classes, batch.size
        micro = list(zip(batch.closures, batch.labels, strict=True))
        # the class losses' divisor: m_c, class c's samples in the whole batch (all micro-batches;
        # with ascent_sync, over processes, whose gradients are averaged: hence the factor world)
        # or B
        device = batch.labels[0].device
        if self.variant == "authors":
            m = torch.zeros(num_classes, device=device)
            for labels in batch.labels:
                m.index_add_(0, labels, torch.ones_like(labels, dtype=m.dtype))
            world = self._world() if self.ascent_sync else 1
            if self.ascent_sync:
                self._average([m])
            numer, denom = world, (m * world).clamp(min=1)[:, None]
        else:
            numer, denom = 1, torch.full((num_classes, 1), float(size), device=device)
        # g_c for every class at once: one batched backward through the head per micro-batch. With
        # one micro-batch its graph is kept for the descent; with several, each is forwarded again.
        g: list[Tensor] | None = None
        acc: Grads = [None] * len(params)
        kept, loss_sum, all_logits = None, 0.0, []
        for closure, labels in micro:
            features, logits, losses = self._head_forward(closure, labels)
            one_hot = F.one_hot(labels, num_classes).to(losses.dtype).T
            select = one_hot * numer / denom.to(losses.dtype)  # (C, B)
            if self.grad_scaler is not None:
                select = self.grad_scaler.scale(select)
            g_i = self._class_grads(features, labels, select, names, weights)
            g = list(g_i) if g is None else torch._foreach_add(g, g_i)
            clean = (1 - self.beta) * losses.sum() / size
            if len(micro) == 1:
                kept = (features, labels, clean)
            else:
                acc = self._backward(clean, params, into=acc)
            loss_sum = loss_sum + losses.detach().sum()
            all_logits.append(logits.detach())
        with torch.no_grad():
            if self.ascent_sync:
                self._average(g)
            inverse = self._inverse_scale(g[0])
            squares = [x.reshape(num_classes, -1).square().sum(1) for x in g]  # (C,) per tensor
            g_norm = torch.stack(squares).sum(0).sqrt() * inverse
            k = sum(w.numel() for w in weights)
            n_factor = self._table("n", self.count_factor, g_norm)
            if self.variant == "authors":  # each tensor: its own radius and its own unit()
                norms = [q.sqrt() * inverse for q in squares]
                radii = [self._radius(w.norm(), n, k, n_factor)
                         for w, n in zip(weights, norms, strict=True)]
            else:
                norms = [g_norm] * len(g)
                radii = [self._radius(_global_norm(weights), g_norm, k, n_factor)] * len(g)
            e = [
                (radius * inverse / (n + EPS)).view(-1, *[1] * w.dim()) * x
                for w, x, n, radius in zip(weights, g, norms, radii, strict=True)
            ]

        for closure, labels in micro:
            if kept is not None:
                features, labels, clean = kept
            else:
                features, _, _ = self._head_forward(closure, labels)
                clean = 0.0
            z = self._perturbed_logits(features, labels, names, weights, e)
            loss = clean + self.beta * self.loss_fn(z, labels).sum() / size
            acc = self._backward(loss, params, into=acc)
        self._base_step(params, acc)
        return StepOutput(loss_sum / size, torch.cat(all_logits))

    def _linear_head(self) -> bool:
        """A plain nn.Linear head: its class gradients and perturbed logits have closed forms."""
        return type(self.head) is nn.Linear

    def _class_grads(
        self,
        features: Tensor,
        labels: Tensor,
        select: Tensor,
        names: Sequence[str],
        weights: Sequence[Tensor],
    ) -> tuple[Tensor, ...]:
        """For every class c at once, the gradient of sum_b select[c, b] l_b with respect to each
        of the head's weights, stacked over the classes: (C, *weight.shape).

        Through the head alone, re-applied to the features (so never through the model's graph,
        which torch.compile may have built). For nn.Linear, z_b = W f_b + b gives it as
        sum_b select[c, b] dl_b/dz_b f_b^T: two matrix products from the per-sample logit
        gradients; any other head, by a batched backward."""
        f = features.detach()
        if not self._linear_head():
            with torch.enable_grad():
                head_losses = self.loss_fn(self.head(f), labels)
            return torch.autograd.grad(
                head_losses, weights, grad_outputs=select, is_grads_batched=True
            )
        with torch.enable_grad():
            z = self.head(f).detach().requires_grad_()
            (dz,) = torch.autograd.grad(self.loss_fn(z, labels).sum(), z)
        weighted = select[:, :, None] * dz  # (C, B, K)
        grads = {}
        if "weight" in names:
            grads["weight"] = weighted.transpose(1, 2) @ f.to(weighted.dtype)
        if "bias" in names:
            grads["bias"] = select.to(dz.dtype) @ dz
        return tuple(grads[n] for n in names)

    def _perturbed_logits(
        self,
        features: Tensor,
        labels: Tensor,
        names: Sequence[str],
        weights: Sequence[Tensor],
        e: Sequence[Tensor],
    ) -> Tensor:
        """z_b = head_{w + e_(y_b)}(f_b): every sample's logits under its own class's perturbed
        head, differentiable in the weights and the features."""
        rows = torch.arange(labels.shape[0], device=labels.device)
        if self._linear_head():
            # (W + E_y) f + (b + e_y) = head(f) + E_y f + e_y; E_c f for every class in one product
            by = dict(zip(names, e, strict=True))
            z = self.head(features)
            if "weight" in by:
                ew = by["weight"]
                c, k, d = ew.shape
                extra = features @ ew.reshape(c * k, d).to(features.dtype).T  # (B, C K)
                z = z + extra.view(-1, c, k)[rows, labels]
            if "bias" in by:
                z = z + by["bias"][labels]
            return z

        def head_at(*ws: Tensor) -> Tensor:
            return functional_call(self.head, dict(zip(names, ws, strict=True)), (features,))

        perturbed = [w.unsqueeze(0) + x for w, x in zip(weights, e, strict=True)]  # (C, ...)
        return vmap(head_at)(*perturbed)[labels, rows]

    def _step_full(self, batch: Batch) -> StepOutput:
        params = self._params()
        present = torch.zeros(self.num_classes, device=batch.labels[0].device)
        for labels in batch.labels:
            present.index_fill_(0, labels, 1.0)
        if self.ascent_sync:
            self._average([present])
        classes = (
            present.nonzero().flatten().tolist()
        )  # the one host sync: a pass per class present
        grads, out = self._pass(
            params,
            batch,
            lambda z, losses, y: (
                [(1 - self.beta) * losses] + [(y == c).to(losses.dtype) * losses for c in classes]
            ),
        )
        with torch.no_grad():
            w_norm = _global_norm(params)
            k = sum(p.numel() for p in params)
            n_factor = self._table("n", self.count_factor, w_norm)
        parts = grads[:1]
        for c, g in zip(classes, grads[1:], strict=True):
            if self.ascent_sync:
                self._average([x for x in g if x is not None])
            inverse = self._inverse_scale(w_norm)
            g_norm = _global_norm([x for x in g if x is not None]) * inverse
            scale = self._radius(w_norm, g_norm, k, n_factor[c]) / (g_norm + EPS) * inverse
            e = self._ascent(params, g, radius=None, scale=scale, average=False)
            with self._perturbed(params, e):
                (g_c,), _ = self._pass(
                    params,
                    batch,
                    lambda z, losses, y, c=c: [self.beta * (y == c).to(losses.dtype) * losses],
                )
            parts.append(g_c)
        self._base_step(params, *parts)
        return out


class _FeatureGrab:
    """A forward pre-hook on the head that keeps its input while `on` (a plain object, so that
    torch.compile traces the hook into the model's graph)."""

    def __init__(self) -> None:
        self.on = False
        self.features: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.on:
            self.features = args[0]
