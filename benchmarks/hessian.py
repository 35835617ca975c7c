"""samkit.analysis against PyHessian (Yao, Gholami, Keutzer & Mahoney 2020; the `pyhessian` package).

    python benchmarks/hessian.py                          # both parts, CPU
    python benchmarks/hessian.py --skip-resnet --reps 50  # accuracy part only

Part 1 (accuracy at equal cost): an MLP (14x14 average-pooled Fashion-MNIST, one hidden layer of 16, 3,322
parameters), trained briefly, on one batch of 512 test images; the exact trace and eigenvalues come from
the full Hessian (torch.autograd.functional.hessian in float64). For each budget of Hessian-vector
products (HVPs), over `--reps` seeds: the relative error of samkit's Hutchinson and Hutch++ traces and of
PyHessian's trace (its Hutchinson, run for exactly the budget), and how often samkit's stated standard
error covers the error (|err| <= 2 stderr). Then the top eigenvalue: samkit's Lanczos against PyHessian's
power iteration at the same tolerance.

Part 2 (speed): ResNet-32, batch 128 of random 3x32x32 inputs, eval mode: wall time of one trace estimate
and of one top eigenvalue at about `--resnet-hvps` HVPs, for both libraries, setup (the forward and the
gradient graph) separate. Both cache the gradient graph of the batch and pay one double-backward per HVP.

PyHessian 0.1 runs on torch 2.x for these two functions (its `density` calls `torch.eig`, removed in
torch 2.0, and is not benchmarked). It is only wrapped to count its HVPs. Without it, its rows are
skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import samkit.analysis as sa
from samkit.models import build_model

try:
    import importlib

    import pyhessian

    _ph = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class)

    _PH_ERROR = ""
except Exception as exc:  # noqa: BLE001 - any import failure means "skip it"
    pyhessian = None
    _PH_ERROR = f"{type(exc).__name__}: {exc}"


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


class Counter:
    """Counts PyHessian's HVPs by wrapping the function its `hessian` class calls."""

    def __init__(self) -> None:
        self.n = 0
        if pyhessian is not None:
            original = _ph.hessian_vector_product

            def counted(*args, **kwargs):
                self.n += 1
                return original(*args, **kwargs)

            _ph.hessian_vector_product = counted


COUNTER = Counter()
PH_SEED_OFFSET = 10_000
# PyHessian's trace stops when |mean - previous mean| / (previous mean + 1e-6) < tol; with a negative
# trace (possible away from a minimum) even tol=0 stops it, so -inf makes it run all maxIter probes.
NEVER = float("-inf")


