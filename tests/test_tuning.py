"""Validation splits, validation-chosen best epochs, the tuning stage of `samkit compare` (the test
set never read before selection ends), and the report's intervals and paired differences."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

import samkit.train.data as train_data
from samkit.cli import main
from samkit.report.compare import read_compare, run_compare, select
from samkit.report.stats import (
    incomplete_beta,
    mean_interval,
    paired_interval,
    t_cdf,
    t_quantile,
    within_noise,
)
from samkit.report.table import write_report
from samkit.train.config import ConfigError, load_config, resume_changes
from samkit.train.data import prepare_data
from samkit.train.loop import Trainer

# ------------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764),
                                         (9, 2.2622), (29, 2.0452), (120, 1.9799)])
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_distribution_closed_forms() -> None:
    for p in (0.6, 0.9, 0.99):  # df 1 is Cauchy; df 2 has (2p - 1) sqrt(2 / (4 p (1 - p)))
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))),
                                                 rel=1e-9)
    assert t_cdf(0.0, 7) == pytest.approx(0.5, abs=1e-15)
    assert t_cdf(1.5, 5) + t_cdf(-1.5, 5) == pytest.approx(1.0, abs=1e-12)
    assert incomplete_beta(2.0, 3.0, 0.3) == pytest.approx(1 - incomplete_beta(3.0, 2.0, 0.7))
    # I_x(1, b) = 1 - (1 - x)^b
    assert incomplete_beta(1.0, 4.0, 0.2) == pytest.approx(1 - 0.8 ** 4, rel=1e-12)
    with pytest.raises(ValueError, match="p in"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(1.0, 0)


def test_intervals_by_hand() -> None:
    mean, half, n = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, s = sqrt(2.5), t_{0.975,4} = 2.776445
    assert (mean, n) == (3.0, 5)
    assert half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert math.isnan(mean_interval([0.7])[1]) and math.isnan(mean_interval([None])[0])
    # seeds 0-2 paired (3 only in the reference, 4 NaN): differences 0.1, 0.2, 0.1
    mean, half, seeds = paired_interval({0: 0.5, 1: 0.6, 2: 0.7, 4: math.nan},
                                        {0: 0.4, 1: 0.4, 2: 0.6, 3: 0.9, 4: 0.5})
    assert seeds == [0, 1, 2] and mean == pytest.approx(0.4 / 3)
    assert half == pytest.approx(4.302653 * statistics.stdev([0.1, 0.2, 0.1]) / math.sqrt(3),
                                 rel=1e-6)
    assert within_noise(mean, half) is True and within_noise(0.3, 0.1) is False
    assert within_noise(0.3, math.nan) is None


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs skip their plots (half a tiny run's time; the plots are tested elsewhere)."""
    import samkit.report.plots as plots

    monkeypatch.setattr(plots, "plot_run", lambda run_dir: [])


# ------------------------------------------------------------------------------------------------
# validation split and the trainer


def recipe(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.limit_per_class=300", "data.n_max=200", "data.ratio=10",
            "data.batch_size=64", "data.many=100", "data.few=30", "schedule.epochs=2",
            "run.max_steps_per_epoch=3", "run.deterministic=true", "optim.method=plain",
            "optim.kwargs={}", f"run.out={tmp_path}", *extra]


def test_val_per_class_is_balanced_seeded_and_disjoint(tiny_fmnist: Path, tmp_path: Path) -> None:
    config = load_config(None, recipe(tiny_fmnist, tmp_path, "data.val_per_class=40"))
    data = prepare_data(config, progress=False)
    lt, val = data.split["indices"], data.split["val"]["indices"]
    assert not set(lt) & set(val)
    assert data.val.class_counts() == [40] * 10 and len(val) == len(set(val)) == 400
    assert data.train.class_counts() == data.counts and data.counts[0] == 200
    again = prepare_data(config, progress=False).split["val"]["indices"]
    other = prepare_data(load_config(None, recipe(tiny_fmnist, tmp_path, "data.val_per_class=40",
                                                  "data.subsample_seed=1")), progress=False)
    assert again == val and other.split["val"]["indices"] != val
    assert not set(other.split["indices"]) & set(other.split["val"]["indices"])
    # the validation images are the loaded training images at those indices
    full = train_data.load_dataset("fashion-mnist", split="train", root=tiny_fmnist,
                                   limit_per_class=300)
    assert bool((full.images[np.asarray(val)] == data.val.images).all())


