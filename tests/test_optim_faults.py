"""Faults and bad input at the optimizer API (issue 11, items 1 and 12): a skipped step leaves the
normalization running statistics as they were, and every ordinary mistake gets a clear error."""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import COUNTS, batches, make_model
from test_optim_contract import SETTINGS, make
from torch import nn
from torch.nn import functional as F

import samkit.optim as so


class NaNOnForward(nn.Module):
    """Wraps a model; the forward numbered in `poison` (1-based, counted from arming) gets one NaN
    in its input, as a corrupt image would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = model.head
        self.poison: set[int] = set()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.poison:
            x = x.clone()
            x.view(-1)[0] = math.nan
        return self.model(x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("norm_stats", ["update", "freeze"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_skipped_step_leaves_running_statistics_untouched(
    name: str, norm_stats: str, where: str
) -> None:
    net = NaNOnForward(make_model("conv"))
    opt = make(name, net, skip_nonfinite=True, norm_stats=norm_stats, model=net)
    (x0, y0), (x1, y1), (x2, y2) = batches("conv", 3)
    opt.step(lambda: net(x0), y0)
    before = snapshot(net)
    calls = net.calls
    opt.step(lambda: net(x1), y1)  # count this step's forwards
    per_step = net.calls - calls
    net.load_state_dict(before)
    opt = make(name, net, skip_nonfinite=True, norm_stats=norm_stats, model=net)
    net.calls, net.poison = 0, {1 if where == "first" else per_step}
    opt.step(lambda: net(x1), y1)
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert_unchanged(net, before)
    opt.step(lambda: net(x2), y2)  # and training goes on
    assert not opt.last_step_skipped
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


@pytest.mark.parametrize("name", ["sam", "imbsam", "crsam"])
def test_grad_scaler_overflow_restores_running_statistics(name: str) -> None:
    net = NaNOnForward(make_model("conv"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = make(name, net, grad_scaler=scaler, model=net)
    (x0, y0), (x1, y1) = batches("conv", 2)
    opt.step(lambda: net(x0), y0)
    scaler.update()
    before = snapshot(net)
    net.calls, net.poison = 0, {1}
    opt.step(lambda: net(x1), y1)
    scaler.update()
    assert opt.last_step_skipped
    assert_unchanged(net, before)


def test_torch_style_closure_skip_restores_running_statistics() -> None:
    net = NaNOnForward(make_model("conv"))
    opt = so.SAM(net.parameters(), lr=0.05, skip_nonfinite=True, model=net)
    ((x, y),) = batches("conv", 1)
    before = snapshot(net)
    net.poison = {2}

    def closure():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_step_skipped
    assert_unchanged(net, before)


@pytest.mark.parametrize("guard", ["skip_nonfinite", "grad_scaler"])
def test_huge_radius_under_update_skips_instead_of_poisoning_the_statistics(guard: str) -> None:
    """rho = 1e30 in float32: the perturbed pass's batch variance overflows to inf in the running
    statistics, while the normalised activations (and so the gradient) may stay finite."""
    model = make_model("conv", dtype=torch.float32)
    kwargs = (
        {"skip_nonfinite": True}
        if guard == "skip_nonfinite"
        else {"grad_scaler": torch.amp.GradScaler("cpu", init_scale=2.0**12)}
    )
    opt = so.SAM(model.parameters(), rho=1e30, lr=0.05, model=model, **kwargs)
    ((x, y),) = batches("conv", 1, dtype=torch.float32)
    before = snapshot(model)
    opt.step(lambda: model(x), y)
    assert opt.last_step_skipped
    assert_unchanged(model, before)


def test_without_model_a_skipped_step_still_keeps_the_weights() -> None:
    """Documented limit: without model= the statistics cannot be found; weights stay untouched."""
    net = NaNOnForward(make_model("conv"))
    opt = so.SAM(net.parameters(), lr=0.05, skip_nonfinite=True)
    ((x, y),) = batches("conv", 1)
    weights = [p.detach().clone() for p in net.parameters()]
    net.poison = {1}
    opt.step(lambda: net(x), y)
    assert opt.last_step_skipped
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))


# ---- item 12: the optimizer API's errors -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_all_frozen_model_is_refused(name: str) -> None:
    model = make_model("mlp")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter.*requires_grad"):
        make(name, model)


@pytest.mark.parametrize("name", ["plain", "sam", "asam", "crsam"])
def test_closure_that_never_calls_backward_is_refused(name: str) -> None:
    model = make_model("mlp")
    opt = make(name, model)
    ((x, y),) = batches("mlp", 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="no gradient reached any parameter.*loss.backward"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["plain", "sam", "asam", "crsam"])
def test_forgotten_labels_are_named(name: str) -> None:
    model = make_model("mlp")
    opt = make(name, model)
    ((x, y),) = batches("mlp", 1)
    with pytest.raises(TypeError, match=r"got \(24, 4\).*opt.step\(closure, labels\)"):
        opt.step(lambda: model(x))


def test_closures_returning_per_sample_losses_are_refused() -> None:
    model = make_model("mlp")
    opt = so.SAM(model.parameters(), lr=0.1)
    ((x, y),) = batches("mlp", 1)
    with pytest.raises(TypeError, match=r"logits, a tensor \(B, C\), not a loss.*got \(24,\)"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), y)

    def closure():
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        return losses

    with pytest.raises(TypeError, match=r"one number; got \(24,\).*\.mean\(\)"):
        opt.step(closure)


@pytest.mark.parametrize("counts", ["300,60,15,4", b"12", [300, "a"], [[300, 60], [15]]])
def test_class_counts_that_are_not_counts_are_refused(counts) -> None:
    model = make_model("mlp")
    with pytest.raises(ValueError, match="class_counts must be a .*sequence of .*positive integers"):
        so.FocalSAM(model.parameters(), class_counts=counts, lr=0.1)


def test_a_base_that_needs_a_closure_is_refused_at_construction() -> None:
    model = make_model("mlp")
    with pytest.raises(ValueError, match="base LBFGS needs a closure.*SGD, AdamW"):
        so.SAM(model.parameters(), base=torch.optim.LBFGS, lr=0.1)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_empty_batch_is_refused(name: str) -> None:
    model = make_model("mlp")
    opt = make(name, model)
    ((x, y),) = batches("mlp", 1)
    with pytest.raises(ValueError, match="the batch is empty"):
        opt.step(lambda: model(x[:0]), y[:0])


@pytest.mark.parametrize("name", ["plain", "sam", "bisam", "imbsam"])
def test_ignore_index_labels_are_refused(name: str) -> None:
    model = make_model("mlp")
    opt = make(name, model)
    ((x, y),) = batches("mlp", 1)
    y[2] = -100
    with pytest.raises(ValueError, match=r"labels must lie in \[0, .*-100.*no ignore_index"):
        opt.step(lambda: model(x), y)


@pytest.mark.parametrize(
    ("name", "key"), [("sam", "rho"), ("ssesam", "rho_tail"), ("focalsam", "rho")]
)
def test_negative_radius_written_after_construction_is_refused(name: str, key: str) -> None:
    model = make_model("mlp")
    opt = make(name, model)
    ((x, y),) = batches("mlp", 1)
    opt.param_groups[0][key] = -0.1
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\] is -0.1: .* >= 0"):
        opt.step(lambda: model(x), y)
    opt.param_groups[0][key] = math.nan
    with pytest.raises(ValueError, match="a radius must be a finite number"):
        opt.step(lambda: model(x), y)


def test_labelled_step_counts_classes_from_class_counts() -> None:
    """The class check still names class_counts for class-aware methods."""
    model = make_model("mlp")
    opt = so.ImbSAM(model.parameters(), class_counts=COUNTS, lr=0.1)
    ((x, y),) = batches("mlp", 1)
    y[0] = 4
    with pytest.raises(ValueError, match=r"\[0, 4\) \(class_counts has 4 classes\)"):
        opt.step(lambda: model(x), y)
