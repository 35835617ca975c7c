"""The cost options of every unified-form method (spec/ALGORITHMS-EFFICIENT.md, "Generic options for
any unified-form method"): the ascent every K steps (ascent_every, ascent_between, ascent_schedule)
and the ascent on a sub-batch (ascent_subset, ascent_subset_mode, ascent_subset_pass), against the
plain references of tests/reference.py. The every-K variants of COST_METHODS also run in every
reference, scale and distributed test (they are part of test_optim_reference.METHODS)."""

from __future__ import annotations

import io

import pytest
import reference as ref
import torch
from optim_helpers import (
    BASES,
    COST_METHODS,
    COUNTS,
    SUBSET_METHODS,
    assert_same_model,
    batches,
    clone,
    make_model,
)
from test_optim_contract import SETTINGS, PassCounter, make
from test_optim_scale import InjectInf, scaler

import samkit.optim as so
from samkit.optim.core import UNIT

STEPS = 6
#: the methods of the unified form (every cost option applies) and F-SAM (ascent every K only)
UNIFIED = ["sam", "asam", "imbsam", "focalsam", "ssesam", "bisam"]


def closure_of(model, x, indexed: bool):
    """A closure re-evaluating the model on x; `indexed`: one that forwards only the rows asked."""
    if indexed:
        return lambda index=None: model(x if index is None else x[index])
    return lambda: model(x)


def build(method: str, table: dict, net, base: str = "sgd", **extra):
    name, kwargs, _ = table[method]
    base_cls, base_kwargs = BASES[base]
    return so.create(name, net.parameters(), base=base_cls, **kwargs, **base_kwargs, **extra)


def reference_optimizer(net, base: str = "sgd", rho: float = 0.1):
    base_cls, base_kwargs = BASES[base]
    return base_cls([{"params": list(net.parameters()), "rho": rho}], **base_kwargs)


# ---- against the references ----------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("method", sorted(SUBSET_METHODS))
def test_subset_matches_reference(method: str, kind: str, base: str) -> None:
    """On the conv net (BatchNorm) the closure forwards only the sub-batch (its own statistics);
    on the MLP it forwards the whole batch and the rows outside the sub-batch are masked."""
    model = make_model(kind)
    twin = clone(model)
    opt = build(method, SUBSET_METHODS, model, base)
    ref_opt = reference_optimizer(twin, base)
    start = [p.detach().clone() for p in model.parameters()]
    for t, (x, y) in enumerate(batches(kind, STEPS)):
        out = opt.step(closure_of(model, x, kind == "conv"), y)
        SUBSET_METHODS[method][2](twin, ref_opt, x, y, t)
        assert torch.isfinite(out.loss) and out.logits.shape == (len(y), len(COUNTS))
    assert_same_model(model, twin)
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start))
    assert moved > 1e-3


