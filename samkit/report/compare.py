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
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from samkit.train.config import Config, ConfigError, _merge, _set, load_config, read_yaml

COMPARE_KEYS = {"base", "out", "seeds", "methods"}


@dataclass
class PlannedRun:
    label: str  # the report's row: method label plus grid values
    seed: int
    config: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.out) / self.config.run.name


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


def expand(spec: dict[str, Any] | str | Path, overrides: list[str] | None = None,
           seeds: list[int] | None = None, only: list[str] | None = None) -> list[PlannedRun]:
    """The runs a compare recipe asks for, seed by seed (each seed: every method and grid point).

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
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise ConfigError(f"seeds must be a non-empty list of integers; got {seeds!r}")
    if only:
        missing = sorted(set(only) - set(methods))
        if missing:
            raise ConfigError(f"method {missing[0]} is not in the compare recipe; it has "
                              f"{', '.join(methods)}")
        methods = {k: v for k, v in methods.items() if k in only}
    out = str(spec.get("out", "runs/compare"))
    points = []  # (label, row label, run-name stem, method overrides, grid point)
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
            points.append((label, row, stem, entry, point))
    runs = []
    for seed in seeds:  # seed-major: a partial compare already holds every method once
        for label, row, stem, entry, point in points:
            tree = _merge(base, entry)
            for section, values in entry.items():  # a method's kwargs replace the base's
                if isinstance(values, dict) and isinstance(values.get("kwargs"), dict):
                    tree[section]["kwargs"] = copy.deepcopy(values["kwargs"])
            for key, value in point.items():
                _set(tree, key, value)
            run = {"out": out, "name": f"{stem}-s{seed}", "seed": seed, "label": row}
            try:
                config = load_config(_merge(tree, {"run": run}), overrides)
            except ConfigError as err:
                raise ConfigError(f"methods.{label}: {err}") from None
            runs.append(PlannedRun(row, seed, config))
    return runs


def run_all(runs: list[PlannedRun], progress: bool = True) -> list[Path]:
    """Train every planned run (skipping finished ones, resuming interrupted ones)."""
    from samkit.train.loop import Trainer

    done = []
    for i, planned in enumerate(runs, 1):
        if progress:
            state = "done" if (planned.run_dir / "summary.json").exists() else "running"
            print(f"[{i}/{len(runs)}] {planned.label} seed {planned.seed}: {state} "
                  f"({planned.run_dir})", flush=True)
        Trainer(planned.config, resume=True, progress=progress).run()
        done.append(planned.run_dir)
    return done
