"""The `samkit` command.

Building the parser imports nothing heavy (no torch, no matplotlib), so `samkit --help` and
`samkit --version` answer at once; each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from samkit.report.compare import Compare, PlannedRun

# `samkit sharpness --what`: the same names as samkit.analysis.run.QUANTITIES (a test keeps them
# equal), written out so that building the parser does not import torch
QUANTITIES = ("trace", "eigen", "density", "classwise", "groups", "saddle", "landscape")

TRAIN_HELP = """\
Train one method on a long-tailed data set and write a run directory.

With no recipe, runs the embedded default: Fashion-MNIST long-tailed at ratio 100, the small CNN
and Focal-SAM (a few minutes on 2 CPU cores). Overrides are key=value with dotted keys, e.g.
  samkit train optim.method=sam optim.kwargs.rho=0.1 schedule.epochs=20 run.name=sam-run
  samkit train configs/cifar10_lt100_focal.yaml run.device=cuda
  samkit train --resume runs/sam-run
Keys: data.{name,root,ratio,profile,order,batch_size,augment,...}, model.{name,head},
loss.{name,kwargs}, optim.{method,base,lr,momentum,weight_decay,norm_stats,kwargs,rho_schedule},
schedule.{epochs,lr,warmup_epochs,milestones,decay}, run.{name,out,seed,device,deterministic,...};
`samkit train --print-config` shows them all with their values.
"""


def _train(args: argparse.Namespace) -> int:
    from samkit.train.config import ConfigError, load_config
    from samkit.train.loop import Interrupted, Trainer, TrainingError

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        recipe, overrides = None, [recipe, *overrides]
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        overrides, args.resume = [args.resume, *overrides], True  # `--resume key=value`
    resume = args.resume is not None
    if isinstance(args.resume, str):
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            print(f"error: {run_dir} is not a run directory (no config.yaml)", file=sys.stderr)
            return 2
        if recipe is not None:
            print("error: give either a recipe or --resume RUN_DIR, not both", file=sys.stderr)
            return 2
        recipe = run_dir / "config.yaml"
        overrides += [f"run.out={run_dir.parent}", f"run.name={run_dir.name}"]
    try:
        config = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    trainer = Trainer(config, resume=resume, progress=args.quiet == 0, verbose=args.quiet < 2)
    try:
        summary = trainer.run()
    except Interrupted as stop:
        print(f"interrupted: checkpoint saved; continue with: samkit train --resume {stop.run_dir}",
              file=sys.stderr)
        return 130
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, OSError) and err.errno:
            raise  # a path the system refused: main() names it and the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if trainer.rank != 0:  # under torchrun, rank 0 reports
        return 0
    last = summary["last"]
    print(f"run: {trainer.run_dir}")
    groups = ", ".join(f"{k} {'n/a' if last[k] is None else format(last[k], '.4f')}"
                       for k in ("many", "medium", "few"))
    print(f"last epoch: overall {last['overall']:.4f}, {groups}")
    print(f"summary: {trainer.run_dir / 'summary.json'}")
    print(f"plots: {trainer.run_dir / 'plots'}/per_class.png, curves.png")
    return 0


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text}: give comma-separated integers, e.g. --seeds 0,1,2"
                         ) from None


def _compare(args: argparse.Namespace) -> int:
    from samkit.report.compare import read_compare, run_compare
    from samkit.report.table import write_report
    from samkit.train.config import ConfigError
    from samkit.train.loop import Interrupted, TrainingError

    try:
        compare = read_compare(args.recipe, args.overrides, seeds=_ints(args.seeds),
                               only=args.methods.split(",") if args.methods else None)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plan:
        _plan(compare)
        return 0
    try:
        run_dirs, tuning = run_compare(compare, progress=not args.quiet)
    except Interrupted as stop:
        print(f"interrupted in {stop.run_dir}; run the same command again to continue",
              file=sys.stderr)
        return 130
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if tuning is not None:
        print(f"wrote {compare.tuning_path}")
    if args.sharpness:
        from samkit.analysis.run import analyse_run
        from samkit.train.progress import is_terminal

        for run_dir in run_dirs:
            if not (run_dir / "sharpness" / "sharpness.json").exists():
                if not args.quiet:
                    print(f"sharpness of {run_dir}", flush=True)
                analyse_run(run_dir, what=tuple(args.sharpness.split(",")),
                            progress=not args.quiet and is_terminal(sys.stderr))
    out = Path(compare.out) / "report"
    for path in write_report(run_dirs, out, tuning=tuning):
        print(f"wrote {path}")
    return 0


def _plan(compare: Compare) -> None:
    """Print the runs of a compare, stage by stage, with what is done."""
    from samkit.report.compare import select, tuning_finished

    def show(runs: list[PlannedRun]) -> None:
        for planned in runs:
            state = "done" if (planned.run_dir / "summary.json").exists() else "to run"
            print(f"{planned.run_dir}  [{planned.label}, seed {planned.seed}]  {state}")

    if compare.tune is None:
        show(compare.final_runs())
        return
    t = compare.tune
    print(f"stage 1, tuning: {len(compare.tuning_runs())} runs on seeds {t.seeds}, test set never "
          f"loaded; per method the highest mean {t.metric} at the last epoch"
          + (f" ({t.epochs} epochs)" if t.epochs is not None else ""))
    show(compare.tuning_runs())
    if tuning_finished(compare):
        chosen = {m: r["chosen"] for m, r in select(compare, write=False)["methods"].items()}
        print(f"stage 2, the chosen settings on seeds {compare.seeds}:")
        show(compare.final_runs(chosen))
        return
    print(f"stage 2, after tuning: each method's chosen setting on seeds {compare.seeds}:")
    for method, points in compare.by_method().items():
        if len(points) > 1:
            print(f"{Path(compare.out)}/{method}-<chosen>-s<seed>  [one of {len(points)} "
                  f"settings, chosen by tuning]  x {len(compare.seeds)} seeds")
        else:
            print(f"{Path(compare.out)}/{points[0].stem}-s<seed>  [{points[0].row}: one setting, "
                  f"not tuned]  x {len(compare.seeds)} seeds")


def _report(args: argparse.Namespace) -> int:
    from samkit.report.table import write_report

    try:
        paths = write_report(args.run_dirs, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def _sharpness(args: argparse.Namespace) -> int:
    from samkit.analysis.run import analyse_run
    from samkit.train.progress import is_terminal

    try:
        results = analyse_run(args.run_dir, what=tuple(args.what.split(",")),
                              checkpoint=args.checkpoint, per_class=args.per_class, rho=args.rho,
                              eta=args.eta, hvps=args.hvps, seed=args.seed, out=args.out,
                              progress=not args.quiet and is_terminal(sys.stderr))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "sharpness"
    if "normalized_trace" in results:
        t = results["trace"]
        print(f"trace {t['estimate']:.4g} +- {t['stderr']:.2g}; normalised trace "
              f"{results['normalized_trace']['value']:.4g}")
    if "eigen" in results:
        e = results["eigen"]
        print(f"top eigenvalues {_floats(e['top'])}; bottom {_floats(e['bottom'])}")
    print(f"wrote {out / 'sharpness.json'} and plots in {out}")
    return 0


def _floats(values: list[float]) -> str:
    """Numbers for a reader: 4 significant digits, e.g. [12.35, -0.0413]."""
    return "[" + ", ".join(format(v, ".4g") for v in values) + "]"


def _version() -> str:
    """The installed distribution's version, else the source tree's samkit.__version__."""
    from importlib import metadata

    try:
        return metadata.version("samkit")
    except metadata.PackageNotFoundError:
        import samkit

        return samkit.__version__


def _methods(args: argparse.Namespace) -> int:
    import samkit.optim as so

    for name in so.available():
        cls = so.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from samkit.data import download

    try:
        path = download(args.name, args.root, progress=not args.quiet)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"downloaded": args.name, "to": str(path)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samkit",
        description="Sharpness-aware training for PyTorch: SAM and its long-tailed variants, a "
                    "long-tailed training harness, and curvature diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"samkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train a method on a long-tailed data set",
                           description=TRAIN_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", nargs="?", help="YAML recipe (default: the embedded default)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    train.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                       help="continue an interrupted run: RUN_DIR, or the recipe's own run")
    train.add_argument("--quiet", "-q", action="count", default=0,
                       help="-q: no progress bars, still a result line per epoch; -qq: only the "
                            "final summary. Output to a file or pipe never gets bars.")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved recipe and exit")
    train.set_defaults(func=_train)

    compare = sub.add_parser(
        "compare", help="train a grid of methods x seeds and write one report",
        description="Train every method x seed (x grid value) of a compare recipe on the same "
                    "protocol and write report.md, report.csv and plots into OUT/report. Finished "
                    "runs are skipped and interrupted ones resume: run it again to continue. See "
                    "configs/ for recipes and samkit/report/compare.py for the format.")
    compare.add_argument("recipe", help="compare recipe (YAML with base, out, seeds, methods)")
    compare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="overrides applied to every run's recipe")
    compare.add_argument("--seeds", help="comma-separated seeds, replacing the recipe's")
    compare.add_argument("--methods", help="comma-separated method labels, a subset")
    compare.add_argument("--plan", action="store_true", help="list the runs and exit")
    compare.add_argument("--sharpness", metavar="WHAT",
                         help="also run `samkit sharpness --what WHAT` on every run (e.g. "
                              "trace,eigen,classwise) and add the numbers to the report")
    compare.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    compare.set_defaults(func=_compare)

    report = sub.add_parser(
        "report", help="build the compare report from finished runs",
        description="Group finished run directories by label (method) and write report.md, "
                    "report.csv, accuracy_vs_throughput.png, per_class.png and curves.png.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default="report", help="output directory (default: report)")
    report.set_defaults(func=_report)

    sharp = sub.add_parser(
        "sharpness", help="curvature and sharpness diagnostics of a trained run",
        description="Hessian trace (Hutch++) and CR-SAM's normalised trace, extreme eigenvalues "
                    "(Lanczos), spectral density (SLQ), class-wise and group sharpness, saddle "
                    "indicators of the head and tail losses, and 1D/2D loss-landscape slices, on "
                    "the run's model and a class-stratified batch of its training data. Writes "
                    "RUN_DIR/sharpness/sharpness.json and plots.")
    sharp.add_argument("run_dir", metavar="RUN_DIR")
    sharp.add_argument("--what", default=",".join(QUANTITIES),
                       help=f"comma-separated subset of {', '.join(QUANTITIES)} (default: all)")
    sharp.add_argument("--checkpoint", choices=("last", "best"), default="last")
    sharp.add_argument("--per-class", type=int, default=64,
                       help="training images per class in the analysis batch (default 64)")
    sharp.add_argument("--rho", type=float, default=0.05, help="sharpness radius (default 0.05)")
    sharp.add_argument("--eta", type=int, help="tail threshold (default: the run's few-shot one)")
    sharp.add_argument("--hvps", type=int, default=60, help="Hutch++ budget (default 60)")
    sharp.add_argument("--seed", type=int, default=0)
    sharp.add_argument("--out", help="output directory (default RUN_DIR/sharpness)")
    sharp.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bars (output to a file or pipe never gets them)")
    sharp.set_defaults(func=_sharpness)

    methods = sub.add_parser("methods", help="list the optimizers",
                             description="List the optimizers samkit registers, by name.")
    methods.set_defaults(func=_methods)

    download = sub.add_parser(
        "download", help="download a data set (checksum verified)",
        description="Download a data set with a public address into ROOT (default: "
                    "$SAMKIT_DATA or ~/.cache/samkit/data), verifying its checksum.")
    download.add_argument("name", help="fashion-mnist, mnist, cifar10 or cifar100")
    download.add_argument("--root", help="target directory")
    download.add_argument("--quiet", "-q", action="store_true")
    download.set_defaults(func=_download)
    return parser


def _one_line(err: BaseException) -> str:
    """An exception as one line; an OSError keeps its file and reason."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a command; every failure ends in one `error:` line and a non-zero exit (set
    SAMKIT_TRACEBACK=1 to see the traceback of an unexpected one)."""
    import os

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value after a flag (`recipe.yaml a=b --quiet c=d`) is still an override
        if hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted; nothing is lost: run the command again (with --resume for "
              "samkit train) to continue", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"error: {_one_line(err)}; check the path, its permissions and the free space",
              file=sys.stderr)
        return 1
    except ImportError as err:
        hint = "" if "install" in str(err) else "; install the missing package"
        print(f"error: {_one_line(err)}{hint}", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get("SAMKIT_TRACEBACK"):
            raise
        print(f"error: {type(err).__name__}: {_one_line(err)} (SAMKIT_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
