"""Every method against its plain reference implementation (tests/reference.py), step by step."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from optim_helpers import (
    BASES,
    COST_METHODS,
    COUNTS,
    EFFICIENT_GROUP_KEYS,
    EFFICIENT_METHODS,
    NEEDS_MODEL,
    assert_same_model,
    batches,
    clone,
    make_model,
)

import samkit.optim as so

STEPS = 6
TOTAL_EPOCHS = 4  # SSE-SAM switches at epoch 2 with gamma = 0.5: steps 0-1 stage I, 2-5 stage II

# name -> (samkit name, samkit kwargs, reference step(model, opt, x, y, step_index))
METHODS = {
    "plain": ("plain", {}, lambda m, o, x, y, t: ref.plain(m, o, x, y)),
    "sam": ("sam", {"rho": 0.1}, lambda m, o, x, y, t: ref.sam(m, o, x, y)),
    "asam": (
        "asam",
        {"rho": 0.5, "eta": 0.01},
        lambda m, o, x, y, t: ref.sam(m, o, x, y, adaptive=True, eta=0.01),
    ),
    "imbsam": (
        "imbsam",
        {"rho": 0.1, "class_counts": COUNTS, "kappa": 2.0},
        lambda m, o, x, y, t: ref.imbsam(m, o, x, y, COUNTS, eta=20, kappa=2.0),
    ),
    "imbsam-group": (
        "imbsam",
        {"rho": 0.1, "class_counts": COUNTS, "kappa": 2.0, "average": "group"},
        lambda m, o, x, y, t: ref.imbsam(m, o, x, y, COUNTS, eta=20, kappa=2.0, average="group"),
    ),
    "focalsam": (
        "focalsam",
        {"rho": 0.1, "class_counts": COUNTS, "gamma": 2.0, "lam": 0.8},
        lambda m, o, x, y, t: ref.focalsam(m, o, x, y, COUNTS, gamma=2.0, lam=0.8),
    ),
    "ssesam": (
        "ssesam",
        {
            "class_counts": COUNTS,
            "total_epochs": TOTAL_EPOCHS,
            "gamma": 0.5,
            "rho_head": 0.05,
            "rho_tail": 0.1,
        },
        lambda m, o, x, y, t: ref.ssesam(
            m, o, x, y, COUNTS, epoch=t, total_epochs=TOTAL_EPOCHS, gamma=0.5
        ),
    ),
    "bisam-log": (
        "bisam",
        {"rho": 0.1, "bound": "log", "mu": 2.0},
        lambda m, o, x, y, t: ref.bisam(m, o, x, y, "log", mu=2.0),
    ),
    "bisam-tanh": (
        "bisam",
        {"rho": 0.1, "bound": "tanh", "alpha": 0.1},
        lambda m, o, x, y, t: ref.bisam(m, o, x, y, "tanh", alpha=0.1),
    ),
    "crsam": (
        "crsam",
        {"rho": 0.1, "a": 0.1, "b": 0.01},
        lambda m, o, x, y, t: ref.crsam(m, o, x, y, a=0.1, b=0.01),
    ),
    "ccsam-classifier": (
        "ccsam",
        {"class_counts": COUNTS, "s": 0.05, "beta": 0.5},
        lambda m, o, x, y, t: ref.ccsam_classifier(m, o, x, y, COUNTS, 0.05, 0.5),
    ),
    "ccsam-full": (
        "ccsam",
        {"class_counts": COUNTS, "s": 0.05, "beta": 0.3, "form": "full"},
        lambda m, o, x, y, t: ref.ccsam_full(m, o, x, y, COUNTS, 0.05, 0.3),
    ),
}
METHODS.update(EFFICIENT_METHODS)
METHODS.update(COST_METHODS)


def build(method: str, net, base: str, **extra):
    """samkit's optimizer for METHODS[method] on `net` (`extra`: more keyword arguments)."""
    name, kwargs, _ = METHODS[method]
    base_cls, base_kwargs = BASES[base]
    kwargs = {**kwargs, **extra}
    if name == "ccsam" and kwargs.get("form", "classifier") == "classifier":
        kwargs["head"] = net.head
    if name in NEEDS_MODEL:
        kwargs.setdefault("model", net)
    return so.create(name, net.parameters(), base=base_cls, **kwargs, **base_kwargs)


