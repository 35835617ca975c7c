"""The efficient variants (spec/ALGORITHMS-EFFICIENT.md): options against their references, the
spec's identities, Momentum-SAM's moves between w and w~, and bad input. The default settings of
each method are also run by the reference, contract, scale and distributed tests."""

from __future__ import annotations

import io

import pytest
import reference as ref
import torch
from optim_helpers import BASES, assert_same_model, batches, clone, make_model
from torch.nn import functional as F

import samkit.optim as so

STEPS = 4


def sgd_kwargs(**extra):
    return {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, **extra}


def ref_sgd(model, **group):
    return torch.optim.SGD([{"params": list(model.parameters()), **group}], **sgd_kwargs())


def run(opt, model, data, closure=None):
    for x, y in data:
        opt.step(closure(x) if closure else (lambda x=x: model(x)), y)


def indexed(model, x):
    """A K-SAM closure that forwards only the samples it is given."""
    return lambda index=None: model(x if index is None else x[index])


# ---- K-SAM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_ksam_on_the_selected_samples_matches_reference(kind: str, base: str) -> None:
    model = make_model(kind)
    twin = clone(model)
    base_cls, base_kwargs = BASES[base]
    opt = so.KSAM(model.parameters(), base_cls, rho=0.1, k=5, model=model, **base_kwargs)
    ref_opt = base_cls([{"params": list(twin.parameters()), "rho": 0.1}], **base_kwargs)
    sizes = []
    for x, y in batches(kind, STEPS):

        def closure(index=None, x=x):
            sizes.append(len(x) if index is None else len(index))
            return model(x if index is None else x[index])

        opt.step(closure, y)
        ref.ksam(twin, ref_opt, x, y, k=5, subset=True)
    assert sizes[:3] == [24, 5, 5]  # the ranking pass sees the batch, the SAM passes only S
    assert_same_model(model, twin)


def test_ksam_graph_option_matches_reference() -> None:
    model = make_model("conv")
    twin = clone(model)
    opt = so.KSAM(model.parameters(), rho=0.1, graph=True, model=model, **sgd_kwargs())
    ref_opt = ref_sgd(twin, rho=0.1)
    for x, y in batches("conv", STEPS):
        opt.step(indexed(model, x), y)
        ref.ksam(twin, ref_opt, x, y, k=6, subset=True, graph=True)
    assert_same_model(model, twin)


@pytest.mark.parametrize("graph", [False, True])
def test_ksam_micro_batches_select_over_the_whole_batch(graph: bool) -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt = so.KSAM(model.parameters(), rho=0.1, k=7, graph=graph, **sgd_kwargs())
    big = so.KSAM(twin.parameters(), rho=0.1, k=7, graph=graph, **sgd_kwargs())
    for x, y in batches("mlp", STEPS):
        xs, ys = x.split([10, 6, 8]), y.split([10, 6, 8])
        out = opt.step([indexed(model, xi) for xi in xs], list(ys))
        want = big.step(indexed(twin, x), y)
        torch.testing.assert_close(out.loss, want.loss, atol=1e-12, rtol=1e-10)
    assert_same_model(model, twin)


@pytest.mark.parametrize("form", ["index", "rows", "graph"])
def test_ksam_with_k_equal_to_the_batch_is_sam(form: str) -> None:
    """Only the ranking pass updates BN statistics: SAM with frozen statistics on the others."""
    model = make_model("conv")
    twin = clone(model)
    opt = so.KSAM(
        model.parameters(), rho=0.1, k=24, graph=form == "graph", model=model, **sgd_kwargs()
    )
    sam = so.SAM(twin.parameters(), rho=0.1, norm_stats="freeze", model=twin, **sgd_kwargs())
    data = batches("conv", STEPS)
    run(opt, model, data, closure=None if form == "rows" else lambda x: indexed(model, x))
    run(sam, twin, data)
    assert_same_model(model, twin, atol=1e-12, rtol=1e-10)


def test_ksam_with_zero_radius_is_the_base_step_on_the_top_k_mean() -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt = so.KSAM(model.parameters(), rho=0.0, k=6, **sgd_kwargs())
    base = torch.optim.SGD(twin.parameters(), **sgd_kwargs())
    for x, y in batches("mlp", STEPS):
        opt.step(indexed(model, x), y)
        losses = F.cross_entropy(twin(x), y, reduction="none")
        base.zero_grad()
        losses[torch.topk(losses.detach(), 6).indices].mean().backward()
        base.step()
    assert_same_model(model, twin, atol=1e-13, rtol=1e-12)


