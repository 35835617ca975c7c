"""Tests of samkit.losses: values against independent float64 computations, identities, DRW, checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samkit.losses import (
    LDAM,
    LDAM_DRW_EPOCH,
    BalancedSoftmax,
    CrossEntropy,
    LogitAdjusted,
    PerSampleLoss,
    SmoothedCrossEntropy,
    VSLoss,
    available_losses,
    build_loss,
)

COUNTS = [100, 16, 1]
# Two samples, three classes; the labels hit a head and a tail class.
LOGITS = [[1.0, -0.5, 0.25], [0.3, 0.8, -1.2]]
LABELS = [0, 2]


def ref_ce(u: list[float], y: int) -> float:
    """Cross-entropy of one sample with plain python math: log(sum exp u) - u_y."""
    top = max(u)
    return top + math.log(sum(math.exp(v - top) for v in u)) - u[y]


def logits64() -> torch.Tensor:
    return torch.tensor(LOGITS, dtype=torch.float64)


def labels() -> torch.Tensor:
    return torch.tensor(LABELS)


def assert_matches(actual: torch.Tensor, expected: list[float]) -> None:
    """Equal to the python-math values: to 1e-12 for float64 results (every constant of a loss is
    computed in the logits' dtype, so float64 losses are exact to rounding), 1e-6 otherwise."""
    assert actual.shape == (len(expected),)
    tol = 1e-12 if actual.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol
    )


# ---------------------------------------------------------------- values against python math


def test_ce_known_value() -> None:
    # Equal logits: the loss is log(C) whatever the label.
    loss = CrossEntropy()(torch.zeros(2, 3), torch.tensor([0, 2]))
    assert_matches(loss, [math.log(3.0), math.log(3.0)])


def test_ce_matches_python_math() -> None:
    expected = [ref_ce(u, y) for u, y in zip(LOGITS, LABELS)]
    assert_matches(CrossEntropy()(logits64(), labels()), expected)


def test_ce_label_smoothing_and_weights() -> None:
    eps = 0.1
    expected = []
    for u, y in zip(LOGITS, LABELS):
        # Smoothed target (1 - eps) e_y + eps / C: mix of CE at y and the mean CE over all classes.
        expected.append((1 - eps) * ref_ce(u, y) + eps * sum(ref_ce(u, c) for c in range(3)) / 3)
    assert_matches(CrossEntropy(label_smoothing=eps)(logits64(), labels()), expected)

    weight = [0.5, 1.0, 3.0]
    expected = [weight[y] * ref_ce(u, y) for u, y in zip(LOGITS, LABELS)]
    assert_matches(CrossEntropy(weight=weight)(logits64(), labels()), expected)


def test_ldam_margins_and_values() -> None:
    loss = LDAM(COUNTS, max_m=0.5, s=30.0)
    # n^(-1/4) = 100^(-1/4), 16^(-1/4) = 1/2, 1 -> margins 0.5 * (0.1 ** 0.5, 0.5, 1).
    torch.testing.assert_close(
        loss.margins, torch.tensor([0.5 * 0.1**0.5, 0.25, 0.5]), rtol=1e-6, atol=0
    )
    margins = [0.5 * n ** (-0.25) / 1.0 for n in COUNTS]
    expected = []
    for u, y in zip(LOGITS, LABELS):
        shifted = [30.0 * (v - (margins[y] if c == y else 0.0)) for c, v in enumerate(u)]
        expected.append(ref_ce(shifted, y))
    assert_matches(loss(logits64(), labels()), expected)


def test_logit_adjusted_matches_python_math() -> None:
    total = sum(COUNTS)
    for tau in (0.5, 1.0, 2.0):
        expected = []
        for u, y in zip(LOGITS, LABELS):
            adjusted = [v + tau * math.log(COUNTS[c] / total) for c, v in enumerate(u)]
            expected.append(ref_ce(adjusted, y))
        assert_matches(LogitAdjusted(COUNTS, tau=tau)(logits64(), labels()), expected)


def test_balanced_softmax_matches_python_math() -> None:
    expected = []
    for u, y in zip(LOGITS, LABELS):
        expected.append(ref_ce([v + math.log(COUNTS[c]) for c, v in enumerate(u)], y))
    assert_matches(BalancedSoftmax(COUNTS)(logits64(), labels()), expected)


def test_vs_matches_python_math() -> None:
    gamma, tau = 0.2, 0.75
    total, n_max = sum(COUNTS), max(COUNTS)
    expected = []
    for u, y in zip(LOGITS, LABELS):
        adjusted = [
            v * (COUNTS[c] / n_max) ** gamma + tau * math.log(COUNTS[c] / total)
            for c, v in enumerate(u)
        ]
        expected.append(ref_ce(adjusted, y))
    assert_matches(VSLoss(COUNTS, gamma=gamma, tau=tau)(logits64(), labels()), expected)