def test_val_split_errors_and_the_held_out_fraction(tiny_fmnist: Path, tmp_path: Path) -> None:
    # class 0 keeps 200 of its 300 images: 100 are left over
    with pytest.raises(ConfigError, match=r"leaves only 100 unused images of class 0 .*at most 100"):
        prepare_data(load_config(None, recipe(tiny_fmnist, tmp_path, "data.val_per_class=101")),
                     progress=False)
    with pytest.raises(ConfigError, match="profile=none leaves none; use data.val_fraction"):
        prepare_data(load_config(None, recipe(tiny_fmnist, tmp_path, "data.val_per_class=5",
                                              "data.profile=none")), progress=False)
    with pytest.raises(ConfigError, match="set one of them to 0"):
        load_config(None, ["data.val_per_class=5", "data.val_fraction=0.1"])
    with pytest.raises(ConfigError, match="data.val_per_class must be >= 0"):
        load_config(None, ["data.val_per_class=-1"])
    data = prepare_data(load_config(None, recipe(tiny_fmnist, tmp_path, "data.profile=none",
                                                 "data.val_fraction=0.1")), progress=False)
    assert data.val.class_counts() == [30] * 10 and data.train.class_counts() == [270] * 10
    assert not (set(data.split["val"]["indices"]) & set(range(0)))  # indices recorded
    assert len(data.split["val"]["indices"]) == 300


def test_runs_recorded_before_the_new_keys_still_resume() -> None:
    saved = load_config(None, ["data.ratio=10"]).to_dict()
    del saved["data"]["val_per_class"], saved["run"]["eval_test"]  # an older run's config.yaml
    assert resume_changes(saved, load_config(None, ["data.ratio=10"])) == []
    with pytest.raises(ConfigError, match="data.val_per_class: 0 -> 5"):
        resume_changes(saved, load_config(None, ["data.ratio=10", "data.val_per_class=5"]))


def count_test_reads(monkeypatch: pytest.MonkeyPatch, log: list[str],
                     when: callable = lambda: "") -> None:
    """Log every load of the test split (with `when()` at that moment) through samkit.train.data."""
    real = train_data.load_dataset

    def spy(name: str, split: str = "train", **kwargs: object) -> object:
        log.append(f"{split}{when()}")
        return real(name, split=split, **kwargs)

    monkeypatch.setattr(train_data, "load_dataset", spy)


def test_best_epoch_is_chosen_on_validation(tiny_fmnist: Path, tmp_path: Path,
                                            no_plots: None) -> None:
    config = load_config(None, recipe(tiny_fmnist, tmp_path, "data.val_per_class=20",
                                      "run.name=v"))
    summary = Trainer(config, progress=False, verbose=False).run()
    metrics = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").open()]
    assert all({"val_overall", "val_many", "val_medium", "val_few", "overall"} <= set(m)
               for m in metrics)
    best = max(metrics, key=lambda m: m["val_overall"])  # max keeps the first of equal values
    assert summary["best"]["epoch"] == best["epoch"]
    assert summary["best"]["chosen_on"] == "validation"
    assert summary["best"]["overall"] == best["overall"]  # its test accuracy, reported as such
    assert summary["last"]["val_overall"] == metrics[-1]["val_overall"]
    assert set(summary["pairing"]) == {"split", "init", "batches"}
    plain = Trainer(load_config(None, recipe(tiny_fmnist, tmp_path, "run.name=t",
                                             "schedule.epochs=1")),
                    progress=False, verbose=False).run()
    assert plain["best"]["chosen_on"] == "test (optimistic)" and "optimistic" in plain["note"]