def test_ksam_default_k_is_a_quarter_of_the_batch() -> None:
    opt = so.KSAM(make_model("mlp").parameters(), lr=0.1)
    assert [opt.top_k(b) for b in (1, 3, 24, 128)] == [1, 1, 6, 32]


# ---- LookSAM -------------------------------------------------------------------------------------


def test_looksam_with_k_1_is_sam() -> None:
    model = make_model("conv")
    twin = clone(model)
    run(so.LookSAM(model.parameters(), rho=0.1, k=1, **sgd_kwargs()), model, batches("conv", 4))
    run(so.SAM(twin.parameters(), rho=0.1, **sgd_kwargs()), twin, batches("conv", 4))
    assert_same_model(model, twin, atol=0, rtol=0)


def test_looksam_with_alpha_0_is_sam_every_k_steps() -> None:
    model = make_model("mlp")
    twin = clone(model)
    run(
        so.LookSAM(model.parameters(), rho=0.1, k=3, alpha=0.0, **sgd_kwargs()),
        model,
        batches("mlp", 5),
    )
    ref_opt = ref_sgd(twin, rho=0.1)
    for t, (x, y) in enumerate(batches("mlp", 5)):
        (ref.sam if t % 3 == 0 else ref.plain)(twin, ref_opt, x, y)
    assert_same_model(model, twin)


def test_looksam_reuse_step_identities_and_passes() -> None:
    """<g_v, g> = 0 on the ascent step; ||d - g|| = alpha ||g|| on a reuse step, which costs 1F 1B."""
    model = make_model("mlp")
    opt = so.LookSAM(model.parameters(), rho=0.1, k=2, alpha=0.7, lr=0.05)
    params = list(model.parameters())
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    for t, (x, y) in enumerate(batches("mlp", 2)):
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        forwards.clear()
        opt.step(lambda x=x: model(x), y)
        if t == 0:
            g_v = [opt.state[p]["looksam_gv"] for p in params]
            assert abs(ref.dot(g_v, g)) < 1e-12 * ref.global_norm(g_v) * ref.global_norm(g)
            assert len(forwards) == 2
        else:
            d_minus_g = [p.grad - gi for p, gi in zip(params, g, strict=True)]
            assert ref.global_norm(d_minus_g) == pytest.approx(0.7 * ref.global_norm(g), rel=1e-9)
            assert len(forwards) == 1
    assert opt.state_dict()["extra"] == {"looksam_step": 2}


# ---- GSAM ----------------------------------------------------------------------------------------


def test_gsam_radius_follows_the_learning_rate_schedule() -> None:
    model = make_model("conv")
    twin = clone(model)
    opt = so.GSAM(
        model.parameters(), rho=0.2, rho_min=0.05, alpha=0.3, lr_min=0.01, **sgd_kwargs(lr=0.1)
    )
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=STEPS)
    ref_opt = torch.optim.SGD(
        [
            {
                "params": list(twin.parameters()),
                "rho": 0.2,
                "rho_min": 0.05,
                "lr_max": 0.1,
                "lr_min": 0.01,
            }
        ],
        **sgd_kwargs(lr=0.1),
    )
    ref_sched = torch.optim.lr_scheduler.LinearLR(ref_opt, 1.0, 0.1, total_iters=STEPS)
    radii = []
    for x, y in batches("conv", STEPS):
        radii.append(so.GSAM.radius(opt.param_groups[0]))
        opt.step(lambda x=x: model(x), y)
        ref.gsam(twin, ref_opt, x, y, alpha=0.3)
        sched.step()
        ref_sched.step()
    assert radii[0] == pytest.approx(0.2) and radii[-1] < radii[0]
    assert_same_model(model, twin)


def test_gsam_with_alpha_0_is_sam_with_rho_t() -> None:
    model = make_model("conv")
    twin = clone(model)
    gsam = so.GSAM(
        model.parameters(), rho=0.3, rho_min=0.1, alpha=0.0, lr_max=0.1, **sgd_kwargs()
    )  # lr 0.05: rho_t = 0.1 + 0.2 * 0.5 = 0.2
    run(gsam, model, batches("conv", STEPS))
    run(so.SAM(twin.parameters(), rho=0.2, **sgd_kwargs()), twin, batches("conv", STEPS))
    assert_same_model(model, twin, atol=1e-13, rtol=1e-11)