def pyhessian_object(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """PyHessian's `hessian` on a copy of the model (it leaves graph-carrying .grad behind)."""
    clone = copy.deepcopy(model)
    return _ph.hessian(clone, nn.CrossEntropyLoss(), data=(x, y), cuda=False)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Part 1: accuracy against an exact Hessian


def fashion_mlp(
    data_root: str | None, train_steps: int
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from samkit.data import load_dataset

    def prep(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0)
        return (F.avg_pool2d(x, 2) - 0.286) / 0.353

    train = load_dataset("fashion-mnist", root=data_root, split="train")
    test = load_dataset("fashion-mnist", root=data_root, split="test")
    torch.manual_seed(0)
    model = build_model("mlp", 10, in_channels=1, input_size=(14, 14), hidden=(16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        idx = torch.randint(0, train.labels.numel(), (128,), generator=gen)
        loss = F.cross_entropy(model(prep(train.images[idx])), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = prep(test.images[:512]), test.labels[:512]
    return model.eval(), x, y


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    ref = copy.deepcopy(model).double().eval()
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    sizes = [p.numel() for _, p in ref.named_parameters()]
    xd = x.double()

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(ref, params, (xd,)), y)

    w = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    return torch.autograd.functional.hessian(f, w, vectorize=True).numpy()


def part1(args: argparse.Namespace) -> list[str]:
    model, x, y = fashion_mlp(args.data, args.train_steps)
    dim = sum(p.numel() for p in model.parameters())
    hess, t_exact = timed(lambda: exact_hessian(model, x, y))
    eigs = np.linalg.eigvalsh(hess)  # type: ignore[arg-type]
    exact = float(np.trace(hess))  # type: ignore[arg-type]
    op = sa.HessianOperator(model, per_sample_ce, (x, y))
    check = ""
    if pyhessian is not None:
        # Same seed, same Rademacher stream: both libraries draw identical probes, so their
        # Hutchinson estimates must agree up to float32 rounding (a cross-check of the HVPs).
        ours = sa.hutchinson_trace(op, rtol=0.0, min_probes=10, max_probes=10, generator=0)
        torch.manual_seed(0)
        theirs = float(np.mean(pyhessian_object(model, x, y).trace(maxIter=10, tol=NEVER)))
        check = (
            f"Cross-check: with the same seed both libraries draw the same 10 Rademacher probes; "
            f"samkit {ours.estimate:.6g}, PyHessian {theirs:.6g} (relative difference "
            f"{abs(ours.estimate - theirs) / abs(theirs):.1e})."
        )
    lines = [
        f"### Trace: MLP on Fashion-MNIST, {dim:,} parameters, batch 512, exact trace {exact:.5g} "
        f"(largest eigenvalue {eigs[-1]:.4g}, smallest {eigs[0]:.3g}; exact Hessian in "
        f"{t_exact:.1f} s)",
        "",
        f"Mean relative error |estimate - exact| / exact over {args.reps} seeds (and its standard "
        "error); coverage: share of seeds with |err| <= 2 x samkit's stated stderr.",
        "",
        *([check, ""] if check else []),
        "| HVPs | samkit Hutchinson | samkit Hutch++ | PyHessian trace | coverage Hutchinson "
        "| coverage Hutch++ |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for budget in args.budgets:
        err: dict[str, list[float]] = {"h": [], "pp": [], "ph": []}
        cover = {"h": 0, "pp": 0}
        for seed in range(args.reps):
            h = sa.hutchinson_trace(
                op, rtol=0.0, min_probes=budget, max_probes=budget, generator=seed
            )
            pp = sa.hutchpp_trace(op, budget, generator=seed)
            for key, est in (("h", h), ("pp", pp)):
                e = abs(est.estimate - exact)
                err[key].append(e / abs(exact))
                cover[key] += int(e <= 2 * est.stderr)
            if pyhessian is not None:
                ph = pyhessian_object(model, x, y)
                torch.manual_seed(PH_SEED_OFFSET + seed)  # independent of samkit's probes
                samples = ph.trace(maxIter=budget, tol=NEVER)
                assert len(samples) == budget
                err["ph"].append(abs(float(np.mean(samples)) - exact) / abs(exact))

        def cell(values: list[float]) -> str:
            if not values:
                return "n/a"
            v = np.asarray(values)
            return f"{v.mean():.4f} ± {v.std(ddof=1) / np.sqrt(v.size):.4f}"

        lines.append(
            f"| {budget} | {cell(err['h'])} | {cell(err['pp'])} | {cell(err['ph'])} | "
            f"{cover['h'] / args.reps:.2f} | {cover['pp'] / args.reps:.2f} |"
        )
    # top eigenvalue at the same tolerance
    lines += [
        "",
        f"### Top eigenvalue, same MLP (exact {eigs[-1]:.6g}), tolerance 1e-3, {args.reps} seeds",
        "",
        "| method | mean HVPs | mean relative error | max relative error |",
        "|---|---:|---:|---:|",
    ]
    hv, rel = [], []
    for seed in range(args.reps):
        e = sa.extreme_eigenvalues(op, 1, which="top", tol=1e-3, max_steps=100, generator=seed)
        hv.append(e.num_hvps)
        rel.append(abs(e.lambda_max - eigs[-1]) / abs(eigs[-1]))
    lines.append(
        f"| samkit Lanczos (residual <= 1e-3 x value) | {np.mean(hv):.1f} | {np.mean(rel):.2e} "
        f"| {np.max(rel):.2e} |"
    )
    if pyhessian is not None:
        hv, rel = [], []
        for seed in range(args.reps):
            ph = pyhessian_object(model, x, y)
            torch.manual_seed(seed)
            COUNTER.n = 0
            values, _ = ph.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
            hv.append(COUNTER.n)
            rel.append(abs(values[0] - eigs[-1]) / abs(eigs[-1]))
        lines.append(
            f"| PyHessian power iteration (relative change < 1e-3) | {np.mean(hv):.1f} | "
            f"{np.mean(rel):.2e} | {np.max(rel):.2e} |"
        )
    else:
        lines.append(f"| PyHessian power iteration | skipped: {_PH_ERROR} | | |")
    return lines


# --------------------------------------------------------------------------------------------------
# Part 2: ResNet-32 speed


def _round_samkit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int) -> list[tuple]:
    op, t_setup = timed(lambda: sa.HessianOperator(model, per_sample_ce, (x, y)))
    assert isinstance(op, sa.HessianOperator)
    op.matvec(torch.zeros(op.dim))  # warm-up
    runs: list[tuple[str, Callable[[], object]]] = [
        (
            "samkit Hutchinson trace",
            lambda: sa.hutchinson_trace(op, rtol=0.0, min_probes=m, max_probes=m, generator=0),
        ),
        ("samkit Hutch++ trace", lambda: sa.hutchpp_trace(op, m, generator=0)),
        (
            "samkit Lanczos top eigenvalue (tol 1e-3)",
            lambda: sa.extreme_eigenvalues(op, 1, which="top", tol=1e-3, max_steps=m, generator=0),
        ),
    ]
    rows = []
    for name, fn in runs:
        est, t = timed(fn)
        rows.append((name, t_setup, int(est.num_hvps), t))  # type: ignore[attr-defined]
    op.release()
    return rows


def _round_pyhessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int) -> list[tuple]:
    ph, t_setup = timed(lambda: pyhessian_object(model, x, y))
    _ph.hessian_vector_product(ph.gradsH, ph.params, [torch.zeros_like(p) for p in ph.params])
    runs: list[tuple[str, Callable[[], object]]] = [
        ("PyHessian trace", lambda: ph.trace(maxIter=m, tol=NEVER)),  # type: ignore[attr-defined]
        (
            "PyHessian power iteration top eigenvalue (tol 1e-3)",
            lambda: ph.eigenvalues(maxIter=m, tol=1e-3, top_n=1),  # type: ignore[attr-defined]
        ),
    ]
    rows = []
    for name, fn in runs:
        COUNTER.n = 0
        torch.manual_seed(0)
        _, t = timed(fn)
        rows.append((name, t_setup, COUNTER.n, t))
    return rows


def part2(args: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    model = build_model("resnet32", 10).eval()
    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))
    m = args.resnet_hvps
    dim = sum(p.numel() for p in model.parameters())
    times: dict[str, list[tuple]] = {}
    for _ in range(args.rounds):  # the libraries alternate, so drifts of a shared machine hit both
        rows = _round_samkit(model, x, y, m)
        if pyhessian is not None:
            rows += _round_pyhessian(model, x, y, m)
        for row in rows:
            times.setdefault(row[0], []).append(row[1:])
    lines = [
        f"### Speed: ResNet-32 ({dim:,} parameters), batch 128 of random 3x32x32 inputs, eval mode, "
        f"CPU, {torch.get_num_threads()} threads, at most {m} HVPs, median of {args.rounds} rounds",
        "",
        "| method | setup (s) | HVPs | time (s) | s / HVP |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in times.items():
        setup = float(np.median([r[0] for r in runs]))
        hvps = int(np.median([r[1] for r in runs]))
        t = float(np.median([r[2] for r in runs]))
        per = float(np.median([r[2] / max(r[1], 1) for r in runs]))
        lines.append(f"| {name} | {setup:.2f} | {hvps} | {t:.1f} | {per:.2f} |")
    if pyhessian is None:
        lines.append(f"| PyHessian | skipped: {_PH_ERROR} | | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="folder holding fashion-mnist (default: search)"
    )
    parser.add_argument("--reps", type=int, default=20, help="seeds per accuracy cell")
    parser.add_argument("--budgets", type=int, nargs="+", default=[12, 30, 60, 99])
    parser.add_argument("--train-steps", type=int, default=300, help="SGD steps before part 1")
    parser.add_argument("--resnet-hvps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (median reported)")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if pyhessian is None:
        print(f"PyHessian not available ({_PH_ERROR}); its rows are skipped. pip install pyhessian")
    version = getattr(pyhessian, "__version__", "0.1") if pyhessian is not None else "absent"
    out = [
        "```",
        "python " + " ".join(sys.argv),
        "```",
        "",
        f"torch {torch.__version__}, pyhessian {version}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "",
    ]
    if not args.skip_accuracy:
        out += part1(args) + [""]
    if not args.skip_resnet:
        out += part2(args)
    print("\n".join(out))


if __name__ == "__main__":
    main()
