"""The optimizer contract: identities between methods, pass counts, state round trips, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from optim_helpers import (
    COUNTS,
    EFFICIENT_SETTINGS,
    NEEDS_MODEL,
    assert_same_model,
    batches,
    clone,
    make_model,
)

import samkit.optim as so

CLASS_AWARE = {"class_counts": COUNTS}
# Settings that build every registered method (rho-like radius given separately).
SETTINGS = {
    "plain": {},
    "sam": {"rho": 0.1},
    "asam": {"rho": 0.5},
    "imbsam": {"rho": 0.1, **CLASS_AWARE},
    "focalsam": {"rho": 0.1, "gamma": 2.0, "lam": 0.8, **CLASS_AWARE},
    "ssesam": {"rho_head": 0.05, "rho_tail": 0.1, "total_epochs": 10, **CLASS_AWARE},
    "bisam": {"rho": 0.1},
    "crsam": {"rho": 0.1},
    "ccsam": {"s": 0.05, **CLASS_AWARE},
    **EFFICIENT_SETTINGS,
}
ZERO_RADIUS = {"rho": 0.0, "rho_head": 0.0, "rho_tail": 0.0, "s": 0.0, "rho_max": 0.0, "rho_min": 0.0}


def make(name: str, net, **overrides):
    kwargs = {**SETTINGS[name], "lr": 0.05, "momentum": 0.9, **overrides}
    if name == "ccsam" and kwargs.get("form", "classifier") == "classifier":
        kwargs.setdefault("head", net.head)
    if name in NEEDS_MODEL:
        kwargs.setdefault("model", net)
    return so.create(name, net.parameters(), **kwargs)


def run(opt, model, data, epoch=None):
    for x, y in data:
        if epoch is not None:
            opt.set_epoch(epoch)
        opt.step(lambda x=x: model(x), y)


def test_registry_lists_every_method() -> None:
    assert so.available() == sorted(SETTINGS)
    assert so.get("Focal-SAM") is so.FocalSAM and so.get("cc_sam") is so.CCSAM
    with pytest.raises(ValueError, match="unknown optimizer 'adam-sam'.*focalsam"):
        so.get("adam-sam")


# ---- identities ---------------------------------------------------------------------------------


# K-SAM with rho = 0 is the base step on its top-k mean loss (test_optim_efficient.py)
@pytest.mark.parametrize("name", sorted(set(SETTINGS) - {"plain", "ksam"}))
def test_zero_radius_is_the_base_optimizer(name: str) -> None:
    model = make_model("conv")
    twin = clone(model)
    radii = {k: v for k, v in ZERO_RADIUS.items() if k in SETTINGS[name]}
    data = batches("conv", 4)
    run(make(name, model, norm_stats="freeze", model=model, **radii), model, data)
    run(make("plain", twin), twin, data)
    assert_same_model(model, twin, atol=1e-12, rtol=1e-10)


def test_focal_sam_with_gamma_0_lam_1_is_sam() -> None:
    model = make_model("conv")
    twin = clone(model)
    data = batches("conv", 5)
    run(make("focalsam", model, gamma=0.0, lam=1.0), model, data)
    run(make("sam", twin), twin, data)
    assert_same_model(model, twin, atol=1e-13, rtol=1e-12)


def test_focal_sam_with_lam_0_is_the_base_optimizer() -> None:
    model = make_model("mlp")
    twin = clone(model)
    data = batches("mlp", 5)
    run(make("focalsam", model, lam=0.0), model, data)
    run(make("plain", twin), twin, data)
    assert_same_model(model, twin, atol=1e-13, rtol=1e-12)


def test_crsam_with_zero_coefficients_is_sam() -> None:
    model = make_model("conv")
    twin = clone(model)
    data = batches("conv", 5)
    run(make("crsam", model, a=0.0, b=0.0, norm_stats="freeze", model=model), model, data)
    run(make("sam", twin, norm_stats="freeze", model=twin), twin, data)
    assert_same_model(model, twin, atol=1e-13, rtol=1e-12)


def test_ssesam_after_the_switch_is_imbsam() -> None:
    model = make_model("conv")
    twin = clone(model)
    data = batches("conv", 5)
    sse = make("ssesam", model, rho_tail=0.2, gamma=0.5, eta=20)
    assert sse.stage == 1
    run(sse, model, data, epoch=5)
    assert sse.stage == 2
    run(make("imbsam", twin, rho=0.2, eta=20), twin, data)
    assert_same_model(model, twin, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("name", ["imbsam", "focalsam", "ssesam"])
def test_batch_without_tail_samples_gives_a_finite_step(name: str) -> None:
    model = make_model("conv")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = batches("conv", 3, labels=[0] * 24)  # class 0 is the head for every threshold
    opt = make(name, model)
    for x, y in data:
        out = opt.step(lambda x=x: model(x), y)
        assert torch.isfinite(out.loss)
    for k, v in model.state_dict().items():
        assert torch.isfinite(v.double()).all(), k
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# Momentum-SAM's model holds w - s v between steps, so it moves even at lr = 0
@pytest.mark.parametrize("name", sorted(set(SETTINGS) - {"msam"}))
def test_lr_zero_leaves_weights_bitwise_unchanged(name: str) -> None:
    """Also pins that the weights are restored by copy: subtracting e would not be exact in fp32."""
    model = make_model("conv", dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    big = {k: 3.0 * v for k, v in SETTINGS[name].items() if k in ZERO_RADIUS}
    opt = make(name, model, lr=0.0, **big)
    run(opt, model, batches("conv", 3, dtype=torch.float32))
    for p, w in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, w)


@pytest.mark.parametrize(
    "name,key",
    [
        ("sam", "rho"),
        ("imbsam", "rho"),
        ("focalsam", "rho"),
        ("bisam", "rho"),
        ("crsam", "rho"),
        ("bsam", "rho_max"),
        ("looksam", "rho"),
        ("fsam", "rho"),
    ],
)
def test_perturbation_norm_equals_rho(name: str, key: str) -> None:
    model = make_model("mlp")
    w0 = [p.detach().clone() for p in model.parameters()]
    seen = []

    def closure(x):
        seen.append([p.detach().clone() for p in model.parameters()])
        return model(x)

    opt = make(name, model, lr=0.0, **{key: 0.37})
    ((x, y),) = batches("mlp", 1)
    opt.step(lambda: closure(x), y)
    assert len(seen) >= 2
    norm = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(seen[1], w0, strict=True)))
    assert float(norm) == pytest.approx(0.37, rel=1e-9)


def test_asam_perturbation_follows_its_formula() -> None:
    model = make_model("mlp")
    ((x, y),) = batches("mlp", 1)
    g = torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(x), y), list(model.parameters())
    )
    t = [p.detach().abs() + 0.01 for p in model.parameters()]
    n = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
    expected = [0.5 * ti**2 * gi / n for ti, gi in zip(t, g, strict=True)]
    seen = []
    w0 = [p.detach().clone() for p in model.parameters()]

    def closure():
        seen.append([p.detach().clone() - w for p, w in zip(model.parameters(), w0, strict=True)])
        return model(x)

    make("asam", model, lr=0.0, rho=0.5).step(closure, y)
    for e, want in zip(seen[1], expected, strict=True):
        torch.testing.assert_close(e, want, atol=1e-12, rtol=1e-9)


# ---- passes per step ----------------------------------------------------------------------------


class PassCounter:
    """Counts forward calls of the model and backward passes through its first layer."""

    def __init__(self, model) -> None:
        self.forward = self.backward = 0
        model.register_forward_pre_hook(self._on_forward)
        first = next(m for m in model.modules() if not list(m.children()))
        first.register_forward_hook(self._on_first)

    def _on_forward(self, *args) -> None:
        self.forward += 1

    def _on_first(self, module, args, out) -> None:
        if out.requires_grad:  # a forward under no_grad (K-SAM's ranking) has no backward
            out.register_hook(self._on_backward)

    def _on_backward(self, grad) -> None:
        self.backward += 1


@pytest.mark.parametrize(
    "name,overrides,passes",
    [
        ("plain", {}, (1, 1)),
        ("sam", {}, (2, 2)),
        ("asam", {}, (2, 2)),
        ("imbsam", {}, (2, 3)),
        ("focalsam", {}, (2, 3)),
        ("ssesam", {}, (3, 4)),  # stage I: the head and tail ascents share the forward at w
        ("ssesam", {"gamma": 0.1}, (2, 3)),  # stage II (epoch 5 of 10 > 0.1 * 10): ImbSAM
        ("bisam", {}, (2, 2)),
        ("crsam", {}, (3, 3)),
        ("ccsam", {}, (1, 1)),  # classifier form: the head is re-evaluated, not the network
        ("ccsam", {"form": "full"}, (1 + 3, 1 + 2 * 3)),  # three classes present in the batch
        ("msam", {}, (1, 1)),
        ("ksam", {}, (3, 2)),  # the ranking forward has no backward
        ("ksam", {"graph": True}, (2, 2)),
        ("bsam", {}, (3, 3)),
        ("gsam", {}, (2, 2)),
        ("looksam", {}, (2, 2)),  # step 0 is a SAM step (reuse steps: test_optim_efficient.py)
        ("fsam", {}, (2, 2)),
    ],
)
def test_passes_per_step(name: str, overrides: dict, passes: tuple[int, int]) -> None:
    model = make_model("conv")
    counter = PassCounter(model)
    opt = make(name, model, **overrides)
    opt.set_epoch(5)
    ((x, y),) = batches("conv", 1, labels=[0, 1, 2] * 8)
    opt.step(lambda: model(x), y)
    assert (counter.forward, counter.backward) == passes


# ---- state ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_state_dict_round_trip_continues_exactly(name: str, base: str) -> None:
    base_kwargs = {"base": torch.optim.AdamW, "momentum": None} if base == "adamw" else {}
    base_kwargs = {k: v for k, v in base_kwargs.items() if v is not None}

    def build(model):
        kwargs = dict(base_kwargs)
        if base == "adamw":
            return so.create(
                name,
                model.parameters(),
                lr=0.01,
                **{**SETTINGS[name], **kwargs, **({"head": model.head} if name == "ccsam" else {})},
            )
        return make(name, model)

    data = batches("conv", 5)
    model = make_model("conv")
    opt = build(model)
    run(opt, model, data[:3], epoch=6)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model("conv", seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = build(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state_dict()["extra"] == opt.state_dict()["extra"]
    run(opt, model, data[3:])
    run(opt2, resumed, data[3:])
    assert_same_model(model, resumed, atol=0, rtol=0)


def test_state_dict_holds_base_state_and_method_state() -> None:
    model = make_model("mlp")
    opt = make("ssesam", model)
    opt.set_epoch(7)
    run(opt, model, batches("mlp", 1))
    sd = opt.state_dict()
    assert sd["method"] == "SSESAM" and sd["extra"] == {"epoch": 7}
    assert "momentum_buffer" in sd["base"]["state"][0]
    assert sd["base"]["param_groups"][0]["rho_tail"] == 0.1
    other = make("sam", make_model("mlp"))
    with pytest.raises(ValueError, match="saved by SSESAM, not SAM"):
        other.load_state_dict(sd)


def test_scheduler_and_param_groups_are_shared_with_the_base() -> None:
    model = make_model("mlp")
    opt = make("focalsam", model, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, model, batches("mlp", 1))
    sched.step()
    assert opt.base.param_groups[0]["lr"] == 0.5
    opt.param_groups[0]["rho"] = 0.2
    assert opt.base.param_groups[0]["rho"] == 0.2


def test_zero_grad_and_grads_after_step_follow_torch() -> None:
    model = make_model("mlp")
    opt = make("sam", model)
    run(opt, model, batches("mlp", 1))
    assert all(p.grad is not None for p in model.parameters())  # the final gradient, as torch
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---- normalization statistics -------------------------------------------------------------------


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


@pytest.mark.parametrize("name", ["sam", "focalsam", "crsam", "ssesam"])
def test_frozen_norm_stats_equal_one_clean_pass(name: str) -> None:
    model = make_model("conv")
    twin = clone(model)
    ((x, y),) = batches("conv", 1)
    make(name, model, norm_stats="freeze", model=model).step(lambda: model(x), y)
    twin(x)  # one clean pass in train mode
    for k, v in _bn_buffers(twin).items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-14, rtol=0)


def test_updated_norm_stats_see_every_pass() -> None:
    model = make_model("conv")
    ((x, y),) = batches("conv", 1)
    make("crsam", model).step(lambda: model(x), y)
    assert int(model.body[1].num_batches_tracked) == 3


def test_freeze_keeps_layers_built_with_momentum_none() -> None:
    """Cumulative-average BN (momentum=None) is why freezing must not set momentum to 0."""
    model = make_model("conv")
    model.body[1].momentum = None
    twin = clone(model)
    ((x, y),) = batches("conv", 1)
    make("sam", model, norm_stats="freeze", model=model).step(lambda: model(x), y)
    twin(x)
    assert model.body[1].momentum is None
    torch.testing.assert_close(model.body[1].running_mean, twin.body[1].running_mean)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("sam", {"rho": -0.1}, r"rho must lie in \[0.0, inf\); got -0.1"),
        ("crsam", {"rho": float("nan")}, r"rho must lie in \[0.0, inf\); got nan"),
        ("focalsam", {"gamma": -1.0}, r"gamma must lie in \[0.0, inf\); got -1.0"),
        ("focalsam", {"lam": -0.5}, r"lam must lie in \[0.0, inf\); got -0.5"),
        ("imbsam", {"eta": 0.5}, r"eta must lie in \[1.0, inf\); got 0.5"),
        ("ssesam", {"gamma": 1.0}, r"gamma must lie in \(0.0, 1.0\); got 1.0"),
        ("ssesam", {"gamma": 0.0}, r"gamma must lie in \(0.0, 1.0\); got 0.0"),
        ("ssesam", {"total_epochs": None}, r"needs total_epochs"),
        ("ssesam", {"rho_head": -1.0}, r"rho_head must lie in \[0.0, inf\); got -1.0"),
        ("imbsam", {"class_counts": None}, r"ImbSAM needs class_counts"),
        ("focalsam", {"class_counts": [10, 0, 3]}, r"class_counts must be .* positive integers"),
        ("ccsam", {"class_counts": [10, 5, 1, 1]}, r"at least 2 training samples"),
        ("ccsam", {"head": None}, r"needs head=model.head"),
        ("ccsam", {"beta": 1.5}, r"beta must lie in \[0.0, 1.0\]; got 1.5"),
        ("bisam", {"bound": "hinge"}, r"bound must be one of \('log', 'tanh'\); got 'hinge'"),
        ("bisam", {"mu": 0.0}, r"mu must lie in \(0.0, inf\); got 0.0"),
        ("crsam", {"a": -0.1}, r"a must lie in \[0.0, inf\); got -0.1"),
        ("sam", {"norm_stats": "eval"}, r"norm_stats must be one of"),
        ("sam", {"norm_stats": "freeze"}, r"pass model=your_model"),
    ],
)
def test_invalid_hyperparameters_are_named(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(name, make_model("mlp"), **kwargs)


def test_invalid_group_radius_is_named() -> None:
    model = make_model("mlp")
    with pytest.raises(ValueError, match=r"param group rho must lie in \[0.0, inf\); got -2"):
        so.SAM([{"params": list(model.parameters()), "rho": -2}], lr=0.1)


@pytest.mark.parametrize("name", ["imbsam", "focalsam", "ssesam", "ccsam"])
def test_labels_out_of_range_are_refused(name: str) -> None:
    model = make_model("mlp")
    opt = make(name, model)
    ((x, y),) = batches("mlp", 1)
    y[3] = 4
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*got values from 0 to 4"):
        opt.step(lambda: model(x), y)
    y[3] = -1
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        opt.step(lambda: model(x), y)


def test_class_counts_of_the_wrong_length_are_refused() -> None:
    model = make_model("mlp")
    opt = so.FocalSAM(model.parameters(), class_counts=[5, 4, 3], lr=0.1)
    ((x, y),) = batches("mlp", 1)
    y = y.clamp(max=2)
    with pytest.raises(ValueError, match=r"class_counts has 3 classes but the model returned"):
        opt.step(lambda: model(x), y)


@pytest.mark.parametrize("name", ["imbsam", "focalsam", "ssesam", "ccsam", "bisam"])
def test_label_free_step_is_refused_for_methods_that_need_labels(name: str) -> None:
    model = make_model("mlp")
    with pytest.raises(TypeError, match=r"needs the labels: call opt.step\(closure, labels\)"):
        make(name, model).step(lambda: model(torch.zeros(2, 6, dtype=torch.float64)))


def test_loss_fn_must_be_per_sample() -> None:
    model = make_model("mlp")
    opt = make("sam", model, loss_fn=torch.nn.CrossEntropyLoss())
    ((x, y),) = batches("mlp", 1)
    with pytest.raises(ValueError, match="one loss per sample"):
        opt.step(lambda: model(x), y)


def test_bisam_bound_lies_below_the_zero_one_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(500, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (500,), generator=g)
    wrong = (logits.argmax(1) != y).double()
    for bound in ("log", "tanh"):
        for mu in (0.5, 1.0, 4.0):
            q = so.lower_bound(logits, y, bound=bound, mu=mu)
            gap = q - torch.log(torch.tensor(7.0, dtype=torch.float64)) / mu
            assert (gap <= wrong + 1e-12).all()
    # phi(0) = 0 for the log bound: equal logits give Q = log(K) / mu exactly.
    q = so.lower_bound(torch.zeros(3, 4), torch.tensor([0, 1, 2]), "log", mu=2.0)
    torch.testing.assert_close(q, torch.full((3,), float(torch.log(torch.tensor(4.0))) / 2))


# ---- the default loss, reduced inside cross_entropy ----------------------------------------------


def per_sample_ce(logits, labels):
    """The default loss written out: not the default object, so a step takes the general path."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


