"""samkit's SAM, ASAM, GSAM, LookSAM and Friendly-SAM against pytorch_optimizer 4.1, step for step.

Two copies of one float64 model (tests/optim_helpers.py: an MLP, and a conv net with BatchNorm) are
stepped on the same batches, one by samkit (``opt.step(lambda: model(x), y)``: per-sample
cross-entropy averaged over the batch) and one by pytorch_optimizer (mean ``F.cross_entropy``, driven
through first_step/second_step or GSAM's set_closure/step as its docs and
benchmarks/step_time.py's reference_steps() do), both with torch.optim.SGD (momentum 0.9, weight
decay 1e-3) as the base. The whole state (weights and BatchNorm buffers; for GSAM all but
num_batches_tracked) must agree after every step to atol 1e-10 / rtol 1e-8, and the weights must
have moved. Each comparison is shown to be sensitive: changing one hyperparameter on samkit's side
breaks the agreement exactly at the first step where that hyperparameter enters.

pytorch_optimizer takes its global gradient norm in float32 even for float64 gradients; an autouse
fixture patches it to float64, so that the runs agree to rounding (about 1e-16). LookSAM agrees
only on a one-tensor model, with samkit's reuse eps patched to pytorch_optimizer's 1e-8.

Where the two differ (the float32 norm, per-tensor LookSAM and its reuse eps, ASAM's eta, GSAM's
BatchNorm counter, a default or a range), a test named
test_<method>_differs_from_pytorch_optimizer_in_<what> asserts the difference exactly.
pytorch_optimizer 4.1.0's formulas (optimizer/sam.py), for reference:

- SAM: e = rho g / (||g|| + 1e-12); adaptive: e = rho w^2 g / (||w g|| + 1e-12) (no eta).
- GSAM: e = rho_t g / (||g|| + 1e-12), rho_t from ProportionScheduler (the same linear map of lr as
  samkit's); d = g_p - alpha (g - c ||g|| g_p / (||g_p|| + 1e-12)), c = <g, g_p> / (||g|| ||g_p||
  + 1e-12); BatchNorm momentum set to 0 for the perturbed pass.
- LookSAM: per parameter tensor: g_v = g_s - <g_s, g> g / ||g||^2 (units clamped at 1e-12), and
  d = g + alpha ||g|| / (||g_v|| + 1e-8) g_v on reuse steps.
- FriendlySAM: step 0: m = g, d = g; then d = g - sigma m, m <- lmbda m + (1 - lmbda) g;
  e = rho d / (||d|| + 1e-12). No noise.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from optim_helpers import NUM_CLASSES, assert_same_model, batches, clone, make_model
from torch import Tensor, nn

import samkit.optim as so
import samkit.optim.looksam as samkit_looksam

INSTALL = "pip install 'pytorch_optimizer>=4.1'"
po = pytest.importorskip(
    "pytorch_optimizer", reason=f"pytorch_optimizer is not installed: {INSTALL}"
)
# the package has no __version__ (so importorskip's minversion cannot check it): ask its metadata,
# and make sure that the classes compared here are there
_VERSION = importlib.metadata.version("pytorch_optimizer")
_MISSING = [
    n
    for n in ("SAM", "GSAM", "LookSAM", "FriendlySAM", "ProportionScheduler")
    if not hasattr(po, n)
]
if _MISSING or tuple(int(v) for v in re.findall(r"\d+", _VERSION)[:2]) < (4, 1):
    pytest.skip(
        f"pytorch_optimizer {_VERSION} is older than 4.1 (lacks {', '.join(_MISSING) or 'nothing'})"
        f": {INSTALL}",
        allow_module_level=True,
    )

import pytorch_optimizer.optimizer.sam as po_sam_module  # noqa: E402

LR, MOMENTUM, WD = 0.05, 0.9, 1e-3
ATOL, RTOL = 1e-10, 1e-8
STEPS = 5

Step = Callable[[Tensor, Tensor], None]
Maker = Callable[[nn.Module], Step]


# ---- pytorch_optimizer's float32 global norm --------------------------------------------------

#: pytorch_optimizer 4.1.0's squared global gradient norm (SAM, LookSAM, FriendlySAM, GSAM): it
#: casts the per-tensor norms to float32 before squaring and summing, whatever the gradients' dtype
PO_NORM = po_sam_module.get_global_gradient_norm


def float64_norm(
    param_groups: list[dict[str, Any]] | None,
    device: torch.device | None = None,
    *,
    weight_adaptive: bool = False,
) -> Tensor:
    """PO_NORM's value (sum over tensors of ||g||^2, ||w g||^2 in adaptive groups) in the gradients'
    own dtype."""
    grads = []
    for group in param_groups or []:
        adaptive = weight_adaptive and group.get("adaptive", False)
        grads += [
            p.grad * p.abs() if adaptive else p.grad for p in group["params"] if p.grad is not None
        ]
    return torch.stack([g.norm() for g in grads]).square().sum().reshape(1)


@pytest.fixture(autouse=True)
def _float64_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every comparison runs pytorch_optimizer with its global norm in float64, so that float64 runs
    agree to rounding (test_sam_differs_from_pytorch_optimizer_in_norm_precision shows the
    float32 norm's effect)."""
    monkeypatch.setattr(po_sam_module, "get_global_gradient_norm", float64_norm)