def test_reuse_takes_the_current_radius() -> None:
    """Between ascents e = rho(t) u: a radius changed after the ascent step applies at once."""
    model = make_model("conv")
    twin = clone(model)
    opt = so.SAM(model.parameters(), rho=0.1, ascent_every=3, lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(
        [{"params": list(twin.parameters()), "rho": 0.1}], lr=0.05, momentum=0.9
    )
    for t, (x, y) in enumerate(batches("conv", STEPS)):
        for group in (*opt.param_groups, *ref_opt.param_groups):
            group["rho"] = 0.1 * (t + 1)
        opt.step(lambda x=x: model(x), y)
        ref.sam_cost(twin, ref_opt, x, y, every=3)
    assert_same_model(model, twin)


def test_focal_sam_with_gamma_0_lam_1_is_sam_under_each_option() -> None:
    """Spec "Focal-SAM composed": with gamma = 0, lam = 1 the clean term vanishes (and is not
    computed on reuse steps), and Focal-SAM is SAM with the same option."""
    options = [
        {"ascent_every": 3},
        {"ascent_every": 2, "ascent_between": "base"},
        {"ascent_subset": 7, "ascent_subset_mode": "topk"},
        {"ascent_subset": 0.5, "ascent_subset_pass": "graph"},
        {"ascent_every": 2, "ascent_subset": 5},
    ]
    for option in options:
        model = make_model("mlp")
        twin = clone(model)
        focal = so.FocalSAM(
            model.parameters(), class_counts=COUNTS, rho=0.1, gamma=0.0, lam=1.0, lr=0.05, **option
        )
        sam = so.SAM(twin.parameters(), rho=0.1, lr=0.05, **option)
        for x, y in batches("mlp", STEPS):
            focal.step(lambda x=x, net=model: net(x), y)
            sam.step(lambda x=x, net=twin: net(x), y)
        assert_same_model(model, twin, atol=1e-13, rtol=1e-11)


# ---- identities -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNIFIED + ["fsam"])
def test_ascent_every_1_is_the_method(name: str) -> None:
    model = make_model("conv")
    twin = clone(model)
    opt = make(name, model, ascent_every=1, ascent_between="base", ascent_schedule="bernoulli")
    plain = make(name, twin)
    for t, (x, y) in enumerate(batches("conv", 3)):
        opt.set_epoch(2 * t)  # SSE-SAM: stage I then stage II
        plain.set_epoch(2 * t)
        opt.step(lambda x=x: model(x), y)
        plain.step(lambda x=x: twin(x), y)
    assert_same_model(model, twin, atol=0, rtol=0)


@pytest.mark.parametrize("subset_pass,kind", [("graph", "conv"), ("separate", "mlp")])
@pytest.mark.parametrize("mode", ["random", "topk"])
@pytest.mark.parametrize("name", UNIFIED)
def test_subset_of_every_eligible_sample_is_the_method(
    name: str, mode: str, subset_pass: str, kind: str
) -> None:
    """m >= the eligible count gives the method (the graph pass exactly, BatchNorm included; a
    separate pass exactly on a model without BatchNorm)."""
    model = make_model(kind)
    twin = clone(model)
    opt = make(
        name,
        model,
        ascent_subset=1.0,
        ascent_subset_mode=mode,
        ascent_subset_pass=subset_pass,
    )
    plain = make(name, twin)
    for t, (x, y) in enumerate(batches(kind, 3)):
        opt.set_epoch(2 * t)
        plain.set_epoch(2 * t)
        opt.step(lambda x=x: model(x), y)
        plain.step(lambda x=x: twin(x), y)
    assert_same_model(model, twin, atol=1e-13, rtol=1e-11)


def test_subset_never_draws_a_sample_with_zero_coefficient() -> None:
    """ImbSAM's ascent sub-batch holds tail samples only: with m above their count it is them."""
    model = make_model("mlp")
    twin = clone(model)
    labels = [0, 1, 2, 3, 0, 0, 1, 0] * 3  # 6 tail samples (classes 2 and 3) of 24
    opt = so.ImbSAM(model.parameters(), class_counts=COUNTS, rho=0.1, lr=0.05, ascent_subset=10)
    full = so.ImbSAM(twin.parameters(), class_counts=COUNTS, rho=0.1, lr=0.05)
    for x, y in batches("mlp", 3, labels=labels):
        opt.step(lambda x=x: model(x), y)
        full.step(lambda x=x: twin(x), y)
    assert_same_model(model, twin, atol=1e-13, rtol=1e-11)


# ---- passes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options,first,second",
    [
        # ascent every 2 steps: step 0 is the method; step 1 reuses e (no ascent backward)
        ("sam", {"ascent_every": 2}, (2, 2), (1, 1)),
        ("asam", {"ascent_every": 2}, (2, 2), (1, 1)),
        ("bisam", {"ascent_every": 2}, (2, 2), (1, 1)),
        ("fsam", {"ascent_every": 2}, (2, 2), (1, 1)),
        ("imbsam", {"ascent_every": 2}, (2, 3), (2, 2)),
        ("focalsam", {"ascent_every": 2}, (2, 3), (2, 2)),
        ("focalsam", {"ascent_every": 2, "gamma": 0.0, "lam": 1.0}, (2, 3), (1, 1)),
        ("ssesam", {"ascent_every": 2}, (3, 4), (2, 2)),  # stage I: two reused perturbations
        ("sam", {"ascent_every": 2, "ascent_between": "base"}, (2, 2), (1, 1)),
        ("focalsam", {"ascent_every": 2, "ascent_between": "base"}, (2, 3), (1, 1)),
        # ascent on a sub-batch (a closure taking `index`: a forward on S only)
        ("sam", {"ascent_subset": 6}, (2, 2), (2, 2)),  # F_m B_m + F_B B_B
        (
            "sam",
            {"ascent_subset": 6, "ascent_subset_mode": "topk"},
            (3, 2),
            (3, 2),
        ),  # + no-grad F_B
        ("sam", {"ascent_subset": 6, "ascent_subset_pass": "graph"}, (2, 2), (2, 2)),
        ("imbsam", {"ascent_subset": 2}, (3, 3), (3, 3)),  # (2 + m/B)F (2 + m/B)B
        ("focalsam", {"ascent_subset": 6, "ascent_subset_mode": "topk"}, (3, 3), (3, 3)),
        ("focalsam", {"ascent_subset": 6, "ascent_subset_pass": "graph"}, (2, 3), (2, 3)),
        ("focalsam", {"ascent_every": 2, "ascent_subset": 6}, (3, 3), (2, 2)),
    ],
)
def test_passes_per_step(name: str, options: dict, first: tuple, second: tuple) -> None:
    model = make_model("conv")
    counter = PassCounter(model)
    opt = make(name, model, **options)
    opt.set_epoch(0)  # SSE-SAM in stage I
    data = batches("conv", 2, labels=[0, 1, 2] * 8)
    seen = []
    for x, y in data:
        counter.forward = counter.backward = 0
        opt.step(closure_of(model, x, True), y)
        seen.append((counter.forward, counter.backward))
    assert seen == [first, second]


