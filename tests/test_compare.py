"""`samkit compare` and `samkit report`: grid expansion, resumption, and a report equal to its runs."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest

import samkit.optim as so
from samkit.cli import main
from samkit.data import long_tail_counts
from samkit.losses import CrossEntropy
from samkit.models import build_model
from samkit.report.compare import expand, run_all
from samkit.report.table import mean_std, write_report
from samkit.train.config import ConfigError, load_config
from samkit.train.loop import Interrupted, Trainer, make_optimizer

FASHION: Path | None = None  # the generated stand-in, set for every test by generated_fashion


@pytest.fixture(autouse=True)
def generated_fashion(tiny_fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every compare recipe here reads the generated Fashion-MNIST stand-in (tests/datagen.py)."""
    monkeypatch.setitem(globals(), "FASHION", tiny_fmnist)


def spec(tmp_path: Path) -> dict:
    return {
        "base": {
            "data": {"name": "fashion-mnist", "root": str(FASHION), "limit_per_class": 200,
                     "batch_size": 64, "many": 100, "few": 10},
            "schedule": {"epochs": 2},
            "run": {"max_steps_per_epoch": 3, "deterministic": True},
        },
        "out": str(tmp_path / "cmp"),
        "seeds": [0, 1],
        "methods": {
            "plain": {"optim": {"method": "plain", "kwargs": {}}},
            "sam": {"optim": {"method": "sam", "kwargs": {"rho": 0.05}}},
        },
    }


def test_grid_expands_methods_grid_points_and_seeds(tmp_path: Path) -> None:
    s = spec(tmp_path)
    s["methods"]["sam"]["grid"] = {"optim.kwargs.rho": [0.02, 0.1]}
    runs = expand(s, ["optim.lr=0.01"])
    assert [(r.label, r.seed) for r in runs] == [
        ("plain", 0), ("sam rho=0.02", 0), ("sam rho=0.1", 0),
        ("plain", 1), ("sam rho=0.02", 1), ("sam rho=0.1", 1)]
    assert runs[2].config.optim.kwargs == {"rho": 0.1}
    assert runs[2].run_dir == tmp_path / "cmp" / "sam-rho=0.1-s0"
    assert all(r.config.optim.lr == 0.01 and r.config.run.seed == r.seed for r in runs)
    assert all(r.config.data.subsample_seed == 0 for r in runs)  # one split for every seed
    assert [r.label for r in expand(s, seeds=[5], only=["plain"])] == ["plain"]


@pytest.mark.parametrize("change,match", [
    ({"metods": {}}, "unknown key metods in the compare recipe"),
    ({"methods": {}}, "needs methods"),
    ({"seeds": "0,1"}, "seeds must be a non-empty list of integers"),
    ({"methods": {"x": {"optim": {"methd": "sam"}}}}, r"methods.x: unknown key optim.methd"),
    ({"methods": {"x": {"grid": {"optim.lr": 0.1}}}}, r"methods.x.grid must map dotted keys"),
])
def test_bad_compare_recipes_are_named(tmp_path: Path, change: dict, match: str) -> None:
    s = {**spec(tmp_path), **change}
    with pytest.raises(ConfigError, match=match):
        expand(s)
    with pytest.raises(ConfigError, match="method adam is not in the compare recipe"):
        expand(spec(tmp_path), only=["adam"])


def test_tiny_compare_resumes_and_reports_its_runs(tmp_path: Path) -> None:
    runs = expand(spec(tmp_path))
    # one run interrupted mid-way before the compare starts
    def stop(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        Trainer(runs[1].config, progress=False, on_step=stop).run()
    assert not (runs[1].run_dir / "summary.json").exists()
    run_dirs = run_all(runs, progress=False)
    stamps = {d: (d / "summary.json").stat().st_mtime_ns for d in run_dirs}
    run_all(runs, progress=False)  # everything finished: nothing is redone
    assert stamps == {d: (d / "summary.json").stat().st_mtime_ns for d in run_dirs}
    straight = Trainer(expand(spec(tmp_path / "again"))[1].config, progress=False).run()
    resumed = json.loads((runs[1].run_dir / "summary.json").read_text())
    assert resumed["last"] == straight["last"]

    paths = write_report(run_dirs, tmp_path / "report")
    assert [p.name for p in paths] == ["report.md", "report.csv", "accuracy_vs_throughput.png",
                                       "per_class.png", "curves.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    with open(paths[1]) as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"plain", "sam"}
    for label, row in rows.items():
        mine = [s for s in summaries if s["label"] == label]
        assert int(row["seeds"]) == 2
        for g in ("overall", "many", "medium", "few"):
            mean, std = mean_std([s["last"][g] for s in mine])
            assert float(row[f"{g}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(row[f"{g}_std"]) == pytest.approx(std, abs=1e-12)
        assert float(row["forwards_per_step"]) == (1.0 if label == "plain" else 2.0)
    md = paths[0].read_text()
    assert "| sam | 2 |" in md and "2F 2B" in md


def test_report_command_refuses_unfinished_runs(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "r").mkdir()
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "out")]) == 2
    assert "has no summary.json" in capsys.readouterr().err


def test_compare_command_plans(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(spec(tmp_path)))  # JSON is YAML
    assert main(["compare", str(path), "--plan", "--seeds", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == [str(tmp_path / "cmp" / "plain-s3"),
                                                 str(tmp_path / "cmp" / "sam-s3")]


def test_shipped_recipes_build_every_optimizer() -> None:
    """Each planned run of each shipped recipe resolves and builds its optimizer."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    model = build_model("mlp", num_classes=10, in_channels=1)
    counts = long_tail_counts(5000, 10, 100)
    for path in sorted(configs.glob("compare_*.yaml")):
        runs = expand(path)
        assert len(runs) >= 4, path
        for planned in runs:
            opt = make_optimizer(planned.config, model, counts, CrossEntropy())
            assert type(opt) is so.get(planned.config.optim.method), planned.label
    for path in sorted(set(configs.glob("*.yaml")) - set(configs.glob("compare_*.yaml"))):
        config = load_config(path)
        assert config.optim.method in so.available(), path


def test_report_adds_the_sharpness_of_runs_that_have_it(tmp_path: Path) -> None:
    from samkit.analysis.run import analyse_run

    s = spec(tmp_path)
    s["methods"] = {"plain": s["methods"]["plain"]}
    runs = run_all(expand(s, seeds=[0]), progress=False)
    analyse_run(runs[0], what=("trace", "classwise"), per_class=4, hvps=6, progress=False)
    result = json.loads((runs[0] / "sharpness" / "sharpness.json").read_text())
    paths = write_report(runs, tmp_path / "report")
    md = paths[0].read_text()
    assert "| method | Hessian trace | trace / ‖g‖ | sharpness many |" in md  # no stray pipes
    with open(paths[1]) as f:
        row = next(csv.DictReader(f))
    assert float(row["normalized_trace"]) == pytest.approx(result["normalized_trace"]["value"])
    assert float(row["trace"]) == pytest.approx(result["trace"]["estimate"])