def test_smoothed_ce_matches_python_math() -> None:
    """The BiSAM authors' smoothing: 1 - s on the target, s / (C - 1) on each other class."""
    for s in (0.0, 0.1, 0.5):
        expected = []
        for u, y in zip(LOGITS, LABELS):
            others = [ref_ce(u, c) for c in range(3) if c != y]
            expected.append((1 - s) * ref_ce(u, y) + s / 2 * sum(others))
        assert_matches(SmoothedCrossEntropy(s)(logits64(), labels()), expected)
    assert build_loss("bisam-ce").smoothing == 0.1


def test_smoothed_ce_is_not_torch_label_smoothing() -> None:
    z, y = random_batch()
    ours = SmoothedCrossEntropy(0.1)(z, y)
    torch_style = CrossEntropy(label_smoothing=0.1)(z, y)
    assert (ours - torch_style).abs().max() > 1e-3
    # torch's s/C on every class is ours with s' = s (C - 1) / C on the other classes
    torch.testing.assert_close(
        SmoothedCrossEntropy(0.1 * 2 / 3)(z, y), torch_style, rtol=1e-12, atol=1e-12
    )


def test_smoothed_ce_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        SmoothedCrossEntropy()(torch.zeros(2, 1), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="smoothing must be <= 1"):
        SmoothedCrossEntropy(1.5)


@pytest.mark.parametrize("name", ["ce-weighted", "ldam-drw", "la", "balanced-softmax", "vs"])
def test_float64_logits_use_float64_constants(name: str) -> None:
    """A loss built for float32 devices still gives float64 logits float64 constants: equal to
    the same loss whose buffers hold the float64 values (not float32 ones widened)."""
    loss = CrossEntropy(weight=[0.3, 1.0 / 3.0, 2.7]) if name == "ce-weighted" else build_loss(
        name, COUNTS
    )
    loss.set_epoch(LDAM_DRW_EPOCH)
    z, y = random_batch()
    exact = {k: v.clone() for k, v in loss._exact.items()}
    widened = {k: b.double() for k, b in loss.named_buffers()}
    assert any(not torch.equal(exact[k], widened[k]) for k in exact)  # float32 loses digits
    out = loss(z, y)
    for k, v in exact.items():  # the float64 values, used as the buffers
        setattr(loss, k, v)
    loss._exact.clear()
    torch.testing.assert_close(out, loss(z, y), rtol=0, atol=0)


# ---------------------------------------------------------------- identities


