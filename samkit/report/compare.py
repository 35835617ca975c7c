"""`samkit compare`: a grid of methods x seeds (x hyperparameter values) on one protocol.

A compare recipe is YAML:

    base: {...}              # a training recipe (or `base: path/to/recipe.yaml`)
    out: runs/fmnist-compare # where the runs and the report go
    seeds: [0, 1, 2]
    methods:                 # label -> overrides of the base recipe, plus an optional grid
      sam: {optim: {method: sam, kwargs: {rho: 0.05}}}
      focalsam:
        optim: {method: focalsam, kwargs: {rho: 0.1, gamma: 2.0, lam: 0.8}}
        grid: {optim.kwargs.rho: [0.05, 0.1]}

A method's `kwargs` (optim.kwargs, loss.kwargs) replace the base recipe's rather than merge with
them, since hyperparameters of one method do not fit another. Every run gets its own directory,
out/<label>[-key=value...]-s<seed>. Finished runs are skipped and
interrupted ones resume, so a compare can be stopped and started again at no cost.

A tuning stage chooses each method's grid point on validation data before any test number is
seen:

    tune: {seeds: [0], metric: val_overall, epochs: 20}   # epochs: optional override

With `tune`, every grid point of a method with more than one point is first trained on the
tuning seeds with run.eval_test=false (the test set is never loaded) in out/tune/; the point
with the highest mean `metric` (val_overall, val_many, val_medium or val_few) at the LAST epoch
over the tuning seeds is chosen (the last epoch, because the report's headline is the last
epoch's accuracy; ties go to the point listed first; a run that stopped on non-finite values
scores nothing). out/tuning.json records every point's scores, the choice and why; then only the
chosen point of each method is trained over the compare's seeds, with the test set, as
out/<label>[-key=value...]-s<seed> like any run. The base recipe needs a validation set
(data.val_per_class or data.val_fraction). Re-running skips finished tuning and final runs.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from samkit.train.config import Config, ConfigError, _merge, _set, load_config, read_yaml
from samkit.train.records import read_json

COMPARE_KEYS = {"base", "out", "seeds", "methods", "tune"}
TUNE_KEYS = {"seeds", "metric", "epochs"}
TUNE_METRICS = ("val_overall", "val_many", "val_medium", "val_few")
TUNING = "tuning.json"


@dataclass
class PlannedRun:
    label: str  # the report's row: method label plus grid values
    seed: int
    config: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.out) / self.config.run.name


@dataclass
class Point:
    """One grid point of a method."""

    method: str  # the method's label in the recipe
    row: str  # the report's row: label plus grid values
    stem: str  # run-directory name before -s<seed>
    entry: dict[str, Any]  # the method's overrides (grid removed)
    values: dict[str, Any]  # dotted key -> value of this point


@dataclass
class Tune:
    """The tuning stage of a compare recipe (see the module docstring)."""

    seeds: list[int]
    metric: str
    epochs: int | None


@dataclass
class Compare:
    """A read compare recipe: its base, grid points, seeds and optional tuning stage."""

    base: dict[str, Any]
    out: str
    seeds: list[int]
    points: list[Point]
    overrides: list[str]
    tune: Tune | None

    @property
    def tuning_path(self) -> Path:
        return Path(self.out) / TUNING

    def by_method(self) -> dict[str, list[Point]]:
        methods: dict[str, list[Point]] = {}
        for point in self.points:
            methods.setdefault(point.method, []).append(point)
        return methods

    def runs(self, points: list[Point] | None = None, seeds: list[int] | None = None, *,
             tuning: bool = False) -> list[PlannedRun]:
        """Planned runs of `points` (default: all) x `seeds` (default: the compare's), seed by
        seed; `tuning`: the tuning stage's runs (out/tune, test set never loaded)."""
        points = self.points if points is None else points
        seeds = self.seeds if seeds is None else seeds
        out = str(Path(self.out) / "tune") if tuning else self.out
        runs = []
        for seed in seeds:  # seed-major: a partial compare already holds every method once
            for p in points:
                tree = _merge(self.base, p.entry)
                for section, values in p.entry.items():  # a method's kwargs replace the base's
                    if isinstance(values, dict) and isinstance(values.get("kwargs"), dict):
                        tree[section]["kwargs"] = copy.deepcopy(values["kwargs"])
                for key, value in p.values.items():
                    _set(tree, key, value)
                run = {"out": out, "name": f"{p.stem}-s{seed}", "seed": seed, "label": p.row}
                try:
                    config = load_config(_merge(tree, {"run": run}), self.overrides)
                except ConfigError as err:
                    raise ConfigError(f"methods.{p.method}: {err}") from None
                if tuning:  # enforced over any override: tuning never sees the test set
                    assert self.tune is not None
                    config.run.eval_test = False
                    config.run.out = out  # apart from the final runs, whatever run.out says
                    if self.tune.epochs is not None:
                        config.schedule.epochs = self.tune.epochs
                runs.append(PlannedRun(p.row, seed, config))
        return runs

    def tuned_points(self) -> list[Point]:
        """The points the tuning stage trains: those of methods with more than one point."""
        return [p for ps in self.by_method().values() if len(ps) > 1 for p in ps]

    def tuning_runs(self) -> list[PlannedRun]:
        if self.tune is None:
            return []
        return self.runs(self.tuned_points(), self.tune.seeds, tuning=True)

    def final_runs(self, chosen: dict[str, str] | None = None) -> list[PlannedRun]:
        """The runs over the compare's seeds: every point without a tuning stage, else each
        method's chosen row (`chosen`: method label -> row)."""
        if self.tune is None:
            return self.runs()
        if chosen is None:
            raise ValueError("the final runs of a tuned compare need the tuning stage's choice")
        return self.runs([p for p in self.points if chosen.get(p.method) == p.row])


def _short(key: str) -> str:
    return key.split(".")[-1]


def _read(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from `path`, or a ConfigError naming the file and the fix."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; give the path of a YAML file")
    try:
        tree = read_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} is not valid UTF-8 YAML "
                          f"({' '.join(str(err).split())}); fix the file") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} is a YAML {type(tree).__name__}, not a mapping")
    return tree


