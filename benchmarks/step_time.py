"""Time per optimizer step of every samkit method, against the floor its passes imply.

    python benchmarks/step_time.py                      # ResNet-32, batch 128, CPU, float32
    python benchmarks/step_time.py --device cuda --reps 50 --models resnet32,resnet18 \
        --modes fp32,bf16,compiled,compiled-bf16 --channels-last
    python benchmarks/step_time.py --methods plain,sam,focalsam \
        --options ascent_every=5 --options ascent_subset=0.25,ascent_subset_mode=topk

Modes: fp32; bf16 (every pass under torch.autocast in bfloat16); compiled (the model under
torch.compile); compiled-bf16 (both). One table per model and mode.

For each method: the median step time divided by the median plain-SGD step time (x SGD), and
divided by its floor nF tF + nB tB + tU (x floor), where tF and tB are the median forward and
backward times of the same model and batch, tU the median time of one plain SGD update, and nF, nB
the method's passes: the passes the method cannot avoid, plus the one update every method makes.
tF, tB and tU are timed apart in the same rounds as the methods (a tight loop of them alone runs
faster, with warmer caches). `pytorch_optimizer`'s SAM, GSAM, LookSAM and FriendlySAM (if
installed) are timed in the same rounds, and a minimal SAM written out in this script (no checks,
no options) shows what the ascent itself costs, with w restored by subtracting e or, as samkit
restores it, exactly, by copy. Methods are interleaved round by round, in a new
random order each round, so slow drifts of the machine hit all alike and no method always runs
right after the same other one. K-SAM's passes on its k = B/4 samples are timed at batch k (its
ranking forward, without a gradient, counts as a whole one). LookSAM's cost varies by step (a SAM
step every k): its column is the mean, not the median, over the rounds, which should then be a
multiple of k.

CPU memory: glibc's malloc returns freed memory to the system, and a step then page-faults to get
it back (most in a backward through a graph kept for another one). The header names the allocator
timed: the C library's, or the one preloaded (docs/BENCHMARKS.md times jemalloc with
LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1).

Cost options (spec/ALGORITHMS-EFFICIENT.md, generic options A and B): each ``--options k=v,...``
adds a row ``method[k=v,...]`` for every method in --methods that takes them (plain always runs
without), its floor from the passes averaged over K steps (A) and with the sub-batch's passes as
m/B of a pass (B, m = ascent_subset, of B or as a fraction; the eligible samples may be fewer).
Rows with ascent_every > 1 are timed by their mean, like LookSAM's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

import samkit.optim as so
from samkit.models import build_model

NUM_CLASSES = 10
MLP_IN = 40  # mlp-bn: the small step of issue 15 (40-256-256-10 with BatchNorm, MNIST-1D's width)
COUNTS = [int(5000 * 100 ** (-i / 9)) for i in range(NUM_CLASSES)]  # CIFAR-10-LT, ratio 100
KSAM_FRACTION = 0.25  # K-SAM's default k = B/4
LOOKSAM_K = 5
RHO, EPS = 0.05, 1e-12  # the minimal SAM's radius and norm guard

# name -> (constructor kwargs, (forwards, backwards)); P = classes present in the batch
METHODS: dict[str, tuple[dict, tuple[int, int]]] = {
    "plain": ({}, (1, 1)),
    "sam": ({"rho": 0.05}, (2, 2)),
    "asam": ({"rho": 0.5}, (2, 2)),
    "imbsam": ({"class_counts": COUNTS, "eta": 200}, (2, 3)),
    "focalsam": ({"class_counts": COUNTS}, (2, 3)),
    "ssesam-stage1": ({"class_counts": COUNTS, "total_epochs": 10, "eta": 200}, (3, 4)),
    "ssesam-stage2": ({"class_counts": COUNTS, "total_epochs": 10, "eta": 200, "gamma": 0.1},
                      (2, 3)),
    "bisam": ({"rho": 0.05}, (2, 2)),
    "crsam": ({}, (3, 3)),
    "ccsam": ({"class_counts": COUNTS, "s": 0.01}, (1, 1)),
    "ccsam-full": ({"class_counts": COUNTS, "s": 0.01, "form": "full"}, (-1, -1)),
    # the efficient variants (spec/ALGORITHMS-EFFICIENT.md)
    "msam": ({"rho": 0.3}, (1, 1)),
    "ksam": ({"rho": 0.05}, (1 + 2 * KSAM_FRACTION, 2 * KSAM_FRACTION)),
    "ksam-graph": ({"rho": 0.05, "graph": True}, (1 + KSAM_FRACTION, 1 + KSAM_FRACTION)),
    "bsam": ({"rho_max": 0.05, "rho_min": 0.05}, (3, 3)),
    "gsam": ({"rho": 0.05, "alpha": 0.4}, (2, 2)),
    "looksam": ({"rho": 0.05, "k": LOOKSAM_K, "alpha": 0.7}, (1 + 1 / LOOKSAM_K, 1 + 1 / LOOKSAM_K)),
    "fsam": ({"rho": 0.05, "sigma": 1.0, "lam": 0.9}, (2, 2)),
}
#: K-SAM: (forwards, backwards) at batch B, then at batch k (its ranking forward has no graph;
#: the graph variant backpropagates its subset loss through the ranking pass's full graph)
SUBSET_PASSES = {"ksam": (1, 0, 2, 2), "ksam-graph": (1, 1, 1, 1)}
#: timed by their mean over the rounds (their cost varies by step)
PERIODIC = {"looksam", "pytorch_optimizer.LookSAM"}
#: under ascent_every: the passes of a step that reuses the stored direction (ascent_between
#: "reuse_e"; "base" is one plain pass); the methods with a clean term at w; perturbed groups
REUSE_PASSES = {"sam": (1, 1), "asam": (1, 1), "bisam": (1, 1), "fsam": (1, 1),
                "imbsam": (2, 2), "focalsam": (2, 2), "ssesam-stage1": (2, 2),
                "ssesam-stage2": (2, 2)}
WITH_CLEAN = {"imbsam", "focalsam", "ssesam-stage2"}
GROUPS = {"ssesam-stage1": 2}


def parse_options(text: str) -> dict[str, object]:
    """``k=v,k=v`` -> constructor keyword arguments (ints, floats, or strings)."""
    options: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--options: {item!r} is not key=value (e.g. ascent_every=5)")
        for kind in (int, float):
            try:
                options[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def option_passes(name: str, passes: tuple[float, float], options: dict[str, object],
                  batch: int) -> tuple[float, float]:
    """The passes per step of `name` under the cost options, averaged over K steps."""
    nf, nb = passes
    subset = options.get("ascent_subset")
    if subset is not None and options.get("ascent_subset_pass", "separate") == "separate":
        frac = min(1.0, subset if isinstance(subset, float) else subset / batch)
        groups = GROUPS.get(name, 1)
        topk = options.get("ascent_subset_mode", "random") == "topk"
        if name in WITH_CLEAN:  # the ascent backward leaves the pass at w for F_m + B_m
            nf, nb = nf + groups * frac, nb - groups + groups * frac
        else:  # no pass at w left, but top-k's no-grad ranking forward
            nf, nb = nf - 1 + groups * frac + topk, nb - groups + groups * frac
    every = int(options.get("ascent_every", 1))
    if every > 1:
        rf, rb = ((1, 1) if options.get("ascent_between", "reuse_e") == "base"
                  else REUSE_PASSES[name])
        nf, nb = (nf + (every - 1) * rf) / every, (nb + (every - 1) * rb) / every
    return nf, nb


def build(name: str) -> torch.nn.Module:
    """A samkit model by name, or ``mlp-bn``: 40-256-256-10 with BatchNorm after each hidden layer
    (a step where the passes are cheap and any work beyond them shows)."""
    return MLPBN() if name == "mlp-bn" else build_model(name, num_classes=NUM_CLASSES)


class MLPBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Linear(MLP_IN, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
        )
        self.head = nn.Linear(256, NUM_CLASSES)  # what CC-SAM's classifier form perturbs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


MODES = ("fp32", "bf16", "compiled", "compiled-bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet32",
                        help="comma-separated model names (samkit's, or mlp-bn)")
    parser.add_argument("--modes", default="fp32", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15, help="timed rounds per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and input")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--options", action="append", default=[],
                        help="cost options k=v,... timed as extra rows (repeatable; see above)")
    args = parser.parse_args()
    preloaded = os.environ.get("LD_PRELOAD", "")
    args.malloc = (f"{os.path.basename(preloaded)} {os.environ.get('MALLOC_CONF', '')}".strip()
                   if preloaded else "the C library's")
    try:
        args.option_sets = [parse_options(text) for text in args.options]
    except ValueError as err:
        parser.error(str(err))
    for name in args.methods.split(","):
        if name not in METHODS:
            parser.error(f"--methods: {name!r} is not one of {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            bench(model_name, mode, args)


def bench(model_name: str, mode: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build(model_name).to(device, memory_format=fmt)
    net = torch.compile(model) if mode.startswith("compiled") else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mode.endswith("bf16")
                else contextlib.nullcontext())
    shape = (MLP_IN,) if model_name == "mlp-bn" else (3, 32, 32)
    x = torch.randn(args.batch, *shape, device=device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    present = len(torch.unique(y))

    # the optimizers first: CC-SAM's hook must exist before the compiled model's first call
    steps: dict[str, Callable[[], object]] = {}
    passes: dict[str, tuple[int, int]] = {}
    rows = [(name, {}) for name in args.methods.split(",")]
    if args.option_sets:
        skipped = [name for name in args.methods.split(",") if name not in REUSE_PASSES]
        if skipped:
            print(f"--options: {', '.join(skipped)} take no cost option (timed without)")
    rows += [(name, options) for options in args.option_sets for name in args.methods.split(",")
             if name in REUSE_PASSES]
    for name, options in rows:
        kwargs, (nf, nb) = METHODS[name]
        kwargs = {**kwargs, **options}
        if name.startswith("ccsam") and kwargs.get("form") != "full":
            kwargs["head"] = model.head
        if name.startswith("ksam"):
            kwargs["model"] = model  # BN statistics from the ranking pass only
        label = name + ("[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]" if options
                        else "")
        try:
            opt = so.create(name.split("-")[0], model.parameters(), lr=1e-4, momentum=0.9,
                            **kwargs)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"{label}: {err}") from None
        opt.set_epoch(5)
        if name.startswith("ksam") or "ascent_subset" in options:  # forward only the samples asked
            steps[label] = lambda opt=opt: opt.step(
                lambda index=None: net(x if index is None else x[index]), y
            )
        else:
            steps[label] = lambda opt=opt: opt.step(lambda: net(x), y)
        if int(options.get("ascent_every", 1)) > 1:
            PERIODIC.add(label)
        nf, nb = (1 + present, 1 + 2 * present) if nf < 0 else (nf, nb)
        passes[label] = option_passes(name, (nf, nb), options, args.batch)
    # forward, backward and one plain torch.optim.SGD update, timed apart in the same rounds as
    # the methods (so with the same state of the caches: a tight loop of them alone runs faster)
    t_f: list[float] = []
    t_b: list[float] = []
    t_u: list[float] = []
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    # K-SAM's passes on its k samples, timed at batch k too (a small batch does not cost k/B of
    # a pass: the per-operation overhead stays)
    k = max(1, round(KSAM_FRACTION * args.batch))
    sub_f: list[float] = []
    sub_b: list[float] = []
    subset = any(name.startswith("ksam") for name in passes)

    def probe(record: bool) -> None:
        for xs, ys, into_f, into_b in ((x, y, t_f, t_b), (x[:k], y[:k], sub_f, sub_b))[
            : 1 + subset
        ]:
            sync(device)
            t0 = time.perf_counter()
            with autocast:
                loss = F.cross_entropy(net(xs), ys)
            sync(device)
            t1 = time.perf_counter()
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            if xs is x:
                sgd.step()
            sync(device)
            t3 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if record:
                into_f.append(t1 - t0)
                into_b.append(t2 - t1)
                if xs is x:
                    t_u.append(t3 - t2)

    for exact in (False, True):
        label = "minimal SAM" + (", exact restore" if exact else "")
        steps[label] = minimal_sam(model, net, x, y, exact)
        passes[label] = (2, 2)
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        print("pytorch_optimizer is not installed: pip install -e .[bench] to compare with it")
    else:
        for name, step in reference_steps(model, net, x, y).items():
            steps[name] = step
            passes[name] = REFERENCE_PASSES[name]

    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    shuffle = random.Random(0).shuffle
    for i in range(args.warmup + args.reps):
        probe(i >= args.warmup)
        shuffle(order)  # no method always runs right after the same other one
        for name, step in order:
            with autocast:
                t = timed(step, device)
            if i >= args.warmup:
                times[name].append(t)

    tf, tb, tu = statistics.median(t_f), statistics.median(t_b), statistics.median(t_u)
    base = statistics.median(times["plain"]) if "plain" in times else tf + tb + tu
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"\n# {model_name}, {mode}, batch {args.batch}, {device}{gpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f"{', channels-last' if args.channels_last else ''}, malloc: {args.malloc}")
    print(f"# forward {tf * 1e3:.2f} ms, backward {tb * 1e3:.2f} ms, update {tu * 1e3:.2f} ms, "
          f"plain step {base * 1e3:.2f} ms, "
          f"{args.reps} rounds, {present} classes in the batch")
    if subset:
        print(f"# K-SAM's k = {k}: forward {statistics.median(sub_f) * 1e3:.2f} ms, backward "
              f"{statistics.median(sub_b) * 1e3:.2f} ms at batch {k}")
    print("| method | passes | ms/step | x SGD | floor | x floor |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        nf, nb = passes[name]
        med = statistics.mean(ts) if name in PERIODIC else statistics.median(ts)
        floor = nf * tf + nb * tb + tu
        shown = f"{nf:g}F {nb:g}B"
        if name in SUBSET_PASSES:  # passes at batch B, then at batch k
            nf, nb, kf, kb = SUBSET_PASSES[name]
            floor = nf * tf + nb * tb + kf * statistics.median(sub_f) + kb * statistics.median(sub_b)
            floor += tu
            shown = f"{nf:g}F {nb:g}B + {kf:g}F {kb:g}B at k"
        print(f"| {name} | {shown} | {med * 1e3:.2f} | {med / base:.2f} | "
              f"{floor / base:.2f} | {med / floor:.3f} |")


REFERENCE_PASSES = {
    "pytorch_optimizer.SAM": (2, 2),
    "pytorch_optimizer.GSAM": (2, 2),
    "pytorch_optimizer.LookSAM": (1 + 1 / LOOKSAM_K, 1 + 1 / LOOKSAM_K),
    "pytorch_optimizer.FriendlySAM": (2, 2),
}


def flat_layout(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple]:
    """The parameters copied into one flat buffer (returned as views of it) and the (perturb,
    restore) pair of the minimal SAM's arithmetic that works on that buffer as a whole: the
    gradients gathered by one `torch.cat`, then one call per operation instead of a loop over the
    tensors (the pair takes compiled_ascent.py's arguments and reads only the gradients)."""
    flat_w = torch.cat([p.reshape(-1) for p in params])
    flat_g, flat_backup = torch.empty_like(flat_w), torch.empty_like(flat_w)
    views = [v.view_as(p) for v, p in zip(flat_w.split([p.numel() for p in params]), params,
                                          strict=True)]

    def perturb_flat(params: list, grads: list[torch.Tensor], backup: list) -> None:
        torch.cat([g.reshape(-1) for g in grads], out=flat_g)
        norm = torch.linalg.vector_norm(flat_g)
        flat_backup.copy_(flat_w)
        flat_w.add_(flat_g * (RHO / (norm + EPS)))

    def restore_flat(params: list, backup: list) -> None:
        flat_w.copy_(flat_backup)

    return views, (perturb_flat, restore_flat)


def minimal_sam(
    model: torch.nn.Module, net: Callable, x: torch.Tensor, y: torch.Tensor, exact: bool = False,
    flat: bool = False,
) -> Callable[[], None]:
    """The least a SAM step can do: two passes, e = rho g / ||g|| added and subtracted (no checks,
    no options), one SGD update. Not a method to use: a yardstick for the work beyond the passes
    that the ascent itself needs. `exact`: w is saved before the ascent and restored by copy, as
    samkit restores it (subtracting e does not give w back exactly), instead of subtracting e.
    `flat` (with `exact`): the model's parameters are moved into one buffer (they become views of
    it) and the arithmetic runs on that buffer whole, after one `torch.cat` of the gradients: one
    call per operation instead of a loop over the tensors (benchmarks/flat_layout.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    saved = [torch.empty_like(p) for p in params]
    if flat:
        if not exact:
            raise ValueError("the flat yardstick restores w by copy: pass exact=True")
        views, (perturb_flat, restore_flat) = flat_layout([p.detach() for p in params])
        for p, v in zip(params, views, strict=True):
            p.data = v

    def ascend() -> list[torch.Tensor]:
        e = [p.grad for p in params]
        if flat:
            perturb_flat(params, e, saved)
            return e
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(e)))
        torch._foreach_mul_(e, RHO / (norm + EPS))
        if exact:
            torch._foreach_copy_(saved, params)
        torch._foreach_add_(params, e)
        return e

    def step() -> None:
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            e = ascend()
        for p in params:
            p.grad = None
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            if flat:
                restore_flat(params, saved)
            elif exact:
                torch._foreach_copy_(params, saved)
            else:
                torch._foreach_sub_(params, e)
        sgd.step()
        for p in params:
            p.grad = None

    return step


def reference_steps(
    model: torch.nn.Module, net: Callable, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """pytorch_optimizer's SAM, GSAM, LookSAM and FriendlySAM, each driven as its docs show, with
    the settings of the samkit rows they are timed against (written against its 4.1.0)."""
    import pytorch_optimizer as po

    missing = [n for n in ("GSAM", "LookSAM", "FriendlySAM", "ProportionScheduler") if not hasattr(po, n)]
    if missing:
        from importlib.metadata import version

        raise SystemExit(f"pytorch_optimizer {version('pytorch_optimizer')} lacks "
                         f"{', '.join(missing)}: "
                         "pip install 'pytorch_optimizer>=4.1'")

    def sgd(params: object) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    def two_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            loss().backward()
            opt.first_step(zero_grad=True)
            torch.clear_autocast_cache()  # else its second pass sees the unperturbed weights
            loss().backward()
            opt.second_step(zero_grad=True)

        return step

    sam = po.SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, lr=1e-4,
                 momentum=0.9)
    fsam = po.FriendlySAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, sigma=1.0,
                          lmbda=0.9, lr=1e-4, momentum=0.9)
    looksam = po.LookSAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, k=LOOKSAM_K,
                         alpha=0.7, lr=1e-4, momentum=0.9)

    def looksam_step() -> None:
        # its step(closure) always runs the closure; first_step/second_step skip the SAM pass
        loss().backward()
        if looksam.get_step() % LOOKSAM_K == 0:
            looksam.first_step(zero_grad=True)
            torch.clear_autocast_cache()
            loss().backward()
        looksam.second_step(zero_grad=True)

    base = sgd(model.parameters())
    lr_schedule = torch.optim.lr_scheduler.StepLR(base, step_size=10**9)
    rho_schedule = po.ProportionScheduler(lr_schedule, max_lr=1e-4, max_value=0.05, min_value=0.05)
    gsam = po.GSAM(model.parameters(), base_optimizer=base, model=model, rho_scheduler=rho_schedule,
                   alpha=0.4)

    def gsam_step() -> None:
        gsam.set_closure(lambda logits, targets: F.cross_entropy(logits, targets), x, y)
        gsam.step()
        torch.clear_autocast_cache()

    return {
        "pytorch_optimizer.SAM": two_step(sam),
        "pytorch_optimizer.GSAM": gsam_step,
        "pytorch_optimizer.LookSAM": looksam_step,
        "pytorch_optimizer.FriendlySAM": two_step(fsam),
    }


if __name__ == "__main__":
    main()