def test_the_only_pass_updates_the_running_statistics_under_freeze() -> None:
    """norm_stats="freeze" keeps perturbed passes out of the statistics, except on a reuse step,
    where the perturbed pass is the only one."""
    model = make_model("conv")
    opt = so.SAM(
        model.parameters(), rho=0.1, lr=0.05, ascent_every=2, norm_stats="freeze", model=model
    )
    bn = model.body[1]
    tracked = []
    for x, y in batches("conv", 4):
        before = bn.running_mean.clone()
        opt.step(lambda x=x: model(x), y)
        tracked.append(int(bn.num_batches_tracked))
        assert not torch.equal(bn.running_mean, before)
    assert tracked == [1, 2, 3, 4]  # one update per step: the clean pass, or the only pass


# ---- state ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "sam-every3",
        "focalsam-every2",
        "fsam-every2",
        "sam-bernoulli-random",
        "focalsam-every3-topk",
        "imbsam-random",
    ],
)
def test_resume_mid_period_continues_exactly(method: str) -> None:
    table = {**COST_METHODS, **SUBSET_METHODS}
    data = batches("conv", 8)
    model = make_model("conv")
    opt = build(method, table, model)
    for x, y in data[:4]:  # K = 3: the next step reuses the direction of step 3
        opt.step(closure_of(model, x, True), y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model("conv", seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = build(method, table, resumed)
    opt2.load_state_dict(saved["opt"])
    for x, y in data[4:]:
        opt.step(closure_of(model, x, True), y)
        opt2.step(closure_of(resumed, x, True), y)
    assert_same_model(model, resumed, atol=0, rtol=0)


def test_stored_directions_are_unit_and_saved_in_the_state_dict() -> None:
    model = make_model("mlp")
    opt = so.SSESAM(
        model.parameters(), class_counts=COUNTS, total_epochs=10, lr=0.05, ascent_every=4
    )
    ((x, y),) = batches("mlp", 1)
    opt.step(lambda: model(x), y)
    sd = opt.state_dict()
    assert sd["cost"]["steps"] == 1 and sd["cost"]["unit_keys"] == ["rho_head", "rho_tail"]
    for key in ("rho_head", "rho_tail"):
        units = [sd["base"]["state"][i][UNIT + key] for i in range(len(list(model.parameters())))]
        norm = torch.sqrt(sum((u**2).sum() for u in units))
        torch.testing.assert_close(norm, torch.tensor(1.0, dtype=norm.dtype))


# ---- scale ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("method", sorted(SUBSET_METHODS))
def test_subset_micro_batches_equal_one_large_batch(method: str, indexed: bool) -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt, big = build(method, SUBSET_METHODS, model), build(method, SUBSET_METHODS, twin)
    for x, y in batches("mlp", 4):
        xs, ys = x.split([10, 6, 8]), list(y.split([10, 6, 8]))
        opt.step([closure_of(model, xi, indexed) for xi in xs], ys)
        big.step(closure_of(twin, x, indexed), y)
    assert_same_model(model, twin)


@pytest.mark.parametrize("method", sorted(SUBSET_METHODS))
def test_subset_under_a_grad_scaler_equals_unscaled(method: str) -> None:
    model = make_model("conv")
    twin = clone(model)
    gs = scaler()
    opt = build(method, SUBSET_METHODS, model, grad_scaler=gs)
    plain = build(method, SUBSET_METHODS, twin)
    for x, y in batches("conv", 4):
        opt.step(closure_of(model, x, True), y)
        gs.update()
        plain.step(closure_of(twin, x, True), y)
        assert not opt.last_step_skipped
    assert_same_model(model, twin)


def test_a_skipped_step_stores_no_direction_and_does_not_count() -> None:
    model = make_model("conv")
    counter = PassCounter(model)
    gs = scaler()
    opt = so.SAM(model.parameters(), rho=0.1, lr=0.05, ascent_every=2, grad_scaler=gs, model=model)
    inject = InjectInf(model.body[0].weight)
    data = batches("conv", 4)
    inject.armed = {1}  # the first step's ascent overflows: skipped, nothing stored
    opt.step(lambda: model(data[0][0]), data[0][1])
    gs.update()
    assert opt.last_step_skipped and not any(UNIT + "rho" in s for s in opt.state.values())
    inject.armed = set()
    passes = []
    for x, y in data[1:]:
        counter.forward = counter.backward = 0
        opt.step(lambda x=x: model(x), y)
        gs.update()
        passes.append((counter.forward, counter.backward))
    assert passes == [(2, 2), (1, 1), (2, 2)]  # the step after the skip ascends: t is still 0
    assert opt.state_dict()["cost"]["steps"] == 3


def test_label_free_step_with_ascent_every() -> None:
    """A torch-style closure works with ascent_every (the reuse step returns its only loss)."""
    model = make_model("conv")
    twin = clone(model)
    a = so.SAM(model.parameters(), rho=0.1, lr=0.05, ascent_every=2)
    b = so.SAM(twin.parameters(), rho=0.1, lr=0.05, ascent_every=2)
    for x, y in batches("conv", 4):
        a.step(lambda x=x: model(x), y)

        def closure(x=x, y=y):
            loss = torch.nn.functional.cross_entropy(twin(x), y)
            loss.backward()
            return loss

        b.zero_grad()  # as with torch.optim: step(closure) keeps a gradient left in p.grad
        b.step(closure)
    assert_same_model(model, twin, atol=1e-13, rtol=1e-11)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ascent_every": 0}, "ascent_every must be an integer >= 1"),
        ({"ascent_every": 2.0}, "ascent_every must be an integer >= 1"),
        ({"ascent_every": True}, "ascent_every must be an integer >= 1"),
        ({"ascent_between": "skip"}, "ascent_between must be one of"),
        ({"ascent_schedule": "every"}, "ascent_schedule must be one of"),
        ({"ascent_subset": 0}, "ascent_subset must be a sample count >= 1"),
        ({"ascent_subset": 1.5}, "ascent_subset must be a sample count >= 1"),
        ({"ascent_subset": 0.0}, "ascent_subset must be a sample count >= 1"),
        ({"ascent_subset": "8"}, "ascent_subset must be a sample count >= 1"),
        ({"ascent_subset_mode": "largest"}, "ascent_subset_mode must be one of"),
        ({"ascent_subset_pass": "full"}, "ascent_subset_pass must be one of"),
        ({"ascent_seed": 1.5}, "ascent_seed must be an integer"),
    ],
)
def test_invalid_cost_options_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make("sam", make_model("mlp"), **kwargs)