def read_compare(spec: dict[str, Any] | str | Path, overrides: list[str] | None = None,
                 seeds: list[int] | None = None, only: list[str] | None = None) -> Compare:
    """A compare recipe (a mapping or a YAML path), checked.

    `overrides` (key=value) apply to the base recipe of every run; `seeds` and `only` (method
    labels) narrow the grid.
    """
    if not isinstance(spec, dict):
        path = Path(spec)
        spec = _read(path, "compare recipe")
        base_dir = path.parent
    else:
        base_dir = Path(".")
    unknown = sorted(set(spec) - COMPARE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]} in the compare recipe; valid keys: "
                          f"{', '.join(sorted(COMPARE_KEYS))}")
    base = spec.get("base", {})
    if isinstance(base, str):
        base = _read(Path(base) if Path(base).is_absolute() else base_dir / base,
                     "the compare recipe's base:")
    if not isinstance(base, dict):
        raise ConfigError(f"base must be a training recipe (a mapping) or its path; got {base!r}")
    methods = spec.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError("the compare recipe needs methods: a mapping label -> overrides")
    seeds = seeds if seeds is not None else spec.get("seeds", [0])
    if not _int_list(seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers; got {seeds!r}")
    if only:
        missing = sorted(set(only) - set(methods))
        if missing:
            raise ConfigError(f"method {missing[0]} is not in the compare recipe; it has "
                              f"{', '.join(methods)}")
        methods = {k: v for k, v in methods.items() if k in only}
    points = []
    for label, entry in methods.items():
        entry = copy.deepcopy(entry) if entry else {}
        if not isinstance(entry, dict):
            raise ConfigError(f"methods.{label} must be a mapping of recipe overrides")
        grid = entry.pop("grid", {}) or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"methods.{label}.grid must map dotted keys to non-empty lists")
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values, strict=True))
            row = label + "".join(f" {_short(k)}={v}" for k, v in point.items())
            stem = label + "".join(f"-{_short(k)}={v}" for k, v in point.items())
            points.append(Point(label, row, stem, entry, point))
    compare = Compare(base, str(spec.get("out", "runs/compare")), seeds, points,
                      list(overrides or []), _tune(spec.get("tune")))
    runs = compare.runs(seeds=compare.seeds[:1])  # every point's recipe checked once
    if compare.tune is not None:
        from samkit.data import PRESETS

        d = runs[0].config.data
        if not (d.val_per_class or d.val_fraction or d.val_list or d.name in PRESETS):
            raise ConfigError("tune selects on a validation set, and the base recipe has none: "
                              "set data.val_per_class=N (built-in sets) or data.val_fraction")
    return compare


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in value)


