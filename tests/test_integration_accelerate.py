"""accelerate: every method under accelerator.accumulate gives samkit's own step on the window's
micro-batches; the closure form returns the loss; bf16 mixed precision (issue 13, item 4);
Momentum-SAM's w through the wrapper, and save_state/load_state resuming exactly."""

from __future__ import annotations

import copy

import accelerate
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from integration_helpers import (
    METHODS,
    assert_same_weights,
    make_optimizer,
    reference_run,
    tiny_data,
    tiny_model,
)

from samkit.integrations.accelerate import prepare_optimizer


@pytest.fixture
def make_accelerator():
    def make(**kwargs):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return accelerate.Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("method", list(METHODS))
def test_accumulate_equals_samkit_step_on_the_window(method, make_accelerator):
    x, y = tiny_data(32)
    batches = list(zip(x.split(8), y.split(8)))
    net = tiny_model()
    ref = reference_run(method, copy.deepcopy(net), [batches[:2], batches[2:]])
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    model = accelerator.prepare(net)
    opt = prepare_optimizer(accelerator, make_optimizer(method, model), model)
    outs = []
    for xb, yb in batches:
        with accelerator.accumulate(model):
            outs.append(opt.step(lambda xb=xb: model(xb), yb))
            opt.zero_grad()
    assert outs[0] is None and outs[2] is None
    # the window's clean loss and logits, at the weights before its step
    torch.testing.assert_close(outs[1].logits, tiny_model()(x[:16]).detach(), rtol=0, atol=1e-12)
    opt.to_w()  # the end of training (Momentum-SAM's model holds w~ until then)
    assert_same_weights(net, ref)


def test_ksam_closures_taking_the_index_forward_only_the_top_k(make_accelerator):
    x, y = tiny_data(32)
    batches = list(zip(x.split(8), y.split(8)))
    net = tiny_model()
    ref = reference_run("ksam", copy.deepcopy(net), [batches[:2], batches[2:]])
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    model = accelerator.prepare(net)
    opt = prepare_optimizer(accelerator, make_optimizer("ksam", model), model)
    rows = []

    def forward(x):
        rows.append(x.shape[0])
        return model(x)

    for xb, yb in batches:
        with accelerator.accumulate(model):
            opt.step(lambda index=None, xb=xb: forward(xb if index is None else xb[index]), yb)
    # each window: the ranking pass on 2 x 8, then two passes on the k = 8 chosen of 16
    assert len(rows) == 12 and rows[:2] == rows[6:8] == [8, 8]
    assert sum(rows[2:6]) == sum(rows[8:]) == 16
    assert_same_weights(net, ref)


def test_momentum_sam_at_w_and_save_state_resume_exactly(tmp_path, make_accelerator):
    x, y = tiny_data(32)
    batches = list(zip(x.split(8), y.split(8)))

    def steps(opt, model, part):
        for xb, yb in part:
            opt.step(lambda xb=xb: model(xb), yb)
            opt.zero_grad()

    accelerator = make_accelerator()
    net = tiny_model()
    model = accelerator.prepare(net)
    opt = prepare_optimizer(accelerator, make_optimizer("msam", model), model)
    steps(opt, model, batches[:2])
    perturbed = copy.deepcopy(net.state_dict())
    with opt.at_w():
        at_w = copy.deepcopy(net.state_dict())
    ref = reference_run("msam", tiny_model(), [[b] for b in batches[:2]])  # ends at w
    for key in at_w:
        torch.testing.assert_close(at_w[key], ref.state_dict()[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(net.state_dict()[key], perturbed[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(at_w["head.weight"], perturbed["head.weight"])
    accelerator.save_state(tmp_path / "state")
    steps(opt, model, batches[2:])
    whole = copy.deepcopy(net.state_dict())

    accelerator = make_accelerator()
    again = tiny_model(seed=5)
    model = accelerator.prepare(again)
    opt = prepare_optimizer(accelerator, make_optimizer("msam", model), model)
    accelerator.load_state(tmp_path / "state")
    steps(opt, model, batches[2:])
    for key, value in whole.items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_closure_form_returns_the_loss_and_accumulates_exactly(make_accelerator):
    x, y = tiny_data(16)
    net = tiny_model()
    ref = copy.deepcopy(net)
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    model = accelerator.prepare(net)
    opt = prepare_optimizer(accelerator, make_optimizer("sam", model), model)
    outs = []
    for xb, yb in zip(x.split(8), y.split(8)):
        def closure(xb=xb, yb=yb):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            return loss

        with accelerator.accumulate(model):
            outs.append(opt.step(closure))
    # samkit's closure form on one closure running both micro-batches (each loss / 2)
    def both():
        losses = [torch.nn.functional.cross_entropy(ref(xb), yb)
                  for xb, yb in zip(x.split(8), y.split(8))]
        (sum(losses) / 2).backward()
        return sum(losses).detach() / 2

    expected = make_optimizer("sam", ref).step(both)
    assert outs[0] is None
    torch.testing.assert_close(outs[1], expected, rtol=0, atol=1e-12)
    assert_same_weights(net, ref)


def test_bf16_mixed_precision_runs_every_pass_under_autocast(make_accelerator):
    x, y = tiny_data(16, dtype=torch.float32)
    net = tiny_model(dtype=torch.float32)
    ref = copy.deepcopy(net)
    accelerator = make_accelerator(mixed_precision="bf16")
    model = accelerator.prepare(net)
    opt = prepare_optimizer(accelerator, make_optimizer("focalsam", model), model)
    out = opt.step(lambda: model(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = make_optimizer("focalsam", ref).step(lambda: ref(x), y)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    assert_same_weights(net, ref, atol=1e-7)


def test_step_without_closure_is_a_clear_error(make_accelerator):
    accelerator = make_accelerator()
    net = tiny_model()
    opt = prepare_optimizer(accelerator, make_optimizer("sam", net), net)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


def test_a_closure_reading_a_changed_loop_variable_is_refused(make_accelerator):
    x, y = tiny_data(16)
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    net = tiny_model()
    model = accelerator.prepare(net)
    opt = prepare_optimizer(accelerator, make_optimizer("sam", model), model)

    def run():
        for xb, yb in zip(x.split(8), y.split(8)):
            with accelerator.accumulate(model):
                opt.step(lambda: model(xb), yb)  # noqa: B023 (late-bound on purpose)

    with pytest.raises(ValueError, match="lambda x=x"):
        run()


def test_the_accelerator_grad_scaler_goes_to_samkit(make_accelerator):
    # accelerate uses a GradScaler with fp16 on a GPU; on this CPU one is set by hand
    x, y = tiny_data(16)
    net = tiny_model()
    ref = copy.deepcopy(net)
    accelerator = make_accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    opt = prepare_optimizer(accelerator, make_optimizer("focalsam", net), net)
    out = opt.step(lambda: net(x), y)
    assert opt.optimizer.grad_scaler is accelerator.scaler
    assert accelerator.scaler.get_scale() == 2.0**11  # updated once, after the step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    expected = make_optimizer("focalsam", ref)
    expected.grad_scaler = scaler
    torch.testing.assert_close(out.loss, expected.step(lambda: ref(x), y).loss, rtol=0, atol=0)
    assert_same_weights(net, ref)