def test_eval_test_false_never_loads_the_test_set(tiny_fmnist: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    count_test_reads(monkeypatch, log)
    config = load_config(None, recipe(tiny_fmnist, tmp_path, "data.val_per_class=20",
                                      "run.eval_test=false", "run.name=v"))
    summary = Trainer(config, progress=False, verbose=False).run()
    assert log == ["train"]
    assert summary["test_read"] is False and summary["last"]["overall"] is None
    assert summary["last"]["val_overall"] is not None and summary["per_class"] is None
    assert (tmp_path / "v" / "plots" / "curves.png").exists()
    bare = load_config(None, recipe(tiny_fmnist, tmp_path, "run.eval_test=false", "run.name=b"))
    with pytest.raises(ValueError, match="run.eval_test=false needs a validation set"):
        Trainer(bare, progress=False, verbose=False).run()
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------
# the tuning stage


def tuned_spec(root: Path, out: Path) -> dict:
    base = {"data": {"name": "fashion-mnist", "root": str(root), "limit_per_class": 300,
                     "n_max": 200, "ratio": 10, "val_per_class": 20, "batch_size": 64,
                     "many": 100, "few": 30},
            "schedule": {"epochs": 2}, "run": {"max_steps_per_epoch": 3, "deterministic": True}}
    return {"base": base, "out": str(out), "seeds": [0, 1],
            "tune": {"seeds": [0], "metric": "val_overall", "epochs": 1},
            "methods": {"plain": {"optim": {"method": "plain", "kwargs": {}}},
                        "sam": {"optim": {"method": "sam", "kwargs": {"rho": 0.05}},
                                "grid": {"optim.kwargs.rho": [0.01, 0.5]}}}}


def fake_summary(run_dir: Path, score: float | None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"last": {"val_overall": score}}))


def test_selection_takes_the_best_mean_and_the_first_of_ties(tiny_fmnist: Path,
                                                             tmp_path: Path) -> None:
    spec = tuned_spec(tiny_fmnist, tmp_path / "cmp")
    spec["tune"]["seeds"] = [0, 1]
    spec["methods"]["sam"]["grid"] = {"optim.kwargs.rho": [0.01, 0.05, 0.1, 0.5]}
    compare = read_compare(spec)
    runs = {(r.label, r.seed): r.run_dir for r in compare.tuning_runs()}
    assert all(r.config.run.eval_test is False and r.config.schedule.epochs == 1
               for r in compare.tuning_runs())
    assert {label for label, _ in runs} == {f"sam rho={v}" for v in (0.01, 0.05, 0.1, 0.5)}
    with pytest.raises(ValueError, match="has not finished"):
        select(compare)
    scores = {0.01: (0.5, 0.7), 0.05: (0.7, 0.5), 0.1: (0.4, 0.6), 0.5: (0.9, None)}
    for rho, (a, b) in scores.items():
        fake_summary(runs[f"sam rho={rho}", 0], a)
        if b is None:  # a run that stopped on non-finite values scores nothing
            runs[f"sam rho={rho}", 1].mkdir(parents=True)
            (runs[f"sam rho={rho}", 1] / "stopped.json").write_text('{"reason": "nan"}')
        else:
            fake_summary(runs[f"sam rho={rho}", 1], b)
    record = select(compare)
    sam = record["methods"]["sam"]
    assert sam["chosen"] == "sam rho=0.01" and sam["score"] == pytest.approx(0.6)  # tie: first
    assert [p["score"] for p in sam["points"]] == [pytest.approx(0.6), pytest.approx(0.6),
                                                   pytest.approx(0.5), None]
    assert sam["points"][3]["runs"][1]["stopped"] == "nan"
    assert record["methods"]["plain"]["why"].startswith("one setting only")
    assert json.loads(compare.tuning_path.read_text()) == json.loads(json.dumps(record))
    assert [r.label for r in compare.final_runs({"plain": "plain", "sam": "sam rho=0.01"})] == [
        "plain", "sam rho=0.01", "plain", "sam rho=0.01"]