def _tune(tree: Any) -> Tune | None:
    """The `tune` section, checked (None when the recipe has none)."""
    if tree is None:
        return None
    if not isinstance(tree, dict):
        raise ConfigError(f"tune must be a mapping (seeds, metric, epochs); got {tree!r}")
    unknown = sorted(set(tree) - TUNE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key tune.{unknown[0]}; valid keys: {', '.join(sorted(TUNE_KEYS))}")
    seeds, metric, epochs = tree.get("seeds", [0]), tree.get("metric", "val_overall"), \
        tree.get("epochs")
    if not _int_list(seeds):
        raise ConfigError(f"tune.seeds must be a non-empty list of integers; got {seeds!r}")
    if metric not in TUNE_METRICS:
        raise ConfigError(f"tune.metric must be one of {', '.join(TUNE_METRICS)}; got {metric!r}")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool)
                               or epochs < 1):
        raise ConfigError(f"tune.epochs must be an integer >= 1 (or left out); got {epochs!r}")
    return Tune(seeds, metric, epochs)


def expand(spec: dict[str, Any] | str | Path, overrides: list[str] | None = None,
           seeds: list[int] | None = None, only: list[str] | None = None) -> list[PlannedRun]:
    """Every grid point x seed of a compare recipe, seed by seed (a tuning stage, if any, is
    not applied: see :func:`read_compare` and :func:`run_compare`)."""
    return read_compare(spec, overrides, seeds, only).runs()


def select(compare: Compare, write: bool = True) -> dict[str, Any]:
    """The tuning stage's choice, from its finished runs: per method, the point with the highest
    mean validation metric at the last epoch over the tuning seeds (ties: the first listed).
    Written to out/tuning.json (if `write`). Raises ValueError if a tuning run has not ended or
    a method has no point with a score."""
    tune = compare.tune
    if tune is None:
        raise ValueError("select needs a compare recipe with a tune section")
    record: dict[str, Any] = {
        "metric": tune.metric, "at": "last epoch", "seeds": tune.seeds, "epochs": tune.epochs,
        "rule": f"highest mean {tune.metric} at the last epoch over tuning seeds {tune.seeds}; "
                "ties go to the point listed first; the test set is never loaded while tuning",
        "methods": {}}
    runs = {(r.label, r.seed): r for r in compare.tuning_runs()}
    for method, points in compare.by_method().items():
        if len(points) == 1:
            record["methods"][method] = {
                "chosen": points[0].row, "setting": points[0].values, "score": None,
                "why": "one setting only: nothing to choose (not tuned)", "points": []}
            continue
        scored = []
        for p in points:
            entries, scores = [], []
            for seed in tune.seeds:
                run_dir = runs[p.row, seed].run_dir
                entry: dict[str, Any] = {"seed": seed, "run": str(run_dir)}
                if (run_dir / "summary.json").exists():
                    value = read_json(run_dir / "summary.json")["last"].get(tune.metric)
                    entry["score"] = value
                    if value is not None:
                        scores.append(value)
                elif (run_dir / "stopped.json").exists():
                    entry["stopped"] = read_json(run_dir / "stopped.json").get("reason")
                else:
                    raise ValueError(f"tuning run {run_dir} has not finished; run the compare "
                                     "again to finish it")
                entries.append(entry)
            score = sum(scores) / len(scores) if len(scores) == len(tune.seeds) else None
            scored.append({"row": p.row, "setting": p.values, "score": score, "runs": entries})
        valid = [s for s in scored if s["score"] is not None]
        if not valid:
            raise ValueError(f"no grid point of {method} has a {tune.metric} on every tuning "
                             f"seed (runs stopped, or the group has no class); see "
                             f"{Path(compare.out) / 'tune'}")
        best = max(valid, key=lambda s: s["score"])  # max keeps the first of equal scores
        record["methods"][method] = {
            "chosen": best["row"], "setting": best["setting"], "score": best["score"],
            "why": f"highest mean {tune.metric} ({best['score']:.4f}) of {len(scored)} settings "
                   f"at the last epoch over seeds {tune.seeds}",
            "points": scored}
    if write:
        from samkit.train.checkpoint import write_json

        Path(compare.out).mkdir(parents=True, exist_ok=True)
        write_json(compare.tuning_path, record)
    return record