# ---- drivers ------------------------------------------------------------------------------------


def samkit_maker(
    name: str,
    *,
    named: bool = False,
    freeze_stats: bool = False,
    lr_gamma: float | None = None,
    **kwargs: Any,
) -> Maker:
    """samkit's optimizer `name` with SGD(LR, MOMENTUM, WD); `named` passes named parameters,
    `freeze_stats` sets norm_stats="freeze", `lr_gamma` multiplies the lr by it after each step."""

    def make(model: nn.Module) -> Step:
        params = model.named_parameters() if named else model.parameters()
        extra: dict[str, Any] = {"norm_stats": "freeze", "model": model} if freeze_stats else {}
        opt = so.create(name, params, lr=LR, momentum=MOMENTUM, weight_decay=WD, **extra, **kwargs)
        sched = None if lr_gamma is None else torch.optim.lr_scheduler.StepLR(opt, 1, lr_gamma)

        def step(x: Tensor, y: Tensor) -> None:
            opt.step(lambda: model(x), y)
            if sched is not None:
                sched.step()

        return step

    return make


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _two_step(model: nn.Module, opt: Any) -> Step:
    """pytorch_optimizer's first_step/second_step protocol (SAM, FriendlySAM)."""

    def step(x: Tensor, y: Tensor) -> None:
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)

    return step


def _sgd_kwargs() -> dict[str, float]:
    return {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD}


def po_sam(rho: float = 0.05, adaptive: bool = False, authors_groups: bool = False) -> Maker:
    """pytorch_optimizer.SAM; `authors_groups`: adaptive only on parameters named *weight*."""

    def make(model: nn.Module) -> Step:
        params: Iterable[Any] = model.parameters()
        if authors_groups:
            named = list(model.named_parameters())
            params = [
                {"params": [p for n, p in named if "weight" in n], "adaptive": True},
                {"params": [p for n, p in named if "weight" not in n], "adaptive": False},
            ]
        opt = po.SAM(
            params, base_optimizer=torch.optim.SGD, rho=rho, adaptive=adaptive, **_sgd_kwargs()
        )
        return _two_step(model, opt)

    return make


def po_fsam(rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9) -> Maker:
    """pytorch_optimizer.FriendlySAM (its defaults: rho 0.05, sigma 1, lmbda 0.9)."""

    def make(model: nn.Module) -> Step:
        opt = po.FriendlySAM(
            model.parameters(),
            base_optimizer=torch.optim.SGD,
            rho=rho,
            sigma=sigma,
            lmbda=lmbda,
            **_sgd_kwargs(),
        )
        return _two_step(model, opt)

    return make