FUSED_CASES = {
    "sam": {},
    "imbsam": {},
    "focalsam": {},
    "ssesam": {},
    "bisam": {},
    "crsam": {},
    "gsam": {},
    "fsam": {},
    "ksam": {},
    "imbsam every 2": {"ascent_every": 2},
    "focalsam subset": {"ascent_subset": 8, "ascent_subset_mode": "topk"},
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_default_loss_equals_the_per_sample_form(case: str, monkeypatch) -> None:
    """With the default loss a single-term pass lets cross_entropy reduce (weighted by the class
    table where there is one): the steps, the returned loss and logits equal those of the same
    loss given as a per-sample function, and the fused runs evaluate fewer per-sample losses."""
    name = case.split()[0]
    reductions: list[str] = []
    cross_entropy = torch.nn.functional.cross_entropy

    def spy(*args, reduction="mean", **kwargs):
        reductions.append(reduction)
        return cross_entropy(*args, reduction=reduction, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    model = make_model("conv")
    twin = clone(model)
    fused = make(name, model, **FUSED_CASES[case])
    general = make(name, twin, loss_fn=per_sample_ce, **FUSED_CASES[case])
    runs = []
    for opt, net in ((fused, model), (general, twin)):
        reductions.clear()
        outs = []
        for epoch, (x, y) in enumerate(batches("conv", 4)):
            opt.set_epoch(3 * epoch)  # SSE-SAM crosses its switch (epoch 5 of 10)
            outs.append(opt.step(lambda index=None, x=x, net=net: net(x if index is None
                                                                     else x[index]), y))
        runs.append((outs, reductions.count("none")))
    (fused_outs, fused_count), (general_outs, general_count) = runs
    for a, b in zip(fused_outs, general_outs, strict=True):
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-10, atol=1e-12)
    assert_same_model(model, twin, atol=1e-12, rtol=1e-10)
    assert fused_count < general_count
    if name == "sam":
        assert fused_count == 0


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast-bf16", "bf16-weights"])
def test_fused_weighted_loss_in_low_precision(autocast: bool) -> None:
    """Class weights enter cross_entropy in float32 under autocast; with bfloat16 logits outside
    autocast (which cross_entropy cannot weight) the per-sample form is used: both as the general
    path computes them."""
    model = make_model("mlp", dtype=torch.float32 if autocast else torch.bfloat16)
    twin = clone(model)
    fused = make("focalsam", model)
    general = make("focalsam", twin, loss_fn=per_sample_ce)
    dtype = torch.float32 if autocast else torch.bfloat16
    for x, y in batches("mlp", 3, dtype=dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a = fused.step(lambda x=x: model(x), y)
            b = general.step(lambda x=x: twin(x), y)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


# ---- no host syncs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_step_reads_no_tensor_value_on_the_host(name: str, monkeypatch) -> None:
    """The hot path keeps norms and coefficients as tensors: reading any tensor's value on the host
    (item, bool, int, float, tolist) inside a step fails this test. Label checks are off, as they
    are on accelerators by default."""
    model = make_model("conv")
    opt = make(name, model, check_labels=False)
    (x, y), = batches("conv", 1)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside step()")

    for attr in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    opt.step(lambda: model(x), y)
    monkeypatch.undo()
    assert all(p.grad is not None for p in model.parameters())


def test_step_hooks_and_profiler_scope_follow_torch() -> None:
    """samkit skips torch's per-step profiler scope when nothing would see it (issue 15's small
    steps); hooks on the optimizer and on its base, global hooks, a profiler and an LR scheduler
    must still see every step."""
    import warnings

    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model = make_model("mlp")
    opt = make("sam", model)
    seen: list[str] = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: seen.append(f"pre {type(o).__name__}")),
        opt.register_step_post_hook(lambda o, a, k: seen.append(f"post {type(o).__name__}")),
        opt.base.register_step_pre_hook(lambda o, a, k: seen.append(f"pre {type(o).__name__}")),
    ]
    run(opt, model, batches("mlp", 1))
    assert seen == ["pre SAM", "pre SGD", "post SAM"]
    for h in handles:
        h.remove()
    seen.clear()
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(f"pre {type(o).__name__}")),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(f"post {type(o).__name__}")),
    ]
    try:
        run(opt, model, batches("mlp", 1))
    finally:
        for h in handles:
            h.remove()
    assert seen == ["pre SAM", "pre SGD", "post SGD", "post SAM"]
    seen.clear()
    run(opt, model, batches("mlp", 1))
    assert seen == []  # removed hooks stay removed
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(opt, model, batches("mlp", 1))
    names = {e.key for e in prof.key_averages()}
    assert {"Optimizer.step#SAM.step", "Optimizer.step#SGD.step"} <= names
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, model, batches("mlp", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        sched.step()
