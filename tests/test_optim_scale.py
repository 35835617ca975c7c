"""What scale needs, for every method: micro-batch accumulation, bfloat16 autocast, a float16-style
GradScaler (its overflow skip included), torch.compile and channels-last."""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import assert_same_model, batches, clone, make_model
from test_optim_reference import METHODS, build

import samkit.optim as so

STEPS = 3


def micro(model, x, y, sizes):
    """Closures and labels of x, y split into micro-batches of the given sizes."""
    xs, ys = x.split(sizes), y.split(sizes)
    return [lambda xi=xi: model(xi) for xi in xs], list(ys)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_micro_batches_equal_one_large_batch(method: str) -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt, big = build(method, model, "sgd"), build(method, twin, "sgd")
    start = [p.detach().clone() for p in model.parameters()]
    for t, (x, y) in enumerate(batches("mlp", STEPS)):
        opt.set_epoch(t)
        big.set_epoch(t)
        out = opt.step(*micro(model, x, y, [10, 6, 8]))
        ref = big.step(lambda x=x: twin(x), y)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-12, rtol=1e-10)
    assert_same_model(model, twin)
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start))
    assert moved > 1e-3


def test_one_micro_batch_in_a_list_is_the_plain_step() -> None:
    model = make_model("conv")
    twin = clone(model)
    opt, ref = build("focalsam", model, "sgd"), build("focalsam", twin, "sgd")
    for x, y in batches("conv", STEPS):
        opt.step([lambda x=x: model(x)], [y])
        ref.step(lambda x=x: twin(x), y)
    assert_same_model(model, twin, atol=0, rtol=0)


@pytest.mark.parametrize(
    "closure, labels, match",
    [
        ([lambda: None], [], "non-empty list of labels"),
        ([lambda: None], [torch.zeros(2, dtype=torch.long)] * 2, "as many closures"),
        (lambda: None, [torch.zeros(2, dtype=torch.long)], "as many closures"),
    ],
)
def test_malformed_micro_batches_are_refused(closure, labels, match) -> None:
    model = make_model("mlp")
    with pytest.raises(ValueError, match=match):
        so.SAM(model.parameters(), lr=0.1).step(closure, labels)


def test_micro_batches_without_labels_are_refused() -> None:
    model = make_model("mlp")
    with pytest.raises(TypeError, match="micro-batches need their labels"):
        so.SAM(model.parameters(), lr=0.1).step([lambda: None, lambda: None])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_autocast_runs_every_method(method: str) -> None:
    model = make_model("conv", dtype=torch.float32)
    twin = clone(model)
    opt, ref = build(method, model, "sgd"), build(method, twin, "sgd")
    start = [p.detach().clone() for p in model.parameters()]
    for t, (x, y) in enumerate(batches("conv", STEPS, dtype=torch.float32)):
        opt.set_epoch(t)
        ref.set_epoch(t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = opt.step(lambda x=x: model(x), y)
        ref.step(lambda x=x: twin(x), y)
        assert out.logits.dtype == torch.bfloat16  # the passes ran under autocast
        assert torch.isfinite(out.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    moved_ref = torch.cat([(p.detach() - s).flatten() for p, s in zip(twin.parameters(), start)])
    # bfloat16 has 8 bits of mantissa: the update agrees with float32's to about 1%. (Were the
    # perturbed passes to reuse autocast's cached copies of the unperturbed weights, SAM's update
    # would be off by 12%.)
    assert float((moved - moved_ref).norm() / moved_ref.norm()) < 0.03


def scaler(scale: float = 2.0**12) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grad_scaler_steps_equal_unscaled_steps(method: str) -> None:
    model = make_model("conv")
    twin = clone(model)
    gs = scaler()
    opt, ref = build(method, model, "sgd", grad_scaler=gs), build(method, twin, "sgd")
    for t, (x, y) in enumerate(batches("conv", STEPS)):
        opt.set_epoch(t)
        ref.set_epoch(t)
        out = opt.step(lambda x=x: model(x), y)
        gs.update()
        ref_out = ref.step(lambda x=x: twin(x), y)
        assert not opt.last_step_skipped
        torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-12, rtol=1e-12)  # unscaled
    assert_same_model(model, twin)


class InjectInf:
    """A gradient hook that turns one parameter's gradient infinite in chosen backward passes."""

    def __init__(self, param: torch.Tensor) -> None:
        self.armed: set[int] | str = set()
        self.calls = 0
        param.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        if self.armed == "all" or self.calls in self.armed:
            return torch.full_like(grad, math.inf)
        return None


@pytest.mark.parametrize("where", ["first", "all"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_grad_scaler_skips_an_overflowing_step_untouched(method: str, where: str) -> None:
    model = make_model("conv")
    gs = scaler()
    opt = build(method, model, "sgd", grad_scaler=gs)
    inject = InjectInf(model.body[0].weight)
    (x0, y0), (x1, y1), (x2, y2) = batches("conv", 3)
    opt.step(lambda: model(x0), y0)  # a normal step first: momentum state exists
    gs.update()
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    inject.calls, inject.armed = 0, {1} if where == "first" else "all"
    out = opt.step(lambda: model(x1), y1)
    gs.update()
    assert inject.calls >= 1 and opt.last_step_skipped and opt.skipped_steps == 1
    assert gs.get_scale() == 2.0**11  # the scale was lowered
    for k, p in model.named_parameters():
        assert torch.equal(p, weights[k]), k
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    bn = model.body[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert torch.isfinite(out.loss) or where == "all"
    inject.armed = set()
    opt.step(lambda: model(x2), y2)  # and training goes on
    gs.update()
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_also_skips_an_ascent_overflow() -> None:
    model = make_model("conv")
    opt = build("sam", model, "sgd", skip_nonfinite=True)
    inject = InjectInf(model.body[0].weight)
    inject.armed = {1}  # the ascent's gradient only; the descent pass is finite
    ((x, y),) = batches("conv", 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model(x), y)
    assert opt.last_step_skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.isfinite(model.body[1].running_mean).all()


def test_grad_scaler_must_be_a_grad_scaler() -> None:
    with pytest.raises(ValueError, match="grad_scaler must be a torch.amp.GradScaler"):
        so.SAM(make_model("mlp").parameters(), lr=0.1, grad_scaler=object())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compiled_model_works_with_every_method(method: str) -> None:
    torch._dynamo.reset()
    model = make_model("conv", dtype=torch.float32)
    twin = clone(model)
    # fullgraph=True: any graph break in the model's forward (samkit's hooks included) is an error
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt, ref = build(method, model, "sgd"), build(method, twin, "sgd")
    for t, (x, y) in enumerate(batches("conv", STEPS, dtype=torch.float32)):
        opt.set_epoch(t)
        ref.set_epoch(t)
        with torch._dynamo.config.patch(error_on_recompile=t > 0):
            opt.step(lambda x=x: compiled(x), y)
        ref.step(lambda x=x: twin(x), y)
    assert_same_model(model, twin, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_channels_last_matches_contiguous(method: str) -> None:
    model = make_model("conv").to(memory_format=torch.channels_last)
    twin = clone(model).to(memory_format=torch.contiguous_format)
    opt, ref = build(method, model, "sgd"), build(method, twin, "sgd")
    for t, (x, y) in enumerate(batches("conv", STEPS)):
        opt.set_epoch(t)
        ref.set_epoch(t)
        xc = x.to(memory_format=torch.channels_last)
        opt.step(lambda xc=xc: model(xc), y)
        ref.step(lambda x=x: twin(x), y)
    assert model.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_model(model, twin)