# ---- Bilateral SAM -------------------------------------------------------------------------------


def test_bsam_with_r_1_and_rho_min_0_is_sam_and_the_codes_r_is_not() -> None:
    model = make_model("conv")
    twin, other = clone(model), clone(model)
    frozen = {"norm_stats": "freeze"}
    run(
        so.BSAM(
            model.parameters(),
            rho_max=0.1,
            rho_min=0.0,
            min_scale="one",
            model=model,
            **frozen,
            **sgd_kwargs(),
        ),
        model,
        batches("conv", STEPS),
    )
    run(
        so.SAM(twin.parameters(), rho=0.1, model=twin, **frozen, **sgd_kwargs()),
        twin,
        batches("conv", STEPS),
    )
    assert_same_model(model, twin, atol=1e-13, rtol=1e-11)
    run(
        so.BSAM(other.parameters(), rho_max=0.1, rho_min=0.0, **sgd_kwargs()),
        other,
        batches("conv", STEPS),
    )
    assert not torch.allclose(other.head.weight, twin.head.weight, atol=1e-6)


def test_bsam_with_r_1_matches_reference() -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt = so.BSAM(model.parameters(), rho_max=0.1, rho_min=0.07, min_scale="one", **sgd_kwargs())
    ref_opt = ref_sgd(twin, rho_max=0.1, rho_min=0.07)
    for x, y in batches("mlp", STEPS):
        opt.step(lambda x=x: model(x), y)
        ref.bsam(twin, ref_opt, x, y, min_scale="one")
    assert_same_model(model, twin)


# ---- Friendly-SAM --------------------------------------------------------------------------------


def test_fsam_with_sigma_0_is_sam_and_its_first_step_is_sams() -> None:
    model = make_model("conv")
    twin, first = clone(model), clone(model)
    run(
        so.FriendlySAM(model.parameters(), rho=0.1, sigma=0.0, **sgd_kwargs()),
        model,
        batches("conv", STEPS),
    )
    run(so.SAM(twin.parameters(), rho=0.1, **sgd_kwargs()), twin, batches("conv", STEPS))
    assert_same_model(model, twin, atol=0, rtol=0)
    run(so.FriendlySAM(first.parameters(), rho=0.1, **sgd_kwargs()), first, batches("conv", 1))
    sam0 = clone(make_model("conv"))
    run(so.SAM(sam0.parameters(), rho=0.1, **sgd_kwargs()), sam0, batches("conv", 1))
    assert_same_model(first, sam0, atol=0, rtol=0)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_fsam_paper_order_matches_reference(sigma: float) -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt = so.FriendlySAM(
        model.parameters(), rho=0.1, sigma=sigma, lam=0.6, ema_order="paper", **sgd_kwargs()
    )
    ref_opt = ref_sgd(twin, rho=0.1)
    for x, y in batches("mlp", STEPS):
        opt.step(lambda x=x: model(x), y)
        ref.fsam(twin, ref_opt, x, y, sigma=sigma, lam=0.6, ema_order="paper")
    assert_same_model(model, twin)


# ---- Momentum-SAM --------------------------------------------------------------------------------


def test_msam_step_0_is_a_base_step_and_the_model_then_holds_w_minus_s_v() -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt = so.MSAM(model.parameters(), rho=0.5, **sgd_kwargs())
    run(opt, model, batches("mlp", 1))
    run(so.Plain(twin.parameters(), **sgd_kwargs()), twin, batches("mlp", 1))
    held = [p.detach().clone() for p in model.parameters()]
    with opt.at_w():
        assert_same_model(model, twin, atol=1e-15, rtol=1e-13)  # w is the base step's result
        w = [p.detach().clone() for p in model.parameters()]
    v = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    s = 0.5 / ref.global_norm(v)
    for p_held, p_w, vi in zip(held, w, v, strict=True):
        torch.testing.assert_close(p_held - p_w, -s * vi, atol=1e-12, rtol=1e-9)
    for p, p_held in zip(model.parameters(), held, strict=True):
        assert torch.equal(p, p_held)  # at_w returns to w~ bit for bit