def random_batch(
    batch: int = 16, classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 3
    y = torch.randint(0, classes, (batch,), generator=generator)
    return z, y


def test_logit_adjusted_tau_zero_is_ce() -> None:
    z, y = random_batch()
    torch.testing.assert_close(LogitAdjusted(COUNTS, tau=0.0)(z, y), CrossEntropy()(z, y))


def test_vs_gamma_zero_is_logit_adjusted() -> None:
    z, y = random_batch()
    for tau in (0.75, 1.0):
        torch.testing.assert_close(
            VSLoss(COUNTS, gamma=0.0, tau=tau)(z, y), LogitAdjusted(COUNTS, tau=tau)(z, y)
        )


def test_balanced_softmax_equals_logit_adjusted_tau_one() -> None:
    # log n_c = log pi_c + log N: the same constant added to every logit, which CE ignores.
    z, y = random_batch()
    torch.testing.assert_close(BalancedSoftmax(COUNTS)(z, y), LogitAdjusted(COUNTS, tau=1.0)(z, y))


def test_ldam_zero_margin_unit_scale_is_ce() -> None:
    z, y = random_batch()
    torch.testing.assert_close(LDAM(COUNTS, max_m=0.0, s=1.0)(z, y), CrossEntropy()(z, y))


# ---------------------------------------------------------------- DRW


def effective_number_weights(counts: list[int], beta: float) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [w * len(counts) / sum(raw) for w in raw]


def test_drw_weights_before_and_after_switch() -> None:
    beta = 0.9999
    loss = LDAM(COUNTS, drw_epoch=3, beta=beta)
    plain = LDAM(COUNTS)
    z, y = random_batch()
    expected_weights = effective_number_weights(COUNTS, beta)
    torch.testing.assert_close(
        loss.drw_weights, torch.tensor(expected_weights, dtype=torch.float32), rtol=1e-6, atol=0
    )
    assert math.isclose(float(loss.drw_weights.sum()), 3.0, rel_tol=1e-6)

    for epoch in (0, 2):
        loss.set_epoch(epoch)
        assert not loss.drw_active
        assert torch.equal(loss.class_weights, torch.ones(3))
        torch.testing.assert_close(loss(z, y), plain(z, y))

    for epoch in (3, 10):
        loss.set_epoch(epoch)
        assert loss.drw_active
        # Per-sample weighting, not renormalised by the weights of the batch.
        weights = torch.tensor(expected_weights, dtype=torch.float64)[y]
        torch.testing.assert_close(loss(z, y), weights * plain(z, y), rtol=1e-6, atol=1e-9)

    loss.set_epoch(1)  # going back (e.g. a test of the schedule) switches it off again
    torch.testing.assert_close(loss(z, y), plain(z, y))


def test_drw_disabled_and_beta_zero() -> None:
    z, y = random_batch()
    never = LDAM(COUNTS, drw_epoch=None)
    never.set_epoch(10_000)
    torch.testing.assert_close(never(z, y), LDAM(COUNTS)(z, y))
    flat = LDAM(COUNTS, drw_epoch=0, beta=0.0)  # beta = 0: every class weight is 1
    torch.testing.assert_close(flat.drw_weights, torch.ones(3))


def test_ldam_drw_default_epoch() -> None:
    assert build_loss("ldam-drw", COUNTS).drw_epoch == LDAM_DRW_EPOCH == 160
    assert build_loss("ldam-drw", COUNTS, drw_epoch=5).drw_epoch == 5
    assert build_loss("ldam", COUNTS).drw_epoch is None


def test_set_epoch_is_a_no_op_elsewhere() -> None:
    z, y = random_batch()
    for name in available_losses():
        loss = build_loss(name, COUNTS)
        before = loss(z, y)
        loss.set_epoch(1000 if name != "ldam-drw" else 10)
        torch.testing.assert_close(loss(z, y), before)


# ---------------------------------------------------------------- gradients, dtypes, devices


def test_gradcheck() -> None:
    z, y = random_batch(batch=5)
    for loss in (LDAM(COUNTS, drw_epoch=0), VSLoss(COUNTS, gamma=0.3, tau=1.2)):
        loss.set_epoch(1)
        assert torch.autograd.gradcheck(
            lambda logits, fn=loss: fn(logits, y), (z.clone().requires_grad_(),)
        )


@pytest.mark.parametrize("name", ["ce", "ldam-drw", "la", "balanced-softmax", "vs"])
def test_per_sample_shape_and_dtypes(name: str) -> None:
    loss = build_loss(name, COUNTS)
    loss.set_epoch(LDAM_DRW_EPOCH)
    z, y = random_batch(batch=7)
    out64 = loss(z, y)
    assert out64.shape == (7,) and out64.dtype == torch.float64
    out32 = loss(z.float(), y)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, out64.float(), rtol=1e-5, atol=1e-5)
    for half in (torch.float16, torch.bfloat16):
        zh = z.to(half).requires_grad_()
        out = loss(zh, y)
        assert out.shape == (7,) and out.dtype == torch.float32  # computed in float32
        torch.testing.assert_close(out, loss(zh.detach().float(), y))
        out.sum().backward()
        assert zh.grad is not None and zh.grad.dtype == half
    # int32 labels work like int64 ones; an empty batch gives an empty result.
    torch.testing.assert_close(loss(z, y.int()), out64)
    assert loss(z[:0], y[:0]).shape == (0,)


def test_buffers_move_with_the_module() -> None:
    expected = {
        "ldam": {"margins", "drw_weights"},
        "la": {"log_prior"},
        "balanced-softmax": {"log_counts"},
        "vs": {"scale", "log_prior"},
    }
    for name, buffers in expected.items():
        loss = build_loss(name, COUNTS)
        assert set(dict(loss.named_buffers())) == buffers
        assert buffers <= set(loss.state_dict())
        assert all(b.dtype == torch.float64 for b in loss.to(torch.float64).buffers())
    weighted = CrossEntropy(weight=[1.0, 2.0, 3.0])
    assert set(dict(weighted.named_buffers())) == {"weight"}


def test_label_values_are_not_read_off_the_cpu() -> None:
    # On an accelerator the label-range check is skipped to avoid a device synchronisation. The meta
    # device has no data at all, so any read of the labels' values would raise here.
    for name in available_losses():
        loss = build_loss(name, COUNTS).to("meta")
        loss.set_epoch(LDAM_DRW_EPOCH)
        z = torch.empty(4, 3, device="meta", dtype=torch.float32)
        out = loss(z, torch.empty(4, dtype=torch.long, device="meta"))
        assert out.shape == (4,) and out.device.type == "meta"


def test_inputs_are_not_modified() -> None:
    z, y = random_batch()
    z_copy, y_copy = z.clone(), y.clone()
    for name in available_losses():
        build_loss(name, COUNTS)(z, y)
    assert torch.equal(z, z_copy) and torch.equal(y, y_copy)


# ---------------------------------------------------------------- construction and validation


