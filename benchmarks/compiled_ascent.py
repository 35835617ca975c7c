"""Does compiling SAM's ascent arithmetic pay? Times it eager and under torch.compile.

    python benchmarks/compiled_ascent.py --models mlp-bn,resnet32 --threads 1

The arithmetic SAM adds to its two passes: the global gradient norm, e = rho g / (||g|| + eps),
a copy of w, w <- w + e, and, after the second pass, w restored from the copy. Eager, it is a
handful of `_foreach` calls (on CPU each is a loop over the tensors); compiled (fullgraph, default
mode), inductor fuses it into generated kernels, but every call first checks the graph's guards on
every tensor. This script times one perturb-and-restore both ways on a model's parameters (the
median of --reps timed blocks of --calls calls each, eager and compiled interleaved), and the time
the first compiled call took. Where compiled is not faster, a compiled step is not what closes the
gap to the pass floor (docs/BENCHMARKS.md).

A third column times the same arithmetic eager on one flat buffer: the parameters as views of one
tensor, the gradients gathered into another by one `torch.cat`, so that each step is one call
instead of a loop over the tensors. samkit does not lay parameters out this way (it would take the
user's parameters over); the column measures what the per-tensor loops cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_time import EPS, RHO, build, flat_layout, timed


def perturb(params: list[torch.Tensor], grads: list[torch.Tensor],
            backup: list[torch.Tensor]) -> None:
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    e = torch._foreach_mul(grads, RHO / (norm + EPS))
    torch._foreach_copy_(backup, params)
    torch._foreach_add_(params, e)


def restore(params: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    torch._foreach_copy_(params, backup)


def block(fns: tuple, params: list, grads: list, backup: list, calls: int,
          device: torch.device) -> float:
    """Seconds per perturb-and-restore, over `calls` calls."""
    do, undo = fns

    def calls_of_both() -> None:
        for _ in range(calls):
            do(params, grads, backup)
            undo(params, backup)

    return timed(calls_of_both, device) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp-bn", help="comma-separated (samkit's, or mlp-bn)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    print("| model | tensors | eager us | compiled us | compiled / eager | first compiled call s "
          "| flat eager us |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        params = [p.detach().clone() for p in build(name).to(device).parameters()]
        grads = [torch.randn_like(p) for p in params]
        backup = [torch.empty_like(p) for p in params]
        torch._dynamo.reset()
        compiled = (torch.compile(perturb, fullgraph=True), torch.compile(restore, fullgraph=True))
        start = time.perf_counter()
        block(compiled, params, grads, backup, 1, device)
        first = time.perf_counter() - start
        eager = (perturb, restore)
        views, flat = flat_layout(params)
        runs = {"eager": (eager, params), "compiled": (compiled, params), "flat": (flat, views)}
        for fns, ps in runs.values():  # warm-up
            block(fns, ps, grads, backup, args.calls, device)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.reps):
            for k, (fns, ps) in runs.items():
                times[k].append(block(fns, ps, grads, backup, args.calls, device))
        te, tc, tf = (statistics.median(times[k]) * 1e6 for k in runs)
        print(f"| {name} | {len(params)} | {te:.1f} | {tc:.1f} | {tc / te:.2f} | {first:.1f} "
              f"| {tf:.1f} |")


if __name__ == "__main__":
    main()
