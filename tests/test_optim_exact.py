"""The authors' variants of each method (issue 10) against plain references, in float64: weights and
normalization running statistics after several steps, on a BatchNorm conv net and an MLP."""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from optim_helpers import COUNTS, assert_same_model, batches, clone, make_model

import samkit.optim as so
from samkit.losses import SmoothedCrossEntropy

STEPS = 5
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


def names_with_weight(model) -> list[bool]:
    """The ASAM authors' rule, written from its description: scale a parameter iff its name
    contains "weight"."""
    return ["weight" in name for name, _ in model.named_parameters()]


def ref_sgd(model, **radii):
    return torch.optim.SGD([{"params": list(model.parameters()), **radii}], **SGD)


# name -> (build samkit's optimizer on a model, reference step(model, ref_opt, x, y), radii)
VARIANTS = {
    "asam-named": (
        lambda m: so.ASAM(m.named_parameters(), rho=0.5, eta=0.01, **SGD),
        lambda m, o, x, y: ref.sam(
            m, o, x, y, adaptive=True, eta=0.01, scaled=names_with_weight(m)
        ),
        {"rho": 0.5},
    ),
    "sam-adaptive-named": (
        lambda m: so.SAM(m.named_parameters(), rho=0.3, adaptive=True, asam_eta=0.0, **SGD),
        lambda m, o, x, y: ref.sam(m, o, x, y, adaptive=True, eta=0.0, scaled=names_with_weight(m)),
        {"rho": 0.3},
    ),
    "ccsam-joint": (
        lambda m: so.CCSAM(
            m.parameters(), class_counts=COUNTS, head=m.head, s=0.05, beta=0.5, variant="joint",
            **SGD,
        ),
        lambda m, o, x, y: ref.ccsam_classifier(m, o, x, y, COUNTS, 0.05, 0.5, variant="joint"),
        {},
    ),
    "ccsam-authors-large-s": (
        lambda m: so.CCSAM(m.parameters(), class_counts=COUNTS, head=m.head, s=0.5, beta=0.3, **SGD),
        lambda m, o, x, y: ref.ccsam_classifier(m, o, x, y, COUNTS, 0.5, 0.3),
        {},
    ),
    "imbsam-group": (
        lambda m: so.ImbSAM(
            m.parameters(), class_counts=COUNTS, rho=0.1, kappa=2.0, average="group", **SGD
        ),
        lambda m, o, x, y: ref.imbsam(m, o, x, y, COUNTS, kappa=2.0, average="group"),
        {"rho": 0.1},
    ),
    "bisam-smoothed-ce": (
        lambda m: so.BiSAM(m.parameters(), rho=0.1, loss_fn=SmoothedCrossEntropy(0.1), **SGD),
        lambda m, o, x, y: ref.bisam(m, o, x, y, descent=ref.bisam_smoothed_ce),
        {"rho": 0.1},
    ),
    **{
        f"crsam-{stats}": (
            lambda m, stats=stats: so.CRSAM(
                m.parameters(), rho=0.1, a=0.1, b=0.01, norm_stats=stats, model=m, **SGD
            ),
            lambda m, o, x, y, stats=stats: ref.crsam(m, o, x, y, a=0.1, b=0.01, stats=stats),
            {"rho": 0.1},
        )
        for stats in ("update", "freeze", "authors")
    },
}


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_reference(variant: str, kind: str) -> None:
    make, step_ref, radii = VARIANTS[variant]
    model = make_model(kind)
    twin = clone(model)
    opt, ref_opt = make(model), ref_sgd(twin, **radii)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for x, y in batches(kind, STEPS):
        opt.step(lambda x=x: model(x), y)
        step_ref(twin, ref_opt, x, y)
    assert_same_model(model, twin)
    moved = max((model.state_dict()[k] - v).abs().max() for k, v in start.items())
    assert moved > 1e-3


def test_crsam_norm_stats_choices_differ() -> None:
    """The three CR-SAM statistics policies give three different running statistics."""
    stats = {}
    for choice in ("update", "freeze", "authors"):
        model = make_model("conv")
        opt = so.CRSAM(model.parameters(), rho=0.1, norm_stats=choice, model=model, **SGD)
        for x, y in batches("conv", 2):
            opt.step(lambda x=x, model=model: model(x), y)
        stats[choice] = model.body[1].running_var.clone()
    assert (stats["update"] - stats["authors"]).abs().max() > 1e-6
    assert (stats["freeze"] - stats["authors"]).abs().max() > 1e-6


