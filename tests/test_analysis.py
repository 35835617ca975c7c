"""samkit.analysis against exact answers: dense Hessians of tiny float64 models, quadratics with a
known spectrum, closed-form sharpness, and the no-side-effect contract."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import samkit.analysis as sa
from samkit.data import BatchLoader

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest and immune to contention on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)  # 43 parameters


def tiny_bn(seed: int = 0) -> nn.Module:
    """53 parameters; running statistics made non-trivial by a few train-mode forwards."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 4, dtype=DT) * 2 + 1)
    return model


def batch(n: int = 24, seed: int = 1, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.arange(n) % classes
    return x, y


class Quadratic(nn.Module):
    """Per-sample loss ``l_b = 0.5 (w - x_b)^T A (w - x_b)`` (with ``loss_fn = lambda out, y: out``):
    the mean loss has Hessian ``A`` and gradient ``A (w - mean x)``."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.w - x
        return 0.5 * ((d @ self.a) * d).sum(dim=1)


def identity_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return out


def known_spectrum(n: int = 30, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    lam = np.concatenate([[-2.0, -1.2], np.linspace(-0.5, 1.5, n - 4), [4.0, 6.0]])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    a = q @ torch.diag(torch.as_tensor(lam, dtype=DT)) @ q.T
    return 0.5 * (a + a.T), np.sort(lam)


def quadratic_problem(n: int = 30) -> tuple[Quadratic, torch.Tensor, torch.Tensor, np.ndarray]:
    a, lam = known_spectrum(n)
    g = torch.Generator().manual_seed(3)
    model = Quadratic(a, torch.randn(n, generator=g, dtype=DT))
    x = torch.randn(12, n, generator=g, dtype=DT)
    y = torch.arange(12) % 3
    return model, x, y, lam


def exact_hessian(
    model: nn.Module,
    loss_fn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    denominator: float | None = None,
    batch_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian and gradient of (1/D) sum_b a_b l_b by torch.autograd.functional on flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    a = torch.ones(x.shape[0], dtype=DT) if weights is None else weights
    d = float(x.shape[0]) if denominator is None else denominator

    def f(flat: torch.Tensor) -> torch.Tensor:
        tensors = {
            n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes, strict=True)
        }
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        if batch_stats:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.training = True
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        try:
            out = functional_call(model, {**tensors, **buffers}, (x,))
        finally:
            for m, flag in flags:
                m.training = flag
        return (loss_fn(out, y) * a).sum() / d

    w = torch.cat([p.reshape(-1) for p in params])
    hess = torch.autograd.functional.hessian(f, w)
    grad = torch.autograd.functional.jacobian(f, w)
    return hess, grad


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
    }


def assert_untouched(model: nn.Module, snap: dict) -> None:
    state = model.state_dict(keep_vars=True)
    assert set(state) == set(snap["state"])
    for k, v in state.items():
        assert id(v) == snap["ids"][k], k  # the same tensor objects ...
        assert torch.equal(v, snap["state"][k]), k  # ... holding the same values
        assert v.dtype == snap["state"][k].dtype
    for p, g in zip(model.parameters(), snap["grads"], strict=True):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == snap["flags"]


# ----------------------------------------------------------------------------------------------------
# Hessian-vector products


@pytest.mark.parametrize("batch_stats", [False, True])
@pytest.mark.parametrize("cache_graph", [True, False])
def test_hvp_equals_exact_hessian(batch_stats: bool, cache_graph: bool) -> None:
    model = tiny_bn()
    x, y = batch()
    op = sa.HessianOperator(model, ce, (x, y), batch_stats=batch_stats, cache_graph=cache_graph)
    hess, grad = exact_hessian(model, ce, x, y, batch_stats=batch_stats)
    assert op.dim == 53 and op.dtype == DT
    torch.testing.assert_close(sa.dense_hessian(op), hess, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.dim, dtype=DT)
    hv = op(op.unflatten(v))  # the list form
    torch.testing.assert_close(op.flatten(hv), hess @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.flatten(op.gradient()), grad, rtol=1e-10, atol=1e-12)
    assert op.num_hvps == op.dim + 1


def test_hvp_weights_normalisation_subset_and_functional_form() -> None:
    model = tiny_mlp()
    x, y = batch()
    a = (y == 2).to(DT)
    op = sa.HessianOperator(model, ce, (x, y), weights=sa.class_weights([2]), normalize="weights")
    hess, grad = exact_hessian(model, ce, x, y, weights=a, denominator=float(a.sum()))
    torch.testing.assert_close(sa.dense_hessian(op), hess, rtol=1e-10, atol=1e-12)
    share = sa.HessianOperator(model, ce, (x, y), weights=a)  # a tensor, "batch" share
    torch.testing.assert_close(
        sa.dense_hessian(share), hess * float(a.sum()) / x.shape[0], rtol=1e-10, atol=1e-12
    )
    # a subset of the parameters: the corresponding block of the Hessian
    head = list(model[2].parameters())
    block = sa.HessianOperator(model, ce, (x, y), params=head)
    full, _ = exact_hessian(model, ce, x, y)
    torch.testing.assert_close(sa.dense_hessian(block), full[25:, 25:], rtol=1e-10, atol=1e-12)
    v = [torch.randn_like(p) for p in head]
    out = sa.hvp(model, ce, (x, y), v, params=head)
    torch.testing.assert_close(
        torch.cat([o.reshape(-1) for o in out]), block.matvec(block.flatten(v))
    )


def test_hvp_over_a_loader_equals_the_whole_batch_and_leaves_the_loader() -> None:
    model = tiny_bn()
    x, y = batch(30)
    whole = sa.dense_hessian(sa.HessianOperator(model, ce, (x, y)))
    chunks = [(x[:10], y[:10]), (x[10:25], y[10:25]), (x[25:], y[25:])]
    torch.testing.assert_close(sa.dense_hessian(sa.HessianOperator(model, ce, chunks)), whole)
    loader = BatchLoader(x, y, 8, shuffle=True, seed=5)
    next(iter(loader))  # mid-epoch: the operator must replay the same batches and leave it here
    state = loader.state_dict()
    op = sa.HessianOperator(model, ce, loader)
    remaining = [(bx.to(DT), by) for bx, by in BatchLoader(x, y, 8, shuffle=True, seed=5)][1:]
    ref = sa.dense_hessian(sa.HessianOperator(model, ce, remaining))
    torch.testing.assert_close(sa.dense_hessian(op), ref)
    assert loader.state_dict() == state
    # one-shot iterators are materialised once
    gen_op = sa.HessianOperator(model, ce, (c for c in chunks))
    torch.testing.assert_close(sa.dense_hessian(gen_op), whole)


def test_cached_operator_follows_in_place_weight_changes() -> None:
    model = tiny_mlp()
    x, y = batch()
    op = sa.HessianOperator(model, ce, (x, y))
    v = torch.randn(op.dim, dtype=DT)
    op.matvec(v)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    hess, grad = exact_hessian(model, ce, x, y)
    torch.testing.assert_close(op.matvec(v), hess @ v)
    torch.testing.assert_close(op.flatten(op.gradient()), grad)


def test_operator_errors() -> None:
    model = tiny_mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="normalize"):
        sa.HessianOperator(model, ce, (x, y), normalize="mean")
    with pytest.raises(ValueError, match="parameters of the model"):
        sa.HessianOperator(model, ce, (x, y), params=[nn.Parameter(torch.zeros(2, dtype=DT))])
    with pytest.raises(ValueError, match="one loss per sample"):
        sa.HessianOperator(model, lambda o, t: ce(o, t).mean(), (x, y))
    with pytest.raises(ValueError, match="sum to zero"):
        sa.HessianOperator(model, ce, (x, y), weights=sa.class_weights([7]), normalize="weights")
    with pytest.raises(ValueError, match="single batch"):
        sa.HessianOperator(model, ce, [(x, y)], weights=torch.ones(24, dtype=DT))


# ----------------------------------------------------------------------------------------------------
# Estimators on exact Hessians


def test_trace_estimators_within_their_error() -> None:
    model = tiny_bn()
    x, y = batch()
    op = sa.HessianOperator(model, ce, (x, y))
    exact = float(torch.trace(exact_hessian(model, ce, x, y)[0]))
    hutch = sa.hutchinson_trace(op, rtol=0.0, min_probes=400, max_probes=400, generator=0)
    assert hutch.num_hvps == 400 and hutch.samples.shape == (400,)
    assert hutch.stderr < 0.1 * abs(exact)  # the check below is meaningful
    assert abs(hutch.estimate - exact) <= 4 * hutch.stderr
    pp = sa.hutchpp_trace(op, 45, generator=0)
    assert pp.num_hvps == 45 and pp.samples.shape == (15,)
    assert pp.stderr < 0.1 * abs(exact)
    assert abs(pp.estimate - exact) <= 4 * pp.stderr
    adaptive = sa.hutchinson_trace(op, rtol=0.05, max_probes=2000, generator=1)
    assert adaptive.converged and 10 <= adaptive.num_hvps < 2000
    assert adaptive.relative_stderr <= 0.05
    assert abs(adaptive.estimate - exact) <= 4 * adaptive.stderr
    # reproducible with a seed, different with another
    again = sa.hutchinson_trace(op, rtol=0.0, min_probes=400, max_probes=400, generator=0)
    assert again.estimate == hutch.estimate
    other = sa.hutchinson_trace(op, rtol=0.0, min_probes=400, max_probes=400, generator=9)
    assert other.estimate != hutch.estimate


@pytest.mark.parametrize("batch_stats", [False, True])
def test_lanczos_extreme_eigenvalues_exact_with_full_krylov_space(batch_stats: bool) -> None:
    model = tiny_bn()
    x, y = batch()
    op = sa.HessianOperator(model, ce, (x, y), batch_stats=batch_stats)
    exact = np.linalg.eigvalsh(exact_hessian(model, ce, x, y, batch_stats=batch_stats)[0].numpy())
    assert exact[0] < 0 < exact[-1]  # an indefinite Hessian: both ends matter
    eig = sa.extreme_eigenvalues(op, 3, max_steps=op.dim, tol=0.0, generator=0)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(eig.top, exact[::-1][:3], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(eig.bottom, exact[:3], rtol=0, atol=1e-6 * scale)
    assert eig.converged and eig.num_hvps <= op.dim
    # vectors and exact residuals
    eig = sa.extreme_eigenvalues(
        op, 1, tol=1e-8, generator=0, return_eigenvectors=True, exact_residuals=True
    )
    assert eig.residual_kind == "exact"
    assert eig.top_vectors is not None and eig.top_vectors.shape == (1, op.dim)
    u = eig.top_vectors[0]
    assert abs(float(u.norm()) - 1) < 1e-10
    r = float((op.matvec(u) - eig.lambda_max * u).norm())
    assert r == pytest.approx(float(eig.top_residuals[0]), abs=1e-12)
    assert abs(eig.lambda_max - exact[-1]) <= max(float(eig.top_residuals[0]), 1e-9 * scale)


def test_slq_weights_and_first_moment() -> None:
    model = tiny_bn()
    x, y = batch()
    op = sa.HessianOperator(model, ce, (x, y))
    hess = exact_hessian(model, ce, x, y)[0]
    exact_eigs = np.linalg.eigvalsh(hess.numpy())
    dens = sa.spectral_density(op, num_probes=40, num_steps=12, generator=0)
    assert len(dens.nodes) == 40 and dens.num_hvps == 40 * 12
    for w in dens.weights:
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert (w >= 0).all()
    assert dens.moment(1) * op.dim == pytest.approx(dens.trace, rel=1e-12)
    exact_trace = float(torch.trace(hess))
    assert abs(dens.trace - exact_trace) <= 4 * dens.trace_stderr
    assert dens.trace_stderr < 0.15 * abs(exact_trace)
    # the second moment tr(H^2)/dim is also a quadrature moment (exact per probe for m >= 2)
    exact_m2 = float((exact_eigs**2).mean())
    m2 = np.array([np.sum(t * th**2) for th, t in zip(dens.nodes, dens.weights, strict=True)])
    assert abs(m2.mean() - exact_m2) <= 4 * m2.std(ddof=1) / math.sqrt(m2.size)
    # the broadened density integrates to ~1 and covers the spectrum's ends
    assert np.trapezoid(dens.density, dens.grid) == pytest.approx(1.0, abs=1e-3)
    assert dens.grid[0] < exact_eigs[0] and dens.grid[-1] > exact_eigs[-1]


def test_quadratic_with_known_spectrum() -> None:
    model, x, y, lam = quadratic_problem()
    n = lam.size
    op = sa.HessianOperator(model, identity_loss, (x, y))
    torch.testing.assert_close(sa.dense_hessian(op), model.a)
    exact_trace = lam.sum()
    pp = sa.hutchpp_trace(op, 3 * n, generator=0)  # a sketch of rank n captures everything
    assert pp.estimate == pytest.approx(exact_trace, abs=1e-9)
    hutch = sa.hutchinson_trace(op, rtol=0.0, min_probes=300, max_probes=300, generator=0)
    assert abs(hutch.estimate - exact_trace) <= 4 * hutch.stderr
    eig = sa.extreme_eigenvalues(op, 2, tol=1e-10, max_steps=n, generator=0)
    np.testing.assert_allclose(eig.top, [6.0, 4.0], atol=1e-8)
    np.testing.assert_allclose(eig.bottom, [-2.0, -1.2], atol=1e-8)
    dens = sa.spectral_density(op, num_probes=2, num_steps=n, generator=0)
    for theta in dens.nodes:  # a full Krylov space: the nodes are the eigenvalues
        np.testing.assert_allclose(np.sort(theta), lam, atol=1e-8)
    # saddle indicators of one group holding every class: the Hessian is A itself
    ind = sa.saddle_indicators(
        model, identity_loss, (x, y), {"all": [0, 1, 2], "none": [7]}, tol=1e-10, generator=0
    )
    s = ind["all"]
    assert s.count == 12 and s.lambda_min == pytest.approx(-2.0, abs=1e-8)
    assert s.lambda_min2 == pytest.approx(-1.2, abs=1e-8)
    assert s.bottom_gap == pytest.approx(0.8, abs=1e-8)
    assert s.top_gap == pytest.approx(2.0, abs=1e-8)
    assert s.negative_ratio == pytest.approx(2.0 / 6.0, abs=1e-8)
    assert ind["none"].count == 0 and math.isnan(ind["none"].lambda_min)
    # the normalised trace: tr(A) / ||A (w - mean x)||
    nt = sa.normalized_trace(model, identity_loss, (x, y), method="hutch++", num_hvps=3 * n)
    grad = model.a @ (model.w.detach() - x.mean(0))
    assert nt.grad_norm == pytest.approx(float(grad.norm()), rel=1e-12)
    assert nt.value == pytest.approx(exact_trace / float(grad.norm()), rel=1e-9)
    assert nt.stderr == pytest.approx(nt.trace.stderr / nt.grad_norm)


def test_matrix_operator_and_estimator_arguments() -> None:
    a, lam = known_spectrum(12)
    op = sa.MatrixOperator(a)
    run = sa.lanczos(op, 12, generator=0)
    assert run.basis is not None
    torch.testing.assert_close(run.basis @ run.basis.T, torch.eye(12, dtype=DT), atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.linalg.eigvalsh(run.tridiagonal()), lam, atol=1e-10)
    assert op.num_hvps == 12
    with pytest.raises(ValueError):
        sa.hutchpp_trace(op, 3)
    with pytest.raises(ValueError):
        sa.extreme_eigenvalues(op, which="middle")
    calls: list[tuple[int, int]] = []
    sa.hutchinson_trace(
        op, rtol=0, min_probes=5, max_probes=5, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(i, 5) for i in range(1, 6)]


# ----------------------------------------------------------------------------------------------------
# Sharpness


def test_class_sharpness_properties() -> None:
    model = tiny_mlp()
    x, y = batch(30)
    results = [sa.class_sharpness(model, ce, (x, y), rho=r) for r in (0.0, 0.02, 0.05, 0.1)]
    assert np.all(results[0].multi_step == 0) and np.all(np.abs(results[0].one_step) < 1e-15)
    for r in results:
        assert r.names == ["0", "1", "2"] and r.counts.tolist() == [10, 10, 10]
        assert np.all(r.one_step >= -1e-12)
        assert np.all(r.multi_step >= r.one_step)  # exactly, by construction
        assert np.all(r.multi_step >= 0)
        assert r.trajectory.shape == (3, 5) and np.all(r.trajectory[:, 0] == r.one_step)
    multi = np.stack([r.multi_step for r in results])
    one = np.stack([r.one_step for r in results])
    assert np.all(np.diff(multi, axis=0) > 0) and np.all(np.diff(one, axis=0) > 0)
    # the class shares add up to the whole loss at w
    whole = float(ce(model(x), y).mean().detach())
    assert results[1].loss.sum() == pytest.approx(whole, rel=1e-12)
    # "group" normalisation: the class mean; for one-step this rescales exactly by N / N_i
    mean = sa.class_sharpness(model, ce, (x, y), rho=0.05, normalize="group")
    np.testing.assert_allclose(mean.one_step, results[2].one_step * 3, rtol=1e-9)
    # an absent class is undefined, not zero
    absent = sa.class_sharpness(model, ce, (x, y), num_classes=4, rho=0.05, steps=2)
    assert absent.counts[3] == 0 and math.isnan(absent.multi_step[3])
    np.testing.assert_allclose(absent.one_step[:3], results[2].one_step, rtol=1e-12)


def test_one_step_sharpness_matches_the_closed_form_on_a_quadratic() -> None:
    model, x, y, lam = quadratic_problem()
    rho, n_total = 0.3, x.shape[0]
    res = sa.class_sharpness(model, identity_loss, (x, y), rho=rho, steps=8)
    a, w = model.a, model.w.detach()
    for i in range(3):
        xi = x[y == i]
        grad = a @ (w - xi).sum(0) / n_total  # gradient of the class share (1/N) sum_{b in i} l_b
        hess = a * xi.shape[0] / n_total
        e = rho * grad / (grad.norm() + 1e-12)
        closed = float(grad @ e + 0.5 * e @ hess @ e)
        assert res.one_step[i] == pytest.approx(closed, rel=1e-10)
        # the multi-step value lies between the one-step value and an upper bound of the maximum
        bound = rho * float(grad.norm()) + 0.5 * rho**2 * max(lam.max(), 0) * xi.shape[0] / n_total
        assert res.one_step[i] <= res.multi_step[i] <= bound + 1e-12
        assert res.grad_norm[i] == pytest.approx(float(grad.norm()), rel=1e-12)


def test_group_sharpness_and_group_helpers() -> None:
    counts = [5000, 2000, 800, 300, 120, 50]
    assert sa.head_tail_groups(counts, eta=300) == {"head": [0, 1, 2, 3], "tail": [4, 5]}
    assert sa.shot_class_groups(counts, many=1000, few=200) == {
        "many": [0, 1],
        "medium": [2, 3],
        "few": [4, 5],
    }
    assert sa.class_groups(2) == {"0": [0], "1": [1]}
    model = tiny_bn()
    x, y = batch(30)
    groups = {"head": [0, 1], "tail": [2]}
    res = sa.group_sharpness(model, ce, [(x[:16], y[:16]), (x[16:], y[16:])], groups, rho=0.05)
    assert res.names == ["head", "tail"] and res.counts.tolist() == [20, 10]
    whole = sa.group_sharpness(model, ce, (x, y), groups, rho=0.05)  # eval mode: same loss
    np.testing.assert_allclose(res.multi_step, whole.multi_step, rtol=1e-10)
    assert res.to_dict()["names"] == ["head", "tail"]
    with pytest.raises(ValueError, match="steps"):
        sa.group_sharpness(model, ce, (x, y), groups, steps=0)


# ----------------------------------------------------------------------------------------------------
# No side effects


def _every_entry_point(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: bool) -> list:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    groups = {"head": [0, 1], "tail": [2]}
    return [
        lambda: sa.dense_hessian(sa.HessianOperator(model, ce, (x, y), batch_stats=bs)),
        lambda: sa.hvp(model, ce, [(x, y)], [torch.ones_like(p) for p in model.parameters()]),
        lambda: sa.HessianOperator(model, ce, (x, y), batch_stats=bs, cache_graph=False).gradient(),
        lambda: sa.hutchinson_trace(
            sa.HessianOperator(model, ce, (x, y), batch_stats=bs), max_probes=12
        ),
        lambda: sa.hutchpp_trace(sa.HessianOperator(model, ce, (x, y), batch_stats=bs), 9),
        lambda: sa.extreme_eigenvalues(sa.HessianOperator(model, ce, (x, y), batch_stats=bs), 2),
        lambda: sa.spectral_density(sa.HessianOperator(model, ce, (x, y), batch_stats=bs), 2, 8),
        lambda: sa.class_sharpness(model, ce, (x, y), rho=0.1, steps=3, batch_stats=bs),
        lambda: sa.normalized_trace(model, ce, (x, y), batch_stats=bs, max_probes=10),
        lambda: sa.saddle_indicators(model, ce, (x, y), groups, max_steps=10, batch_stats=bs),
        lambda: sa.slice_1d(model, ce, (x, y), alphas=[-1, 0, 1], batch_stats=bs),
        lambda: sa.slice_2d(model, ce, (x, y), alphas=[-1, 1], batch_stats=bs),
        lambda: sa.interpolation_slice(model, ce, (x, y), model, other, ts=[0, 1], batch_stats=bs),
    ]


@pytest.mark.parametrize("batch_stats", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_no_side_effects(batch_stats: bool, mode: str) -> None:
    model = tiny_bn()
    x, y = batch()
    model.train(mode != "eval")
    if mode == "mixed":
        model[1].eval()  # a frozen BatchNorm inside a training model
    ce(model(x), y).sum().backward()  # .grad holds something
    model[2].zero_grad()  # and a parameter-less module; the last layer keeps its grads
    snap = snapshot(model)
    for call in _every_entry_point(model, x, y, batch_stats):
        call()
        assert_untouched(model, snap)


def test_no_side_effects_without_grads_and_with_a_samkit_model() -> None:
    from samkit.models import build_model

    model = build_model("small-cnn", 3, in_channels=1, channels=(2, 2), hidden=None, pool="avg")
    model = model.to(DT).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=DT)
    y = torch.arange(6) % 3
    snap = snapshot(model)
    op = sa.HessianOperator(model, ce, (x, y), batch_stats=True)
    sa.extreme_eigenvalues(op, 1, max_steps=5)
    sa.class_sharpness(model, ce, (x, y), steps=2, batch_stats=True)
    sa.slice_1d(model, ce, (x, y), alphas=[0.5])
    assert_untouched(model, snap)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Landscape


def test_filter_normalised_direction() -> None:
    model = tiny_bn()
    d = sa.filter_normalized_direction(model, generator=0)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.count_nonzero(d[name]) == 0
        else:
            torch.testing.assert_close(d[name].norm(dim=1), p.detach().norm(dim=1))
    keep = sa.filter_normalized_direction(model, generator=0, bias_bn="keep")
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert float(keep[name].norm()) == pytest.approx(float(p.detach().norm()), rel=1e-8)
    again = sa.filter_normalized_direction(model, generator=0)
    assert all(torch.equal(d[k], again[k]) for k in d)


def test_slices_against_direct_evaluation() -> None:
    model, x, y, _ = quadratic_problem(8)
    w = model.w.detach()
    d = {"w": torch.linspace(-1, 1, 8, dtype=DT)}
    s1 = sa.slice_1d(model, identity_loss, (x, y), d, alphas=[-0.5, 0.0, 0.25])

    def loss_at(v: torch.Tensor) -> float:
        diff = v - x
        return float((0.5 * ((diff @ model.a) * diff).sum(1)).mean())

    for a, value in zip(s1.coords, s1.loss, strict=True):
        assert value == pytest.approx(loss_at(w + a * d["w"]), rel=1e-12)
    assert np.all(np.isnan(s1.accuracy))  # outputs are not class logits
    d2 = {"w": torch.ones(8, dtype=DT)}
    s2 = sa.slice_2d(model, identity_loss, (x, y), (d, d2), alphas=[-1, 0, 1], betas=[0, 2])
    assert s2.loss.shape == (3, 2)
    assert s2.loss[2, 1] == pytest.approx(loss_at(w + d["w"] + 2 * d2["w"]), rel=1e-12)
    # interpolation between two state dicts: the end points are the two models
    net = tiny_bn()
    xb, yb = batch()
    other = tiny_bn(seed=5)
    line = sa.interpolation_slice(net, ce, (xb, yb), net.state_dict(), other, ts=[0.0, 0.5, 1.0])
    with torch.no_grad():
        ends = [float(ce(m.eval()(xb), yb).mean()) for m in (copy.deepcopy(net), other)]
        acc_end = float((other(xb).argmax(1) == yb).to(DT).mean())
    assert line.loss[0] == pytest.approx(ends[0], rel=1e-12)
    assert line.loss[2] == pytest.approx(ends[1], rel=1e-12)
    assert line.accuracy[2] == pytest.approx(acc_end)
    # a random 2D slice is centred on the model's loss
    s = sa.slice_2d(net, ce, (xb, yb), alphas=[-0.5, 0.0, 0.5], generator=1)
    assert s.loss[1, 1] == pytest.approx(ends[0], rel=1e-12)
    # a class-weighted slice: mean over all samples of the class-0 terms, accuracy on class 0
    s0 = sa.slice_1d(net, ce, (xb, yb), alphas=[0.0], weights=sa.class_weights([0]))
    with torch.no_grad():
        ref = copy.deepcopy(net).eval()
        out = ref(xb)
        loss0 = float((ce(out, yb) * (yb == 0)).sum() / xb.shape[0])
        acc0 = float((out.argmax(1) == yb)[yb == 0].to(DT).mean())
    assert s0.loss[0] == pytest.approx(loss0, rel=1e-12)
    assert s0.accuracy[0] == pytest.approx(acc0)


# ----------------------------------------------------------------------------------------------------
# Plots


def test_plots_write_pngs(tmp_path) -> None:
    model = tiny_bn()
    x, y = batch()
    op = sa.HessianOperator(model, ce, (x, y))
    dens = sa.spectral_density(op, 2, 10, generator=0)
    eig = sa.extreme_eigenvalues(op, 1, generator=0)
    sharp = sa.class_sharpness(model, ce, (x, y), steps=2)
    s1 = sa.slice_1d(model, ce, (x, y), alphas=[-1, 0, 1])
    s2 = sa.slice_2d(model, ce, (x, y), alphas=[-1, 0, 1])
    paths = [
        sa.plot_spectrum(dens, tmp_path / "spectrum.png", eigen=eig),
        sa.plot_sharpness_vs_count(sharp, [500, 50, 5], tmp_path / "sharpness.png"),
        sa.plot_slice_1d(s1, tmp_path / "slice1d.png"),
        sa.plot_slice_2d(s2, tmp_path / "sub" / "slice2d.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        sa.plot_sharpness_vs_count(sharp, [1, 2], tmp_path / "bad.png")