def test_msam_decay_at_the_perturbed_point_and_a_radius_schedule_match_reference() -> None:
    model = make_model("conv")
    twin = clone(model)
    opt = so.MSAM(
        model.parameters(), rho=0.5, decay_at="perturbed", **sgd_kwargs(weight_decay=0.05)
    )
    ref_opt = torch.optim.SGD(
        [{"params": list(twin.parameters()), "rho": 0.5}], **sgd_kwargs(weight_decay=0.05)
    )
    for t, (x, y) in enumerate(batches("conv", 5)):
        opt.param_groups[0]["rho"] = ref_opt.param_groups[0]["rho"] = 0.5 / (1 + t)
        opt.step(lambda x=x: model(x), y)
        ref.msam(twin, ref_opt, x, y, decay_at="perturbed")
    assert_same_model(model, twin)


def test_msam_resumes_from_a_checkpoint_taken_at_w() -> None:
    data = batches("mlp", 6)
    model = make_model("mlp")
    opt = so.MSAM(model.parameters(), **sgd_kwargs())
    run(opt, model, data[:3])
    with opt.at_w():
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model("mlp", seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = so.MSAM(resumed.parameters(), **sgd_kwargs())
    opt2.load_state_dict(saved["opt"])
    run(opt, model, data[3:])
    run(opt2, resumed, data[3:])
    assert_same_model(model, resumed, atol=1e-14, rtol=1e-12)
    opt.to_w()
    opt2.to_w()
    assert_same_model(model, resumed, atol=1e-14, rtol=1e-12)


def test_msam_is_the_same_with_a_torch_style_closure() -> None:
    model = make_model("mlp")
    twin = clone(model)
    a = so.MSAM(model.parameters(), **sgd_kwargs())
    b = so.MSAM(twin.parameters(), **sgd_kwargs())
    for x, y in batches("mlp", STEPS):
        a.step(lambda x=x: model(x), y)

        def closure(x=x, y=y):
            loss = F.cross_entropy(twin(x), y)
            loss.backward()
            return loss

        b.zero_grad()  # as with torch.optim: step(closure) keeps a gradient left in p.grad
        b.step(closure)
    assert_same_model(model, twin, atol=0, rtol=0)


# ---- per-group radii ------------------------------------------------------------------------------


def two_groups(model, body: dict, head: dict) -> list[dict]:
    return [
        {"params": list(model.body.parameters()), **body},
        {"params": list(model.head.parameters()), **head},
    ]


def test_momentum_sam_and_gsam_per_group_radii_match_reference() -> None:
    model = make_model("mlp")
    twin = clone(model)
    msam = so.MSAM(two_groups(model, {}, {"rho": 1.5}), rho=0.5, **sgd_kwargs())
    ref_msam = torch.optim.SGD(two_groups(twin, {"rho": 0.5}, {"rho": 1.5}), **sgd_kwargs())
    gmodel = make_model("mlp")
    gtwin = clone(gmodel)
    lr_range = {"lr_max": 0.2, "lr_min": 0.0}
    head = {"rho": 0.3, "lr": 0.1}
    gsam = so.GSAM(
        two_groups(gmodel, {}, head), rho=0.1, rho_min=0.02, alpha=0.3, **lr_range, **sgd_kwargs()
    )
    body = {"rho": 0.1, "rho_min": 0.02, **lr_range}
    ref_gsam = torch.optim.SGD(
        two_groups(gtwin, body, {**head, "rho_min": 0.02, **lr_range}), **sgd_kwargs()
    )
    for x, y in batches("mlp", STEPS):
        msam.step(lambda x=x: model(x), y)
        ref.msam(twin, ref_msam, x, y)
        gsam.step(lambda x=x: gmodel(x), y)
        ref.gsam(gtwin, ref_gsam, x, y, alpha=0.3)
    assert_same_model(model, twin)
    assert_same_model(gmodel, gtwin)


# ---- closures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("bsam", {"rho_max": 0.1, "rho_min": 0.05}),
        ("gsam", {"rho": 0.1, "alpha": 0.3}),
        ("looksam", {"rho": 0.1, "k": 2}),
        ("fsam", {"rho": 0.1, "lam": 0.6}),
    ],
)
def test_torch_style_closure_equals_the_labelled_step(name: str, kwargs: dict) -> None:
    model = make_model("mlp")
    twin = clone(model)
    a = so.create(name, model.parameters(), **kwargs, **sgd_kwargs())
    b = so.create(name, twin.parameters(), **kwargs, **sgd_kwargs())
    for x, y in batches("mlp", STEPS):
        out = a.step(lambda x=x: model(x), y)

        def closure(x=x, y=y):
            loss = F.cross_entropy(twin(x), y)
            loss.backward()
            return loss

        b.zero_grad()  # as with torch.optim: step(closure) keeps a gradient left in p.grad
        torch.testing.assert_close(out.loss, b.step(closure).detach())
    assert_same_model(model, twin, atol=1e-14, rtol=1e-12)