def test_authors_norm_stats_is_crsam_only() -> None:
    model = make_model("conv")
    with pytest.raises(ValueError, match=r"norm_stats must be one of \('update', 'freeze'\)"):
        so.SAM(model.parameters(), lr=0.1, norm_stats="authors", model=model)
    with pytest.raises(ValueError, match="norm_stats='authors' needs the model"):
        so.CRSAM(model.parameters(), lr=0.1, norm_stats="authors")


def test_asam_unnamed_parameters_scale_every_parameter() -> None:
    """model.parameters() keeps the popular PyTorch copy's rule (every parameter scaled), and it
    differs from the named rule: the two are different steps."""
    model, named = make_model("conv"), make_model("conv")
    twin = clone(model)
    opt = so.ASAM(model.parameters(), rho=0.5, **SGD)
    opt_named = so.ASAM(named.named_parameters(), rho=0.5, **SGD)
    ref_opt = ref_sgd(twin, rho=0.5)
    for x, y in batches("conv", 3):
        opt.step(lambda x=x: model(x), y)
        opt_named.step(lambda x=x: named(x), y)
        ref.sam(twin, ref_opt, x, y, adaptive=True, eta=0.01)
    assert_same_model(model, twin)
    assert (model.head.bias - named.head.bias).abs().max() > 1e-6


def test_a_group_can_turn_the_adaptive_ascent_off() -> None:
    """Named groups: the body adaptive off (T = 1), the head by the authors' rule."""
    model = make_model("mlp")
    twin = clone(model)
    groups = [
        {"params": list(model.body.named_parameters()), "adaptive": False},
        {"params": list(model.head.named_parameters())},
    ]
    opt = so.ASAM(groups, rho=0.5, **SGD)
    ref_opt = ref_sgd(twin, rho=0.5)
    n_body = len(list(twin.body.parameters()))
    scaled = [False] * n_body + ["weight" in n for n, _ in twin.head.named_parameters()]
    for x, y in batches("mlp", STEPS):
        opt.step(lambda x=x: model(x), y)
        ref.sam(twin, ref_opt, x, y, adaptive=True, eta=0.01, scaled=scaled)
    assert_same_model(model, twin)
    with pytest.raises(ValueError, match="param group 'adaptive' must be True or False"):
        so.ASAM([{"params": list(model.parameters()), "adaptive": "no"}], lr=0.1)


def test_named_parameters_state_dict_round_trip() -> None:
    model = make_model("mlp")
    opt = so.ASAM(model.named_parameters(), rho=0.5, **SGD)
    data = batches("mlp", 3)
    opt.step(lambda: model(data[0][0]), data[0][1])
    twin = clone(model)
    opt_twin = so.ASAM(twin.named_parameters(), rho=0.5, **SGD)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_twin.param_groups[0]["param_names"] == [n for n, _ in twin.named_parameters()]
    for x, y in data[1:]:
        opt.step(lambda x=x: model(x), y)
        opt_twin.step(lambda x=x: twin(x), y)
    assert_same_model(model, twin, atol=0, rtol=0)


@pytest.mark.parametrize("missing", ["tail", "head"])
def test_imbsam_group_means_with_an_absent_group_are_finite(missing: str) -> None:
    model = make_model("mlp")
    twin = clone(model)
    opt = so.ImbSAM(model.parameters(), class_counts=COUNTS, rho=0.1, average="group", **SGD)
    ref_opt = ref_sgd(twin, rho=0.1)
    labels = [0, 1] * 12 if missing == "tail" else [2, 3] * 12  # tail = {2, 3}
    for x, y in batches("mlp", 3, labels=labels):
        out = opt.step(lambda x=x: model(x), y)
        ref.imbsam(twin, ref_opt, x, y, COUNTS, average="group")
        assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_same_model(model, twin)
    with pytest.raises(ValueError, match=r"average must be one of \('batch', 'group'\)"):
        so.ImbSAM(model.parameters(), class_counts=COUNTS, lr=0.1, average="mean")


