"""Momentum-SAM (Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", arXiv 2401.12033; authors' code MarlonBecker/MSAM, optimizer/msam.py and
optimizer/adamW_msam.py).

Symbols: v the base optimizer's momentum (SGD's buffer, v <- mu v + g, w <- w - lr v; Adam(W)'s first
moment m, bias correction aside), rho the radius, s the scalar that moved the model: the perturbed
point is w~ = w - s v with s = rho / (||v|| + 1e-12), along -v (the authors' "momentum ascent"). The
model HOLDS w~ between steps. Step t (paper Fig. 1; msam.py:60-101):

    1. g = grad L(w~_t), the only pass.                                            (1F 1B)
    2. w_t = w~_t + s_t v_t (s_t: the stored scalar that was applied).
    3.-4. one base step at w_t with g (v_{t+1} = mu v_t + g; w_{t+1} = w_t - lr v_{t+1}).
    5. s_{t+1} = rho / (||v_{t+1}|| + 1e-12);  w~_{t+1} = w_{t+1} - s_{t+1} v_{t+1}.

Step 0 has v = 0, s = 0: an exact base step. Choices and where they come from:

- The applied s is stored (as adamW_msam.py does), so a radius schedule does not make w drift; the
  SGD code multiplies the current rho by the stored 1/||v||.
- Weight decay acts at w (samkit's default: the base step is at w). ``decay_at="perturbed"`` is the
  authors' SGD code (msam.py:67-72): wd * w~ is added to g, and the base SGD steps without decay.
- With an Adam-family base the direction is its first moment m (adamW_msam.py:143-169). samkit's
  step is torch's AdamW, which decays before the update; the authors' AdamW decays after it.
- Evaluate and checkpoint at w: ``with opt.at_w(): ...`` moves there and back exactly; ``opt.to_w()``
  moves there for good (the next step perturbs again). The authors also recompute BN statistics at w
  after training (one forward-only train-mode epoch), which is left to the caller.
- ``state_dict`` holds the stored scalars and whether the model is at w~, so a run resumed from the
  model (at w~) and the optimizer continues exactly.

Authors' settings (README): rho 3 for SGD and AdamW alike in their four setups (vs SAM's 0.2), e.g.
CIFAR-100 WRN-16-4 with SGD lr 0.5, wd 5e-4, batch 256, 200 epochs, label smoothing 0.1. Class
defaults (used here): rho 0.3 with SGD, 1 with AdamW. nesterov is accepted and ignored by their
code; here it is the base's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from samkit.optim import vector as vec
from samkit.optim.core import EPS, Batch, SharpnessAware, StepOutput
from samkit.optim.registry import register

DECAY_AT = ("w", "perturbed")
ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)


@register("msam", "momentum-sam")
class MSAM(SharpnessAware):
    """Momentum-SAM: the gradient is taken at w - s v, v the base's momentum; no ascent pass.

    Args:
        rho: the radius (default 0.3 with SGD, 1 with an Adam-family base); a param group may set
            its own.
        decay_at: "w" (weight decay at w; default) or "perturbed" (at w~, the authors' SGD code;
            needs an SGD base).
        See :class:`samkit.optim.core.SharpnessAware` for the base, loss and policy arguments. The
        base must keep a momentum: SGD with momentum > 0, or Adam, AdamW, NAdam, RAdam.
    """

    radius_keys = ("rho",)
    passes = "1F 1B"
    cost_refusals: dict[str, str] = {
        "ascent_every": "Momentum-SAM has no ascent pass (it perturbs along the momentum buffer)",
        "ascent_subset": "Momentum-SAM has no ascent pass (it perturbs along the momentum buffer)",
    }

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float | None = None,
        decay_at: str = "w",
        **kwargs: Any,
    ) -> None:
        if decay_at not in DECAY_AT:
            raise ValueError(f"decay_at must be one of {DECAY_AT}; got {decay_at!r}")
        adam = isinstance(base, type) and issubclass(base, ADAM_FAMILY)
        if rho is None:
            rho = 1.0 if adam else 0.3
        super().__init__(params, base, radii={"rho": rho}, **kwargs)
        if isinstance(self.base, torch.optim.SGD):
            self._direction_key = "momentum_buffer"
            if any(not group["momentum"] > 0 for group in self.param_groups):
                raise ValueError(
                    "MSAM perturbs along the base's momentum: give SGD momentum > 0 "
                    "(e.g. momentum=0.9)"
                )
        elif isinstance(self.base, ADAM_FAMILY):
            self._direction_key = "exp_avg"
        else:
            raise ValueError(
                "MSAM perturbs along the base's momentum: use torch.optim.SGD (momentum > 0) or "
                f"an Adam-family base (Adam, AdamW, NAdam, RAdam); got {type(self.base).__name__}"
            )
        if decay_at == "perturbed" and self._direction_key != "momentum_buffer":
            raise ValueError(
                "decay_at='perturbed' is the authors' SGD code: it needs base=torch.optim.SGD "
                "(AdamW's decay is decoupled from the gradient)"
            )
        self.decay_at = decay_at
        self._scales: list[Tensor | None] = [None] * len(self.param_groups)
        self._at_perturbed = False

    # ----------------------------------------------------------------------------------------------
    # moving between w and w~

    def _directions(self, params: list[Tensor]) -> list[Tensor | None]:
        return [self.state.get(p, {}).get(self._direction_key) for p in params]

    @torch.no_grad()
    def _move(self, sign: float) -> None:
        """w += sign * s_j v over each group j with a stored scalar s_j (sign -1: to w~)."""
        params = self._params()
        v = self._directions(params)
        for (_, members), s in zip(vec.group_members(self.param_groups), self._scales, strict=True):
            idx = [i for i in members if v[i] is not None]
            if s is None or not idx:
                continue
            scale = (sign * s).to(v[idx[0]].dtype)
            if scale.device.type == "cpu":  # one pass per tensor, half the time on CPU
                torch._foreach_addcmul_([params[i] for i in idx], [v[i] for i in idx],
                                        [scale] * len(idx))
            else:  # CUDA's multi-tensor kernels need equal shapes, which addcmul's would not have
                torch._foreach_add_([params[i] for i in idx],
                                    torch._foreach_mul([v[i] for i in idx], scale))
        torch.clear_autocast_cache()

    @torch.no_grad()
    def _perturb(self) -> None:
        """Compute s_j = rho_j / (||v|| + 1e-12) from the current momentum and move to w~."""
        params = self._params()
        v = [t for t in self._directions(params) if t is not None]
        if v:
            inv = 1.0 / (vec.norm(v) + EPS)
            self._scales = [inv * group["rho"] for group in self.param_groups]
        else:
            self._scales = [None] * len(self.param_groups)
        self._move(-1.0)
        self._at_perturbed = True

    def to_w(self) -> None:
        """Move the model to w (e.g. at the end of training); the next step perturbs again."""
        if self._at_perturbed:
            self._move(+1.0)
            self._at_perturbed = False

    @contextlib.contextmanager
    def at_w(self) -> Iterator[None]:
        """Hold the model at w for the body (evaluation, checkpointing), then return to w~
        exactly (by copy)."""
        if not self._at_perturbed:
            yield
            return
        params = self._params()
        saved = [p.detach().clone() for p in params]
        self.to_w()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
            torch.clear_autocast_cache()
            self._at_perturbed = True

    # ----------------------------------------------------------------------------------------------
    # state and step

    def extra_state(self) -> dict[str, Any]:
        return {"scales": list(self._scales), "at_perturbed": self._at_perturbed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        scales = list(state.get("scales", [None] * len(self.param_groups)))
        device = self._params()[0].device
        self._scales = [None if s is None else torch.as_tensor(s).to(device) for s in scales]
        self._at_perturbed = bool(state.get("at_perturbed", False))

    def _update(self, batch: Batch) -> Tensor | StepOutput:
        params = self._params()
        if not self._at_perturbed:
            self._perturb()
        guarded = self.skip_nonfinite or self.grad_scaler is not None
        if guarded:  # a skipped step returns to w~ by copy, bit for bit
            held = self._scratch_like("msam_held", params)
            torch._foreach_copy_(held, params)
        (g,), out = self._pass(params, batch)
        decays = []
        if self.decay_at == "perturbed":
            with torch.no_grad():
                for group, members in vec.group_members(self.param_groups):
                    idx = [i for i in members if g[i] is not None]
                    if idx and group["weight_decay"]:
                        # wd * w~ in units of the (possibly scaled) gradient
                        wd = group["weight_decay"] / self._inverse_scale(g[idx[0]])
                        torch._foreach_add_(
                            [g[i] for i in idx], torch._foreach_mul([params[i] for i in idx], wd)
                        )
                    decays.append(group["weight_decay"])
                    group["weight_decay"] = 0.0
        self.to_w()
        try:
            self._base_step(params, g)
        finally:
            for group, wd in zip(self.param_groups, decays, strict=False):
                group["weight_decay"] = wd
        if self.last_step_skipped:
            with torch.no_grad():
                torch._foreach_copy_(params, held)
            torch.clear_autocast_cache()
            self._at_perturbed = True
        else:
            self._perturb()
        return out