def po_looksam(rho: float, k: int, alpha: float) -> Maker:
    """pytorch_optimizer.LookSAM, the SAM pass only every k-th step (as reference_steps does)."""

    def make(model: nn.Module) -> Step:
        opt = po.LookSAM(
            model.parameters(),
            base_optimizer=torch.optim.SGD,
            rho=rho,
            k=k,
            alpha=alpha,
            **_sgd_kwargs(),
        )

        def step(x: Tensor, y: Tensor) -> None:
            _loss(model, x, y).backward()
            if opt.get_step() % k == 0:
                opt.first_step(zero_grad=True)
                _loss(model, x, y).backward()
            opt.second_step(zero_grad=True)

        return step

    return make


def po_gsam(rho: float, rho_min: float, alpha: float, lr_gamma: float | None = None) -> Maker:
    """pytorch_optimizer.GSAM with ProportionScheduler(lr in [0, LR] -> rho in [rho_min, rho]);
    `lr_gamma` None keeps the lr (and so rho_t) constant."""

    def make(model: nn.Module) -> Step:
        base = torch.optim.SGD(model.parameters(), **_sgd_kwargs())
        if lr_gamma is None:
            lr_sched = torch.optim.lr_scheduler.StepLR(base, step_size=10**9)
        else:
            lr_sched = torch.optim.lr_scheduler.StepLR(base, 1, lr_gamma)
        rho_sched = po.ProportionScheduler(
            lr_sched, max_lr=LR, min_lr=0.0, max_value=rho, min_value=rho_min
        )
        opt = po.GSAM(
            model.parameters(),
            base_optimizer=base,
            model=model,
            rho_scheduler=rho_sched,
            alpha=alpha,
        )

        def step(x: Tensor, y: Tensor) -> None:
            opt.set_closure(F.cross_entropy, x, y)
            opt.step()
            lr_sched.step()
            opt.update_rho_t()

        return step

    return make


# ---- comparison ---------------------------------------------------------------------------------


def linear_model(seed: int = 0) -> nn.Module:
    """A bias-free linear classifier: ONE parameter tensor, so per-tensor = whole-vector."""
    torch.manual_seed(seed)
    return nn.Linear(6, NUM_CLASSES, bias=False).double()