def test_ccsam_variant_is_checked() -> None:
    model = make_model("mlp")
    with pytest.raises(ValueError, match=r"variant must be one of \('authors', 'joint'\)"):
        so.CCSAM(model.parameters(), class_counts=COUNTS, head=model.head, lr=0.1, variant="x")


class _OpaqueLinear(torch.nn.Linear):
    """An nn.Linear that CC-SAM cannot recognise as one (so it takes the batched-backward path)."""


@pytest.mark.parametrize("variant", ["authors", "joint"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("frozen", [None, "bias", "weight"])
def test_ccsam_linear_head_closed_form_equals_batched_backward(
    variant: str, kind: str, frozen: str | None
) -> None:
    """CC-SAM's classifier form on an nn.Linear head computes the class gradients and the
    perturbed logits in closed form; the general path (batched backward, vmap over the classes)
    must give the same steps, with LDAM's per-class margins as the loss and micro-batches."""
    from samkit.losses import LDAM

    model = make_model(kind)
    twin = clone(model)
    old = twin.head
    twin.head = _OpaqueLinear(old.in_features, old.out_features).double()
    twin.head.load_state_dict(old.state_dict())
    if frozen:
        getattr(model.head, frozen).requires_grad_(False)
        getattr(twin.head, frozen).requires_grad_(False)
    loss = LDAM(COUNTS, s=1.0, drw_epoch=0).double()  # margins and class weights

    def make(net):
        return so.CCSAM([p for p in net.parameters() if p.requires_grad], class_counts=COUNTS,
                        head=net.head, s=0.05, variant=variant, loss_fn=loss, **SGD)

    opt, opt_twin = make(model), make(twin)
    assert opt._linear_head() and not opt_twin._linear_head()
    for i, (x, y) in enumerate(batches(kind, 3)):
        if i == 2:  # two micro-batches
            halves = [(x[:10], y[:10]), (x[10:], y[10:])]
            out = opt.step([lambda x=x: model(x) for x, _ in halves], [y for _, y in halves])
            out_twin = opt_twin.step([lambda x=x: twin(x) for x, _ in halves],
                                     [y for _, y in halves])
        else:
            out = opt.step(lambda x=x: model(x), y)
            out_twin = opt_twin.step(lambda x=x: twin(x), y)
        torch.testing.assert_close(out.loss, out_twin.loss)
    assert_same_model(model, twin)


@pytest.mark.parametrize("cast", ["double", "to", "half-then-double"])
def test_freeze_finds_the_buffers_after_the_model_is_cast(cast: str) -> None:
    """norm_stats="freeze" on a model cast after the optimizer was built: the running statistics are
    those of one clean pass per step, as for a model built in float64."""
    model = make_model("conv", dtype=torch.float32)
    twin = clone(model).double()
    opt = so.SAM(model.parameters(), rho=0.1, norm_stats="freeze", model=model, **SGD)
    if cast == "double":
        model.double()
    elif cast == "to":
        model.to(torch.float64)
    else:
        model.half()
        model.double()
        twin.half()
        twin.double()
    ref_opt = ref_sgd(twin, rho=0.1)
    for x, y in batches("conv", STEPS):
        opt.step(lambda x=x: model(x), y)
        ref.sam(twin, ref_opt, x, y, freeze=True)
    assert_same_model(model, twin)


@pytest.mark.parametrize(("method", "norm_stats"), [("asam", "update"), ("crsam", "authors")])
def test_the_harness_builds_the_authors_variants(method: str, norm_stats: str) -> None:
    """samkit train hands the optimizer named parameters (ASAM follows its authors' rule) and the
    model (the statistics policies and the skip guard need it); CR-SAM's "authors" is a recipe
    value."""
    from samkit.train.config import load_config
    from samkit.train.loop import make_optimizer

    config = load_config(
        None, [f"optim.method={method}", "optim.kwargs={}", f"optim.norm_stats={norm_stats}"]
    )
    model = make_model("conv")
    opt = make_optimizer(config, model, COUNTS, so.per_sample_cross_entropy)
    assert opt.model is model and opt.norm_stats == norm_stats
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