def reference_optimizer(method: str, model, base: str):
    """A plain torch optimizer whose group carries the radii the reference reads."""
    _, kwargs, _ = METHODS[method]
    base_cls, base_kwargs = BASES[base]
    group = {
        "params": list(model.parameters()),
        "rho": kwargs.get("rho", 0.0),
        "rho_head": kwargs.get("rho_head", 0.0),
        "rho_tail": kwargs.get("rho_tail", 0.0),
        **{key: kwargs[key] for key in EFFICIENT_GROUP_KEYS if key in kwargs},
    }
    return base_cls([group], **base_kwargs)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_reference(method: str, kind: str, base: str) -> None:
    model = make_model(kind)
    twin = clone(model)
    opt = build(method, model, base)
    ref_opt = reference_optimizer(method, twin, base)
    step_ref = METHODS[method][2]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for t, (x, y) in enumerate(batches(kind, STEPS)):
        opt.set_epoch(t)
        out = opt.step(lambda x=x: model(x), y)
        step_ref(twin, ref_opt, x, y, t)
        assert torch.isfinite(out.loss)
        assert out.logits.shape == (len(y), len(COUNTS))
    assert_same_model(model, twin)
    moved = max(
        (model.state_dict()[k] - start[k]).abs().max()
        for k in start
        if start[k].is_floating_point()
    )
    assert moved > 1e-3  # the comparison is not between two unchanged models


def test_per_group_radius_matches_reference() -> None:
    model = make_model("mlp")
    twin = clone(model)
    body, head = list(model.body.parameters()), list(model.head.parameters())
    opt = so.SAM([{"params": body, "rho": 0.02}, {"params": head, "rho": 0.3}], lr=0.1)
    ref_opt = torch.optim.SGD(
        [
            {"params": list(twin.body.parameters()), "rho": 0.02},
            {"params": list(twin.head.parameters()), "rho": 0.3},
        ],
        lr=0.1,
    )
    for x, y in batches("mlp", STEPS):
        opt.step(lambda x=x: model(x), y)
        ref.sam(twin, ref_opt, x, y)
    assert_same_model(model, twin)


@pytest.mark.parametrize("freeze", [False, True])
def test_norm_stats_policy_matches_reference(freeze: bool) -> None:
    model = make_model("conv")
    twin = clone(model)
    kwargs = {"norm_stats": "freeze", "model": model} if freeze else {}
    opt = so.SAM(model.parameters(), rho=0.1, lr=0.05, momentum=0.9, **kwargs)
    ref_opt = torch.optim.SGD(
        [{"params": list(twin.parameters()), "rho": 0.1}], lr=0.05, momentum=0.9
    )
    for x, y in batches("conv", STEPS):
        opt.step(lambda x=x: model(x), y)
        ref.sam(twin, ref_opt, x, y, freeze=freeze)
    assert_same_model(model, twin)


def test_plain_closure_matches_labelled_step() -> None:
    """step(closure) with a torch-style closure equals step(closure, labels)."""
    a, b = make_model("conv"), None
    b = clone(a)
    opt_a = so.CRSAM(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = so.CRSAM(b.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches("conv", STEPS):
        out = opt_a.step(lambda x=x: a(x), y)

        def closure(x=x, y=y):
            loss = torch.nn.functional.cross_entropy(b(x), y)
            loss.backward()
            return loss

        opt_b.zero_grad()  # as with torch.optim: step(closure) keeps a gradient left in p.grad
        loss = opt_b.step(closure)
        torch.testing.assert_close(out.loss, loss.detach())
    assert_same_model(a, b, atol=1e-12, rtol=1e-12)