def _mismatch(a: nn.Module, b: nn.Module, ignore: tuple[str, ...] = ()) -> str | None:
    """The first state_dict entry where a and b differ beyond ATOL/RTOL (None: they agree)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if ignore and key.endswith(ignore):
            continue
        if not torch.allclose(sa[key].double(), sb[key].double(), atol=ATOL, rtol=RTOL):
            gap = (sa[key].double() - sb[key].double()).abs().max().item()
            return f"{key} (max abs difference {gap:.3g})"
    return None


def run_pair(
    kind: str, model: nn.Module, sk: Maker, ref: Maker, steps: int = STEPS
) -> tuple[nn.Module, nn.Module, list[tuple[int, nn.Module, nn.Module]]]:
    """Step a (samkit) and b (pytorch_optimizer), copies of model, on `steps` batches; returns
    a, b and, after each step, (t, snapshot of a, snapshot of b)."""
    a, b = model, clone(model)
    step_a, step_b = sk(a), ref(b)
    snaps = []
    for t, (x, y) in enumerate(batches(kind, steps)):
        step_a(x, y)
        step_b(x, y)
        snaps.append((t, clone(a), clone(b)))
    return a, b, snaps


def assert_lockstep(
    kind: str,
    sk: Maker,
    ref: Maker,
    steps: int = STEPS,
    model: nn.Module | None = None,
    ignore: tuple[str, ...] = (),
) -> None:
    """The two agree after every step (state_dict entries ending with `ignore` excepted), and the
    weights moved (so agreement is not that of two untouched models)."""
    model = make_model(kind) if model is None else model
    initial = clone(model)
    a, _, snaps = run_pair(kind, model, sk, ref, steps)
    for t, sa, sb in snaps:
        try:
            if ignore:
                diff = _mismatch(sa, sb, ignore)
                assert diff is None, diff
            else:
                assert_same_model(sa, sb, atol=ATOL, rtol=RTOL)
        except AssertionError as err:
            where = _mismatch(sa, sb, ignore)
            raise AssertionError(
                f"samkit and pytorch_optimizer differ after step {t}: {err}; {where}"
            ) from None
    moved = max(
        (p - q).abs().max().item()
        for p, q in zip(a.parameters(), initial.parameters(), strict=True)
    )
    assert moved > 1e-3, f"the weights barely moved ({moved:.3g}): the comparison proves nothing"


def first_mismatch(
    kind: str, sk: Maker, ref: Maker, steps: int = STEPS, model: nn.Module | None = None
) -> int | None:
    """The first step after which the two differ (None: never)."""
    model = make_model(kind) if model is None else model
    for t, sa, sb in run_pair(kind, model, sk, ref, steps)[2]:
        if _mismatch(sa, sb) is not None:
            return t
    return None


KINDS = ["mlp", "conv"]


# ---- SAM and ASAM -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sam_matches_pytorch_optimizer(kind: str) -> None:
    """SAM: e = rho g / (||g|| + 1e-12) on both sides; both let both passes update BatchNorm
    statistics (samkit's default norm_stats="update"; pytorch_optimizer leaves BN to the caller)."""
    assert_lockstep(kind, samkit_maker("sam", rho=0.1), po_sam(rho=0.1))


def test_sam_differs_from_pytorch_optimizer_in_norm_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pytorch_optimizer computes the global gradient norm of every ascent in float32, even for
    float64 gradients (get_global_gradient_norm: ``torch.stack(norms).float().square_().sum()``);
    samkit takes it in the gradients' dtype. So in float64 its ||g|| carries a float32 rounding
    (relative 6e-8) and the weights drift apart at that level (the tests above patch the norm to
    float64, under which they agree to about 1e-16)."""
    monkeypatch.setattr(po_sam_module, "get_global_gradient_norm", PO_NORM)
    model = make_model("conv")
    _loss(model, *batches("conv", 1)[0]).backward()
    groups = [{"params": list(model.parameters())}]
    norms = torch.stack([p.grad.norm() for p in model.parameters()])
    value = PO_NORM(groups)
    assert value.dtype == torch.float32
    assert torch.equal(value, norms.float().square().sum().reshape(1))
    assert value.double() != norms.square().sum()  # this batch's norm is not a float32 number
    a, b, _ = run_pair("conv", make_model("conv"), samkit_maker("sam", rho=0.1), po_sam(rho=0.1))
    gap = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert 1e-12 < gap < 1e-7, gap


def test_sam_defaults_match_pytorch_optimizer() -> None:
    """Both default rho to 0.05."""
    assert_lockstep("conv", samkit_maker("sam"), po_sam())


@pytest.mark.parametrize("kind", KINDS)
def test_asam_matches_pytorch_optimizer_adaptive_sam(kind: str) -> None:
    """ASAM with eta = 0 and unnamed parameters (every parameter scaled) is pytorch_optimizer's
    SAM(adaptive=True): e = rho w^2 g / (||w g|| + 1e-12)."""
    assert_lockstep(kind, samkit_maker("asam", rho=0.5, eta=0.0), po_sam(rho=0.5, adaptive=True))


def test_asam_named_parameters_match_pytorch_optimizer_per_group_adaptive() -> None:
    """With named parameters samkit scales only the parameters named *weight* (the ASAM authors'
    rule): pytorch_optimizer's SAM with adaptive=True on a group of those, False on the rest."""
    sk = samkit_maker("asam", named=True, rho=0.5, eta=0.0)
    assert_lockstep("conv", sk, po_sam(rho=0.5, adaptive=True, authors_groups=True))
    # and the rule matters: scaling every parameter (the unnamed form) is another step
    assert first_mismatch("conv", sk, po_sam(rho=0.5, adaptive=True), steps=1) == 0


def test_asam_differs_from_pytorch_optimizer_in_eta() -> None:
    """pytorch_optimizer's adaptive SAM has T_w = |w|; samkit's ASAM has T_w = |w| + eta with eta
    defaulting to 0.01, the ASAM authors' class default (SamsungLabs/ASAM; their CIFAR script and
    the popular PyTorch SAM use 0). They agree at eta = 0 (test above) and differ from step 0
    with the default eta; samkit's ASAM default rho (0.5, the paper's range) is 10x SAM's."""
    assert first_mismatch("mlp", samkit_maker("asam", rho=0.5), po_sam(0.5, adaptive=True)) == 0
    assert inspect.signature(so.ASAM.__init__).parameters["eta"].default == 0.01
    assert "eta" not in inspect.signature(po.SAM.__init__).parameters
    assert inspect.signature(so.ASAM.__init__).parameters["rho"].default == 0.5
    assert inspect.signature(po.SAM.__init__).parameters["rho"].default == 0.05


# ---- GSAM ---------------------------------------------------------------------------------------


def test_gsam_matches_pytorch_optimizer_constant_rho() -> None:
    """Constant lr, so rho_t = rho. The projections' eps differ in placement (samkit:
    <g, g_p> / (||g_p||^2 + 1e-12); pytorch_optimizer: c ||g|| / (||g_p|| + 1e-12) with
    c = <g, g_p> / (||g|| ||g_p|| + 1e-12)); with gradient norms far above 1e-6 that is far below
    the tolerance."""
    assert_lockstep(
        "mlp", samkit_maker("gsam", rho=0.1, alpha=0.3), po_gsam(rho=0.1, rho_min=0.1, alpha=0.3)
    )


def test_gsam_matches_pytorch_optimizer_rho_schedule() -> None:
    """lr halved after every step, rho_t = rho_min + (rho - rho_min) lr_t / lr_max on both sides
    (samkit reads the lr at the step; pytorch_optimizer's ProportionScheduler after update_rho_t)."""
    assert_lockstep(
        "mlp",
        samkit_maker("gsam", rho=0.1, rho_min=0.02, alpha=0.3, lr_gamma=0.5),
        po_gsam(rho=0.1, rho_min=0.02, alpha=0.3, lr_gamma=0.5),
    )


def test_gsam_matches_pytorch_optimizer_with_batchnorm() -> None:
    """pytorch_optimizer's GSAM sets BatchNorm momentum to 0 for the perturbed pass; samkit's
    norm_stats="freeze" restores the statistics after it: the weights and running mean and var
    agree (num_batches_tracked does not: see the next test)."""
    assert_lockstep(
        "conv",
        samkit_maker("gsam", freeze_stats=True, rho=0.1, rho_min=0.02, alpha=0.4, lr_gamma=0.7),
        po_gsam(rho=0.1, rho_min=0.02, alpha=0.4, lr_gamma=0.7),
        ignore=("num_batches_tracked",),
    )


def test_gsam_differs_from_pytorch_optimizer_in_num_batches_tracked() -> None:
    """pytorch_optimizer's BN bypass (momentum set to 0, davda54/sam's, as in the GSAM authors'
    util) leaves running mean and var untouched but still counts the perturbed pass in
    num_batches_tracked: 2 per step, against samkit's 1 under norm_stats="freeze" (which restores
    all three buffers, so the statistics see only clean passes). The counter is read only by
    BatchNorm(momentum=None), the cumulative average (factor 1 / num_batches_tracked): there the
    bypass's doubled count gives each later clean batch about half its weight. With samkit's
    default norm_stats="update" the perturbed pass also moves the running statistics."""
    for freeze in (True, False):
        a, b, _ = run_pair(
            "conv",
            make_model("conv"),
            samkit_maker("gsam", freeze_stats=freeze, rho=0.1, alpha=0.4),
            po_gsam(rho=0.1, rho_min=0.1, alpha=0.4),
        )
        assert b.body[1].num_batches_tracked.item() == 2 * STEPS  # both passes counted
        assert a.body[1].num_batches_tracked.item() == (STEPS if freeze else 2 * STEPS)
        # the weights agree either way (in training mode BatchNorm uses the batch statistics)
        assert (
            _mismatch(a, b, ignore=("running_mean", "running_var", "num_batches_tracked")) is None
        )
        same_stats = _mismatch(a, b, ignore=("num_batches_tracked",)) is None
        assert same_stats == freeze


# ---- LookSAM ------------------------------------------------------------------------------------


def test_looksam_matches_pytorch_optimizer_on_one_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a model with a single parameter tensor per-tensor decomposition (pytorch_optimizer) and
    whole-vector decomposition (samkit, the paper) are one. The reuse step's eps is samkit's
    1e-12 against pytorch_optimizer's 1e-8 (||g|| / (||g_v|| + eps)); it is set to 1e-8 here, so
    the agreement is to rounding. k = 3 over 8 steps: SAM steps 0, 3, 6, reuse steps between."""
    monkeypatch.setattr(samkit_looksam, "EPS", 1e-8)
    assert_lockstep(
        "mlp",
        samkit_maker("looksam", rho=0.3, k=3, alpha=0.7),
        po_looksam(rho=0.3, k=3, alpha=0.7),
        steps=8,
        model=linear_model(),
    )


def looksam_reuse_gap(
    kind: str, model: nn.Module, rho: float = 0.3, k: int = 3, alpha: float = 0.7
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Two steps of both LookSAMs from `model` (a SAM step, which must agree, then a reuse step).
    Returns, per parameter: the observed w_po - w_samkit after the reuse step, and that step's
    direction d by samkit's rule (whole vector, eps 1e-12) and by pytorch_optimizer's (per
    tensor, eps 1e-8), computed here by hand from autograd gradients. Both took the same base
    step (same w and momentum buffer) from the SAM step, so w_po - w_samkit = LR (d_sk - d_po)."""
    w0 = clone(model)
    (x0, y0), (x1, y1) = batches(kind, 2)
    a, b = model, clone(model)
    step_a = samkit_maker("looksam", rho=rho, k=k, alpha=alpha)(a)
    step_b = po_looksam(rho=rho, k=k, alpha=alpha)(b)
    step_a(x0, y0)
    step_b(x0, y0)
    assert _mismatch(a, b) is None  # the SAM step agrees
    w1 = clone(a)
    step_a(x1, y1)
    step_b(x1, y1)

    def grads(net: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
        return list(torch.autograd.grad(_loss(net, x, y), list(net.parameters())))

    def dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
        return sum((ui * vi).sum() for ui, vi in zip(u, v, strict=True))

    g0 = grads(w0, x0, y0)
    n0 = dot(g0, g0).sqrt()
    with torch.no_grad():
        for p, g in zip(w0.parameters(), g0, strict=True):
            p.add_(rho * g / (n0 + 1e-12))
    gs = grads(w0, x0, y0)  # g_s of the SAM step
    g1 = grads(w1, x1, y1)  # g of the reuse step
    # samkit (the paper): whole vector
    gv = [s - dot(gs, g0) / dot(g0, g0) * g for s, g in zip(gs, g0, strict=True)]
    scale = alpha * dot(g1, g1).sqrt() / (dot(gv, gv).sqrt() + 1e-12)
    d_samkit = [g + scale * v for g, v in zip(g1, gv, strict=True)]
    # pytorch_optimizer: per tensor
    d_po = []
    for s, g, h in zip(gs, g0, g1, strict=True):
        v = s - (s * g).sum() / (g * g).sum() * g
        d_po.append(h + alpha * h.norm() / (v.norm() + 1e-8) * v)
    sa, sb = a.state_dict(), b.state_dict()
    gap = [sb[name] - sa[name] for name, _ in a.named_parameters()]
    return gap, d_samkit, d_po


def assert_gap(gap: list[Tensor], d_samkit: list[Tensor], d_po: list[Tensor]) -> float:
    """w_po - w_samkit = LR (d_samkit - d_po), to float64 rounding; returns its largest entry."""
    for observed, ds, dp in zip(gap, d_samkit, d_po, strict=True):
        torch.testing.assert_close(observed, LR * (ds - dp), atol=1e-13, rtol=1e-6)
    return max(t.abs().max().item() for t in gap)


@pytest.mark.parametrize("kind", KINDS)
def test_looksam_differs_from_pytorch_optimizer_in_per_tensor_decomposition(kind: str) -> None:
    """pytorch_optimizer's LookSAM (like the rollovd port) decomposes and rescales per parameter
    TENSOR: g_v[p] = g_s[p] - <g_s[p], g[p]> g[p] / ||g[p]||^2 and d[p] = g[p] + alpha ||g[p]|| /
    (||g_v[p]|| + 1e-8) g_v[p]. samkit follows the paper (Alg. 1, written on whole vectors, as the
    MSAM authors' port): d = g + alpha ||g|| / (||g_v|| + 1e-12) g_v with whole-vector inner
    products and norms. The SAM step agrees; the first reuse step differs by exactly that."""
    gap = assert_gap(*looksam_reuse_gap(kind, make_model(kind)))
    assert gap > 1e-4, "the decompositions should differ visibly on this model"


def test_looksam_differs_from_pytorch_optimizer_in_reuse_eps() -> None:
    """With one parameter tensor the decompositions coincide, and only the reuse step's eps
    differs: ||g|| / (||g_v|| + 1e-12) in samkit (its unit() eps everywhere) against
    ||g|| / (||g_v|| + 1e-8) in pytorch_optimizer. Here that moves the weights by about 1e-9 per
    reuse step (test_looksam_matches_pytorch_optimizer_on_one_tensor patches samkit's to 1e-8)."""
    gap = assert_gap(*looksam_reuse_gap("mlp", linear_model()))
    assert 1e-10 < gap < 1e-7, gap


def test_looksam_differs_from_pytorch_optimizer_in_default_rho_and_alpha_range() -> None:
    """samkit's LookSAM defaults rho to 0.05 (SAM's), pytorch_optimizer's to 0.1; both use k = 10
    and alpha = 0.7 (the ports'). pytorch_optimizer requires alpha in the open (0, 1), so alpha = 0
    ("SAM-k" of the paper, SAM every k steps and the base step between) and alpha >= 1 cannot be
    expressed there; samkit accepts any alpha >= 0."""
    sk = inspect.signature(so.LookSAM.__init__).parameters
    ref = inspect.signature(po.LookSAM.__init__).parameters
    assert (sk["rho"].default, ref["rho"].default) == (0.05, 0.1)
    assert sk["k"].default == ref["k"].default == 10
    assert sk["alpha"].default == ref["alpha"].default == 0.7
    model = make_model("mlp")
    for alpha in (0.0, 1.5):
        so.create("looksam", model.parameters(), lr=LR, alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            po.LookSAM(model.parameters(), base_optimizer=torch.optim.SGD, alpha=alpha, lr=LR)


# ---- Friendly-SAM -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma,lam", [(1.0, 0.6), (0.5, 0.9)])
def test_fsam_matches_pytorch_optimizer(kind: str, sigma: float, lam: float) -> None:
    """samkit's default ema_order="code" is pytorch_optimizer's FriendlySAM (and the authors'
    code): step 0 m = g and d = g; then d = g - sigma m_{t-1}, m_t = lam m_{t-1} + (1 - lam) g;
    e = rho d / (||d|| + 1e-12). Neither adds noise; both let both passes update BatchNorm."""
    assert_lockstep(
        kind,
        samkit_maker("fsam", rho=0.1, sigma=sigma, lam=lam),
        po_fsam(rho=0.1, sigma=sigma, lmbda=lam),
    )


def test_fsam_defaults_match_pytorch_optimizer() -> None:
    """Both default rho 0.05, sigma 1 and lam (lmbda) 0.9."""
    assert_lockstep("conv", samkit_maker("fsam"), po_fsam())


# ---- sensitivity: each comparison above can fail ------------------------------------------------

SENSITIVITY = {
    # name: (model kind, samkit maker with one setting changed, pytorch_optimizer maker,
    #        the first step at which that setting enters)
    "sam-rho": ("conv", samkit_maker("sam", rho=0.11), po_sam(rho=0.1), 0),
    "asam-rho": ("mlp", samkit_maker("asam", rho=0.55, eta=0.0), po_sam(0.5, adaptive=True), 0),
    "gsam-alpha": (
        "mlp",
        samkit_maker("gsam", rho=0.1, alpha=0.35),
        po_gsam(rho=0.1, rho_min=0.1, alpha=0.3),
        0,
    ),
    "gsam-rho_min": (  # lr = lr_max at step 0, so rho_min enters at step 1
        "mlp",
        samkit_maker("gsam", rho=0.1, rho_min=0.03, alpha=0.3, lr_gamma=0.5),
        po_gsam(rho=0.1, rho_min=0.02, alpha=0.3, lr_gamma=0.5),
        1,
    ),
    "looksam-rho": (
        "mlp",
        samkit_maker("looksam", rho=0.33, k=3, alpha=0.7),
        po_looksam(rho=0.3, k=3, alpha=0.7),
        0,
    ),
    "looksam-alpha": (  # enters at the first reuse step
        "mlp",
        samkit_maker("looksam", rho=0.3, k=3, alpha=0.6),
        po_looksam(rho=0.3, k=3, alpha=0.7),
        1,
    ),
    "looksam-k": (  # k = 2: a SAM step at 2, where k = 3 reuses
        "mlp",
        samkit_maker("looksam", rho=0.3, k=2, alpha=0.7),
        po_looksam(rho=0.3, k=3, alpha=0.7),
        2,
    ),
    "fsam-sigma": (  # step 0 is plain SAM; m enters at step 1
        "conv",
        samkit_maker("fsam", rho=0.1, sigma=0.9, lam=0.6),
        po_fsam(rho=0.1, sigma=1.0, lmbda=0.6),
        1,
    ),
    "fsam-lam": (  # m_0 = g_0 whatever lam; lam enters m_1, used at step 2
        "conv",
        samkit_maker("fsam", rho=0.1, sigma=1.0, lam=0.7),
        po_fsam(rho=0.1, sigma=1.0, lmbda=0.6),
        2,
    ),
    # "paper" order, d = g - sigma m_t with m_{-1} = 0: step 0's d = (1 - sigma (1 - lam)) g_0 has
    # the code's direction; from step 1 the two differ
    "fsam-ema_order": (
        "mlp",
        samkit_maker("fsam", rho=0.1, sigma=0.5, lam=0.6, ema_order="paper"),
        po_fsam(rho=0.1, sigma=0.5, lmbda=0.6),
        1,
    ),
}


@pytest.mark.parametrize("case", list(SENSITIVITY))
def test_comparison_is_sensitive(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing one setting on samkit's side breaks the agreement exactly at the first step where
    that setting enters (and not before): the comparisons above can fail."""
    kind, sk, ref, first = SENSITIVITY[case]
    model = None
    if case.startswith("looksam"):  # the one-tensor model on which the two otherwise agree
        monkeypatch.setattr(samkit_looksam, "EPS", 1e-8)
        model = linear_model()
    assert first_mismatch(kind, sk, ref, steps=first + 1, model=model) == first
