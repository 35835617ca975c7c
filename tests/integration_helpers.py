"""Shared by the integration tests: every method's settings, a tiny float64 model and data set, and
samkit's own step on the same micro-batches as the reference."""

from __future__ import annotations

import inspect

import torch
from optim_helpers import COUNTS, MLP

import samkit.optim as so

METHODS = {
    "plain": {},
    "sam": {"rho": 0.1},
    "asam": {"rho": 0.5},
    "imbsam": {"rho": 0.1, "eta": 20},
    "ccsam": {"s": 0.05},
    "focalsam": {"rho": 0.1, "gamma": 2.0, "lam": 0.8},
    "ssesam": {"total_epochs": 1, "rho_head": 0.05, "rho_tail": 0.1},  # stage II from epoch 1
    "bisam": {"rho": 0.1},
    "crsam": {"rho": 0.1, "a": 0.1, "b": 0.01},
    # the efficient methods: settings under which a few steps show each one's own state
    "msam": {"rho": 0.3},  # the model holds w~ between steps
    "ksam": {"rho": 0.1, "fraction": 0.5},  # closures take an index
    "bsam": {"rho_max": 0.1, "rho_min": 0.05},
    "gsam": {"rho": 0.1, "rho_min": 0.02, "alpha": 0.4},
    "looksam": {"rho": 0.1, "k": 2, "alpha": 0.7},  # a step counter: SAM every 2nd step
    "fsam": {"rho": 0.1, "sigma": 1.0, "lam": 0.6},  # an EMA of past gradients
}
LABEL_METHODS = ["imbsam", "ccsam", "focalsam", "ssesam", "bisam", "ksam"]


def method_kwargs(method: str, model: torch.nn.Module) -> dict:
    """The test settings of `method`, with the class counts and head it needs."""
    wanted = inspect.signature(so.get(method).__init__).parameters
    kwargs = dict(METHODS[method])
    if "class_counts" in wanted:
        kwargs["class_counts"] = COUNTS
    if "head" in wanted:
        kwargs["head"] = model.head
    return kwargs


def make_optimizer(method: str, model: torch.nn.Module, **base) -> so.SharpnessAware:
    """`method` over `model`'s trainable parameters (SGD with momentum unless `base` says else)."""
    base = base or {"lr": 0.05, "momentum": 0.9}
    params = [p for p in model.parameters() if p.requires_grad]
    return so.get(method)(params, **method_kwargs(method, model), **base)


def tiny_model(seed: int = 0, dtype=torch.float64) -> MLP:
    torch.manual_seed(seed)
    return MLP().to(dtype)


def tiny_data(n: int = 32, seed: int = 1, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of 6 features, labels drawn so that every class appears."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), n, replacement=True, generator=g)
    return x, y


def reference_run(method, model, windows, epochs_of=None, **base):
    """samkit's own step on each window (a list of (x, y) micro-batches); `epochs_of[i]` is the
    epoch of window i (for SSE-SAM's schedule). The model ends at w (Momentum-SAM holds w~ between
    steps; the integrations leave the trained model at w)."""
    opt = make_optimizer(method, model, **base)
    for i, window in enumerate(windows):
        opt.set_epoch(0 if epochs_of is None else epochs_of[i])
        opt.step([lambda x=x: model(x) for x, _ in window], [y for _, y in window])
        opt.zero_grad()
    if isinstance(opt, so.MSAM):
        opt.to_w()
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-12) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=key)
