"""Would one flat buffer of parameters bring a small SAM step to its floor? Timed inside the step.

    python benchmarks/flat_layout.py --model mlp-bn --threads 1 --reps 300

On CPU each `_foreach` call is a loop over the tensors, so SAM's arithmetic (the norm, the
ascent, the copy and restore of w) makes one call per parameter tensor per operation. With the
parameters laid out as views of one buffer, each operation is one call on that buffer. This script
times, in interleaved rounds, plain SGD, the minimal SAM of step_time.py with w restored exactly
by copy, and the same minimal SAM on a flat buffer, each on its own copy of the model (the same
initial weights; `step_time.py` times all its rows on one model, where a model of its own would
start each step with colder caches than the rest). Reported: the median ms per step over --reps
blocks of --calls steps, and the flat step's saving.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from step_time import MLP_IN, NUM_CLASSES, build, minimal_sam, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp-bn", help="a samkit model, or mlp-bn")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--calls", type=int, default=5, help="steps per timed block")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    shape = (MLP_IN,) if args.model == "mlp-bn" else (3, 32, 32)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    first = build(args.model)

    def copy() -> torch.nn.Module:
        model = build(args.model)
        model.load_state_dict(first.state_dict())
        return model

    plain_model = copy()
    sgd = torch.optim.SGD(plain_model.parameters(), lr=1e-4, momentum=0.9)

    def plain() -> None:
        torch.nn.functional.cross_entropy(plain_model(x), y).backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    exact, flat = copy(), copy()
    steps = {
        "plain SGD": plain,
        "minimal SAM, exact restore": minimal_sam(exact, exact, x, y, exact=True),
        "minimal SAM, flat buffer": minimal_sam(flat, flat, x, y, exact=True, flat=True),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    shuffle = random.Random(0).shuffle
    for i in range(args.warmup + args.reps):
        shuffle(order)
        for name, step in order:
            t = timed(lambda step=step: [step() for _ in range(args.calls)], device) / args.calls
            if i >= args.warmup:
                times[name].append(t)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"# {args.model}, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.reps} rounds of {args.calls} steps")
    print("| step | ms/step | x plain SGD |")
    print("|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.3f} | {ms / med['plain SGD']:.3f} |")
    saved = med["minimal SAM, exact restore"] - med["minimal SAM, flat buffer"]
    print(f"# the flat buffer saves {saved * 1e3:.0f} us per step "
          f"({saved / med['minimal SAM, exact restore']:.1%} of the exact minimal SAM's step)")


if __name__ == "__main__":
    main()