@pytest.mark.parametrize(
    "name,option,match",
    [
        (
            "msam",
            "ascent_every",
            "MSAM does not take ascent_every: Momentum-SAM has no ascent pass",
        ),
        ("msam", "ascent_subset", "MSAM does not take ascent_subset: Momentum-SAM has no ascent"),
        ("gsam", "ascent_every", "GSAM does not take ascent_every: it needs the gradient at w"),
        ("bsam", "ascent_every", "BSAM does not take ascent_every: it needs the gradient at w"),
        ("crsam", "ascent_every", "CRSAM does not take ascent_every: it needs the gradient at w"),
        ("gsam", "ascent_subset", "GSAM does not take ascent_subset: it is not of the unified"),
        ("looksam", "ascent_every", "LookSAM has its own period: set its k"),
        ("ksam", "ascent_subset", "K-SAM already ascends on a sub-batch: set its k or fraction"),
        ("ccsam", "ascent_every", "CC-SAM perturbs per class"),
        ("plain", "ascent_every", "the base optimizer has no ascent"),
        ("fsam", "ascent_subset", "FriendlySAM does not take ascent_subset: its direction is"),
    ],
)
def test_methods_without_the_option_refuse_it(name: str, option: str, match: str) -> None:
    value = 2 if option == "ascent_every" else 4
    model = make_model("conv")
    assert name in SETTINGS
    with pytest.raises(ValueError, match=match):
        make(name, model, **{option: value})