def test_ksam_index_closure_on_a_compiled_model() -> None:
    """The k-sample passes compile once: later steps recompile nothing."""
    torch._dynamo.reset()
    model = make_model("conv", dtype=torch.float32)
    twin = clone(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = so.KSAM(model.parameters(), rho=0.1, model=model, **sgd_kwargs())
    ref_opt = so.KSAM(twin.parameters(), rho=0.1, model=twin, **sgd_kwargs())
    for t, (x, y) in enumerate(batches("conv", 3, dtype=torch.float32)):
        with torch._dynamo.config.patch(error_on_recompile=t > 0):
            opt.step(indexed(compiled, x), y)
        ref_opt.step(indexed(twin, x), y)
    assert_same_model(model, twin, atol=1e-5, rtol=1e-4)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("msam", {"momentum": 0.0}, r"give SGD momentum > 0"),
        ("msam", {"decay_at": "w~"}, r"decay_at must be one of \('w', 'perturbed'\)"),
        ("msam", {"base": torch.optim.Adagrad, "momentum": None}, r"Adam-family base"),
        (
            "msam",
            {"base": torch.optim.AdamW, "momentum": None, "decay_at": "perturbed"},
            r"needs base=torch.optim.SGD",
        ),
        ("ksam", {"k": 0}, r"k must be an integer >= 1"),
        ("ksam", {"fraction": 0.0}, r"fraction must lie in \(0.0, 1.0\]; got 0.0"),
        ("bsam", {"min_scale": "two"}, r"min_scale must be one of \('norm_ratio', 'one'\)"),
        ("bsam", {"rho_min": -0.1}, r"rho_min must lie in \[0.0, inf\); got -0.1"),
        ("gsam", {"alpha": 1.5}, r"alpha must lie in \[0.0, 1.0\]; got 1.5"),
        ("gsam", {"rho_min": -1.0}, r"rho_min must lie in \[0.0, inf\); got -1.0"),
        ("looksam", {"k": 0}, r"k must be an integer >= 1"),
        ("looksam", {"alpha": -0.1}, r"alpha must lie in \[0.0, inf\); got -0.1"),
        ("fsam", {"ema_order": "late"}, r"ema_order must be one of \('code', 'paper'\)"),
        ("fsam", {"lam": 1.5}, r"lam must lie in \[0.0, 1.0\]; got 1.5"),
        ("fsam", {"sigma": -1.0}, r"sigma must lie in \[0.0, inf\); got -1.0"),
    ],
)
def test_invalid_hyperparameters_are_named(name: str, kwargs: dict, match: str) -> None:
    base_kwargs = {"lr": 0.1, "momentum": 0.9, **kwargs}
    base_kwargs = {k: v for k, v in base_kwargs.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        so.create(name, make_model("mlp").parameters(), **base_kwargs)


def test_ksam_refuses_k_above_the_batch_and_a_label_free_step() -> None:
    model = make_model("mlp")
    opt = so.KSAM(model.parameters(), k=30, lr=0.1)
    ((x, y),) = batches("mlp", 1)
    with pytest.raises(ValueError, match=r"k = 30 exceeds the batch of 24 samples"):
        opt.step(lambda: model(x), y)
    with pytest.raises(TypeError, match=r"needs the labels"):
        opt.step(lambda: F.cross_entropy(model(x), y))


# ---- in the training loop ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["msam", "ksam"])
def test_trainer_runs_the_method_and_evaluates_momentum_sam_at_w(
    method: str, tiny_fmnist, tmp_path, monkeypatch
) -> None:
    from samkit.train.config import load_config
    from samkit.train.loop import Trainer

    seen = []
    evaluate = Trainer.evaluate

    def spy(self):
        seen.append(getattr(self.optimizer, "_at_perturbed", False))
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    overrides = [
        f"data.root={tiny_fmnist}",
        "data.limit_per_class=300",
        "data.batch_size=32",
        "schedule.epochs=1",
        "run.max_steps_per_epoch=3",
        f"run.out={tmp_path}",
        "run.name=t",
        f"optim.method={method}",
    ]
    summary = Trainer(load_config(None, overrides), progress=False).run()
    assert summary["steps"] == 3 and 0 <= summary["last"]["overall"] <= 1
    assert seen == [False]  # evaluated at w (K-SAM is never perturbed between steps)