def tuning_finished(compare: Compare) -> bool:
    """Whether every tuning run has ended (finished, or stopped on non-finite values)."""
    return all((r.run_dir / "summary.json").exists() or (r.run_dir / "stopped.json").exists()
               for r in compare.tuning_runs())


def run_compare(compare: Compare, progress: bool = True) -> tuple[list[Path], dict | None]:
    """Run a compare: the tuning stage if any (then select, writing tuning.json), then the
    final runs. Returns the final runs' directories and the tuning record (None untuned)."""
    record = None
    if compare.tune is not None:
        run_all(compare.tuning_runs(), progress, stage="tuning", keep_going=True)
        record = select(compare)
        chosen = {m: r["chosen"] for m, r in record["methods"].items()}
        if progress:
            for method, r in record["methods"].items():
                print(f"tuning chose {r['chosen']} for {method}: {r['why']}", flush=True)
        return run_all(compare.final_runs(chosen), progress, stage="final"), record
    return run_all(compare.final_runs(), progress), record


def run_all(runs: list[PlannedRun], progress: bool = True, stage: str = "",
            keep_going: bool = False) -> list[Path]:
    """Train every planned run (skipping finished ones, resuming interrupted ones).

    `keep_going` (the tuning stage): a run that stops on non-finite values (a too-large radius,
    say) is left stopped and the next one starts; it is not retried when the compare runs again.
    """
    from samkit.train.checkpoint import write_json
    from samkit.train.loop import STOPPED, Trainer, TrainingError

    done = []
    for i, planned in enumerate(runs, 1):
        stopped = (planned.run_dir / STOPPED).exists() and not (
            planned.run_dir / "summary.json").exists()
        if progress:
            state = ("done" if (planned.run_dir / "summary.json").exists() else
                     "stopped (non-finite)" if stopped and keep_going else "running")
            print(f"[{stage + ' ' if stage else ''}{i}/{len(runs)}] {planned.label} seed "
                  f"{planned.seed}: {state} ({planned.run_dir})", flush=True)
        if not (stopped and keep_going):
            try:
                Trainer(planned.config, resume=True, progress=progress).run()
            except TrainingError as err:
                if not keep_going:
                    raise
                if not (planned.run_dir / STOPPED).exists():  # stopped before a checkpoint
                    planned.run_dir.mkdir(parents=True, exist_ok=True)
                    write_json(planned.run_dir / STOPPED, {"epoch": None, "reason": str(err)})
                if progress:
                    print(f"  stopped: {err}", flush=True)
        done.append(planned.run_dir)
    return done