def test_subset_needs_labels() -> None:
    model = make_model("mlp")
    opt = so.SAM(model.parameters(), lr=0.05, ascent_subset=4)
    ((x, y),) = batches("mlp", 1)

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="ascent_subset needs per-sample losses"):
        opt.step(closure)


# ---- the harness ------------------------------------------------------------------------------------


def test_harness_takes_the_options_through_optim_kwargs(tmp_path, tiny_fmnist) -> None:
    """`optim.kwargs` carries the options to the constructor; the checkpoint keeps the step count
    and the stored direction (one epoch of 5 steps with K = 4: the last ascent was step 4)."""
    from test_harness import train

    from samkit.train.checkpoint import load_checkpoint

    trainer = train(
        tmp_path,
        tiny_fmnist,
        "optim.method=focalsam",
        "optim.kwargs={ascent_every: 4, ascent_subset: 0.25, ascent_subset_mode: topk}",
        "schedule.epochs=1",
        "run.max_steps_per_epoch=5",
    )
    opt = trainer.optimizer
    assert (opt.ascent_every, opt.ascent_subset, opt.ascent_subset_mode) == (4, 0.25, "topk")
    saved = load_checkpoint(tmp_path / "r/checkpoint.pt", keys=("optimizer",))["optimizer"]
    assert saved["cost"] == {"steps": 5, "unit_keys": ["rho"]}
    assert all(UNIT + "rho" in s for s in saved["base"]["state"].values())


def test_harness_names_a_bad_option(tmp_path, tiny_fmnist) -> None:
    from test_harness import train

    with pytest.raises(ValueError, match="MSAM does not take ascent_every"):
        train(tmp_path, tiny_fmnist, "optim.method=msam", "optim.kwargs={ascent_every: 4}")


# ---- benchmarks/step_time.py --------------------------------------------------------------------