@pytest.mark.parametrize("change,match", [
    ({"tune": {"metric": "overall"}}, "tune.metric must be one of val_overall"),
    ({"tune": {"seed": [0]}}, "unknown key tune.seed"),
    ({"tune": {"epochs": 0}}, "tune.epochs must be an integer >= 1"),
    ({"tune": [0]}, "tune must be a mapping"),
])
def test_bad_tune_sections_are_named(tiny_fmnist: Path, tmp_path: Path, change: dict,
                                     match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        read_compare({**tuned_spec(tiny_fmnist, tmp_path), **change})
    spec = tuned_spec(tiny_fmnist, tmp_path)
    del spec["base"]["data"]["val_per_class"]
    with pytest.raises(ConfigError, match="tune selects on a validation set"):
        read_compare(spec)


def test_tuned_compare_selects_before_reading_the_test_set(
        tiny_fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, no_plots: None) -> None:
    out = tmp_path / "cmp"
    path = tmp_path / "compare.yaml"
    spec = tuned_spec(tiny_fmnist, out)
    spec["seeds"] = [1]  # the compare's seeds need not include the tuning seed
    path.write_text(yaml.safe_dump(spec))
    assert main(["compare", str(path), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "stage 1, tuning: 2 runs on seeds [0]" in plan and "tune/sam-rho=0.5-s0" in plan
    assert f"{out}/sam-<chosen>-s<seed>  [one of 2 settings, chosen by tuning]  x 1 seeds" in plan
    assert f"{out}/plain-s<seed>  [plain: one setting, not tuned]" in plan

    log: list[str] = []
    count_test_reads(monkeypatch, log, lambda: f" tuned={(out / 'tuning.json').exists()}")
    assert main(["compare", str(path), "--quiet"]) == 0
    # the two tuning runs read training data only; every test read comes after tuning.json
    assert log[:2] == ["train tuned=False"] * 2
    assert "test tuned=False" not in log and log.count("test tuned=True") == 2
    tuning = json.loads((out / "tuning.json").read_text())
    sam = tuning["methods"]["sam"]
    scores = [json.loads((out / "tune" / f"sam-rho={rho}-s0" / "summary.json").read_text())
              ["last"]["val_overall"] for rho in (0.01, 0.5)]
    chosen = "sam rho=0.01" if scores[0] >= scores[1] else "sam rho=0.5"
    assert sam["chosen"] == chosen and sam["score"] == max(scores)
    finals = sorted(p.name for p in out.iterdir() if (p / "summary.json").exists())
    stem = chosen.replace(" ", "-")
    assert finals == sorted(["plain-s1", f"{stem}-s1"])
    md = (out / "report" / "report.md").read_text()
    assert f"| sam | {chosen} | {100 * max(scores):.1f} |" in md
    assert "Paired differences against plain" in md and "Per-class test accuracy" in md

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    log.clear()
    assert main(["compare", str(path), "--quiet"]) == 0  # resumable: nothing is trained again
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert main(["compare", str(path), "--plan"]) == 0
    assert f"stage 2, the chosen settings on seeds [1]:\n{out / 'plain-s1'}" in \
        capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# the report's statistics


def test_runs_of_one_seed_share_split_init_and_batch_order(tiny_fmnist: Path, tmp_path: Path,
                                                            no_plots: None) -> None:
    spec = tuned_spec(tiny_fmnist, tmp_path / "cmp")
    del spec["tune"]
    spec["base"]["schedule"]["epochs"] = 1
    spec["methods"]["sam"] = {"optim": {"method": "sam", "kwargs": {"rho": 0.05}}}
    run_dirs, tuning = run_compare(read_compare(spec, seeds=[0, 1], only=["plain", "sam"]),
                                   progress=False)
    assert tuning is None
    s = {d.name: json.loads((d / "summary.json").read_text())["pairing"] for d in run_dirs}
    assert s["plain-s0"] == s["sam-s0"] and s["plain-s1"] == s["sam-s1"]
    assert s["plain-s0"]["split"] == s["plain-s1"]["split"]  # one split for every seed
    assert s["plain-s0"]["init"] != s["plain-s1"]["init"]
    assert s["plain-s0"]["batches"] != s["plain-s1"]["batches"]


ACC = {  # method -> seed -> (overall, many, medium, few); per class: class k = overall + k / 100
    "plain": {0: (0.60, 0.9, 0.6, 0.30), 1: (0.62, 0.9, 0.6, 0.34), 2: (0.58, 0.8, 0.6, 0.35)},
    "sam": {0: (0.61, 0.9, 0.6, 0.32), 1: (0.66, 0.9, 0.7, 0.40), 2: (0.60, 0.8, 0.6, 0.37)},
    "asam": {0: (0.70, 0.9, 0.7, 0.50), 1: (0.72, 0.9, 0.8, 0.54), 2: (0.69, 0.9, 0.7, 0.49)},
}


def fake_run(run_dir: Path, method: str, seed: int, init: str = "") -> Path:
    """A finished run directory with the given accuracies (what the report reads of a run)."""
    acc = dict(zip(("overall", "many", "medium", "few"), ACC[method][seed], strict=True))
    run_dir.mkdir(parents=True)
    summary = {"method": method, "label": method, "seed": seed, "counts": [100, 30, 5],
               "groups": ["many", "medium", "few"], "thresholds": {"many": 50, "few": 10},
               "last": {**acc, "epoch": 2}, "best": {"epoch": 2, "overall": acc["overall"],
                                                     "chosen_on": "validation"},
               "per_class": [acc["overall"] + k / 100 for k in range(3)],
               "images_per_second": 100.0, "forwards_per_step": 1.0, "peak_memory_mb": 10.0,
               "train_time_s": 1.0,
               "pairing": {"split": "a", "init": init or f"w{seed}", "batches": f"b{seed}"}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 2, **acc}) + "\n")
    return run_dir


def test_report_intervals_and_paired_differences(tmp_path: Path) -> None:
    run_dirs = [fake_run(tmp_path / f"{m}-s{k}", m, k) for k in range(3) for m in ACC]
    paths = write_report(run_dirs, tmp_path / "report")
    with open(paths[1]) as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    t2 = 4.302653  # t_{0.975, 2}
    for i, g in enumerate(("overall", "many", "medium", "few")):
        xs = [ACC["asam"][k][i] for k in range(3)]
        assert float(rows["asam"][f"{g}_ci95"]) == pytest.approx(
            t2 * statistics.stdev(xs) / math.sqrt(3), rel=1e-5, abs=1e-12)
        for ref in ("plain", "sam"):
            d = [ACC["asam"][k][i] - ACC[ref][k][i] for k in range(3)]
            assert float(rows["asam"][f"{g}_vs_{ref}"]) == pytest.approx(statistics.fmean(d))
            assert float(rows["asam"][f"{g}_vs_{ref}_ci95"]) == pytest.approx(
                t2 * statistics.stdev(d) / math.sqrt(3), rel=1e-5, abs=1e-12)
    # sam - plain on overall: differences 0.01, 0.04, 0.02 -> mean 0.0233, half-width 0.0380
    assert float(rows["sam"]["overall_vs_plain"]) == pytest.approx(0.07 / 3)
    assert rows["sam"]["overall_vs_plain_within_noise"] == "True"
    assert rows["asam"]["few_vs_plain_within_noise"] == "False"
    assert rows["plain"]["overall_vs_plain"] == "" and rows["plain"]["overall_vs_sam"] != ""
    assert float(rows["sam"]["class_2"]) == pytest.approx(statistics.fmean(
        [ACC["sam"][k][0] + 0.02 for k in range(3)]))
    md = paths[0].read_text()
    assert "95% Student-t interval" in md and "| asam | 3 | 70.3 ± 3.8 |" in md
    assert "| sam | 3 | +2.3 [-1.5, +6.1] within noise |" in md
    assert "| asam | 3 | 10.3 (n=100) |" not in md and "| 0 (n=100) | 1 (n=30) | 2 (n=5) |" in md

    # a seed whose runs started from other weights is not paired, and the report says so
    (tmp_path / "asam-s2").rename(tmp_path / "old")
    run_dirs[-1] = fake_run(tmp_path / "asam-s2", "asam", 2, init="other")
    paths = write_report(run_dirs, tmp_path / "report2")
    with open(paths[1]) as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert rows["asam"]["overall_vs_plain_seeds"] == "2"
    assert "seed 2 of asam differs from plain's in init: not paired" in paths[0].read_text()