def test_build_loss_names_and_classes() -> None:
    assert available_losses() == sorted(
        [
            "ce",
            "ldam",
            "ldam-drw",
            "la",
            "logit-adjusted",
            "balanced-softmax",
            "vs",
            "smoothed-ce",
            "bisam-ce",
        ]
    )
    kinds = {
        "ce": CrossEntropy,
        "ldam": LDAM,
        "ldam-drw": LDAM,
        "la": LogitAdjusted,
        "logit-adjusted": LogitAdjusted,
        "balanced-softmax": BalancedSoftmax,
        "vs": VSLoss,
        "smoothed-ce": SmoothedCrossEntropy,
        "bisam-ce": SmoothedCrossEntropy,
    }
    for name, kind in kinds.items():
        loss = build_loss(name, COUNTS)
        assert type(loss) is kind and isinstance(loss, PerSampleLoss)
    assert isinstance(build_loss("CE"), CrossEntropy)
    assert build_loss("vs", COUNTS, gamma=0.1, tau=0.9).gamma == 0.1
    assert build_loss("ce", label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValueError, match="valid names: .*balanced-softmax"):
        build_loss("focal", COUNTS)


def test_counts_accept_arrays_and_tensors() -> None:
    z, y = random_batch()
    reference = VSLoss(COUNTS)(z, y)
    for counts in (np.array(COUNTS), torch.tensor(COUNTS), tuple(COUNTS), np.array(COUNTS, float)):
        torch.testing.assert_close(VSLoss(counts)(z, y), reference)


def test_missing_counts_names_the_loss() -> None:
    for name in ("ldam", "ldam-drw", "la", "logit-adjusted", "balanced-softmax", "vs"):
        with pytest.raises(ValueError, match=f"'{name}' needs class_counts"):
            build_loss(name)
    with pytest.raises(ValueError, match="LDAM needs class_counts"):
        LDAM(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "counts, message",
    [
        ([10, 0, 3], "must be >= 1"),
        ([10, -2], "must be >= 1"),
        ([10, 2.5], "integers"),
        ([], "empty"),
    ],
)
def test_invalid_counts(counts: list, message: str) -> None:
    for name in ("ldam", "la", "balanced-softmax", "vs"):
        with pytest.raises(ValueError, match=message):
            build_loss(name, counts)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("la", {"tau": -1.0}),
        ("la", {"tau": float("nan")}),
        ("vs", {"tau": -0.1}),
        ("vs", {"gamma": -0.2}),
        ("ldam", {"s": 0.0}),
        ("ldam", {"max_m": -0.5}),
        ("ldam", {"beta": 1.0}),
        ("ldam", {"beta": -0.1}),
        ("ldam", {"drw_epoch": -1}),
        ("ldam", {"drw_epoch": 1.5}),
        ("ce", {"label_smoothing": 1.5}),
        ("ce", {"label_smoothing": -0.1}),
        ("ce", {"weight": [1.0, -1.0]}),
    ],
)
def test_invalid_options(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_loss(name, COUNTS, **kwargs)


def test_label_range_checked_on_cpu() -> None:
    z, _ = random_batch(batch=3)
    for name in available_losses():
        loss = build_loss(name, COUNTS)
        for bad in ([0, 1, 3], [-1, 0, 1], [0, -100, 2]):
            with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
                loss(z, torch.tensor(bad))


def test_shape_and_dtype_checks() -> None:
    z, y = random_batch(batch=4)
    for name in ("ldam", "la", "balanced-softmax", "vs"):
        loss = build_loss(name, COUNTS)
        with pytest.raises(ValueError, match="built for 3 classes but the logits have 4"):
            loss(torch.randn(4, 4), y)
    loss = CrossEntropy()
    with pytest.raises(ValueError, match="shape"):
        loss(z, y[:3])
    with pytest.raises(ValueError, match=r"shape \(B, C\)"):
        loss(z[0], y)
    with pytest.raises(ValueError, match="integer class labels"):
        loss(z, y.double())
    with pytest.raises(ValueError, match="floating point"):
        loss(z.long(), y)
    with pytest.raises(ValueError, match="built for 3 classes"):
        CrossEntropy(weight=[1.0, 1.0, 1.0])(torch.randn(4, 5), y)


def test_matches_torch_cross_entropy_on_a_bigger_batch() -> None:
    # A sanity check of the whole pipeline against torch's own cross-entropy with shifted logits.
    counts = [500, 200, 80, 30, 12, 5]
    z, y = random_batch(batch=64, classes=6, seed=3)
    log_pi = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts))
    torch.testing.assert_close(
        LogitAdjusted(counts, tau=1.0)(z, y),
        F.cross_entropy(z + log_pi, y, reduction="none"),
        rtol=1e-6,
        atol=1e-6,
    )