def step_time_module():
    """benchmarks/step_time.py, imported from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
    spec = importlib.util.spec_from_file_location("step_time", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_step_time_counts_the_passes_the_options_take() -> None:
    """The floor of `step_time.py --options` uses the passes that test_passes_per_step measures."""
    bench = step_time_module()
    opts = bench.parse_options("ascent_every=4,ascent_subset=0.25,ascent_subset_mode=topk")
    assert opts == {"ascent_every": 4, "ascent_subset": 0.25, "ascent_subset_mode": "topk"}
    with pytest.raises(ValueError, match="is not key=value"):
        bench.parse_options("ascent_every")
    passes = bench.option_passes
    assert passes("sam", (2, 2), {"ascent_every": 2}, 24) == (1.5, 1.5)
    assert passes("focalsam", (2, 3), {"ascent_every": 2}, 24) == (2.0, 2.5)
    assert passes("sam", (2, 2), {"ascent_subset": 6}, 24) == (1.25, 1.25)
    assert passes("sam", (2, 2), {"ascent_subset": 6, "ascent_subset_mode": "topk"}, 24) == (
        2.25,
        1.25,
    )
    assert passes("imbsam", (2, 3), {"ascent_subset": 6}, 24) == (2.25, 2.25)
    assert passes("focalsam", (2, 3), {"ascent_subset": 6, "ascent_subset_pass": "graph"}, 24) == (
        2,
        3,
    )
    assert passes("ssesam-stage1", (3, 4), {"ascent_every": 2, "ascent_between": "base"}, 24) == (
        2.0,
        2.5,
    )


def test_compiled_ascent_times_sams_perturbation(monkeypatch) -> None:
    """`benchmarks/compiled_ascent.py` times SAM's arithmetic: w + rho g / ||g||, then w again."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("compiled_ascent")
    torch.manual_seed(0)
    params = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    w = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    bench.perturb(params, grads, backup)
    norm = torch.cat([g.flatten() for g in grads]).norm()
    for p, p0, g in zip(params, w, grads, strict=True):
        torch.testing.assert_close(p, p0 + bench.RHO * g / norm, rtol=1e-12, atol=1e-12)
    bench.restore(params, backup)
    assert all(torch.equal(p, p0) for p, p0 in zip(params, w, strict=True))
    # the flat layout: the same step on views of one buffer, and w again after its restore
    views, (perturb_flat, restore_flat) = bench.flat_layout(params)
    assert all(torch.equal(v, p0) for v, p0 in zip(views, w, strict=True))
    perturb_flat(views, grads, None)
    for v, p0, g in zip(views, w, grads, strict=True):
        torch.testing.assert_close(v, p0 + bench.RHO * g / norm, rtol=1e-12, atol=1e-12)
    restore_flat(views, None)
    assert all(torch.equal(v, p0) for v, p0 in zip(views, w, strict=True))


@pytest.mark.parametrize("exact, flat", [(False, False), (True, False), (True, True)])
def test_minimal_sam_yardstick_takes_sams_step(exact: bool, flat: bool) -> None:
    """The minimal SAM of `step_time.py` does SAM's work: its steps are samkit's SAM steps (rho
    0.05, SGD lr 1e-4 momentum 0.9), whether it restores w by subtracting e or by copy, and with
    its arithmetic on one flat buffer of the parameters."""
    bench = step_time_module()
    model = make_model("mlp")
    twin = clone(model)
    ((x, y),) = batches("mlp", 1)
    step = bench.minimal_sam(model, model, x, y, exact, flat)
    opt = so.SAM(twin.parameters(), rho=0.05, lr=1e-4, momentum=0.9)
    for _ in range(3):
        step()
        opt.step(lambda: twin(x), y)
    assert_same_model(model, twin, atol=1e-12, rtol=1e-12)
    if flat:  # the parameters live in one buffer
        assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def test_flat_yardstick_restores_by_copy() -> None:
    with pytest.raises(ValueError, match="exact=True"):
        step_time_module().minimal_sam(make_model("mlp"), None, None, None, exact=False, flat=True)
