"""The converged comparison protocols (issue 14): the MNIST-1D generator's arguments in a recipe,
the LDAM-DRW epoch check, and the compare recipes shipped in configs/."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import yaml

from samkit.report.claims import Claim, measure, read_claims
from samkit.report.compare import read_compare
from samkit.report.table import Row
from samkit.train.config import ConfigError, load_config, resume_changes
from samkit.train.data import prepare_data

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_mnist1d_generator_arguments_reach_the_data(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mnist1d")
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path / "cache"))
    overrides = ["data.name=mnist1d", "data.mnist1d.num_samples=1500", "data.ratio=10",
                 "data.n_max=80", "data.val_per_class=20", "data.augment=none",
                 "model.name=cnn1d"]
    data = prepare_data(load_config(None, overrides), progress=False)
    # 1,200 training signals (about 120 per class) cut to 80 ... 8, and 20 per class held out
    assert data.counts[0] == 80 and data.counts[-1] == 8 and data.in_channels == 1
    assert data.val.class_counts() == [20] * 10
    assert len(data.test) == 300 and tuple(data.test.images.shape[1:]) == (1, 40)
    assert "'num_samples': 1500" in data.train.source
    assert len(list((tmp_path / "cache" / "mnist1d").glob("*.npz"))) == 1  # generated once
    again = prepare_data(load_config(None, overrides), progress=False)
    assert again.split["indices"] == data.split["indices"]
    default = prepare_data(load_config(None, overrides[:1] + overrides[2:]), progress=False)
    assert len(default.test) == 1000  # the package's default size: 5,000 samples


def test_mnist1d_arguments_belong_to_mnist1d() -> None:
    with pytest.raises(ConfigError, match="data.mnist1d sets the generator of data.name=mnist1d, "
                                          "but data.name is 'cifar10'"):
        load_config(None, ["data.name=cifar10", "data.mnist1d.num_samples=100"])


def test_mnist1d_key_added_later_keeps_old_runs_resumable() -> None:
    saved = load_config(None, ["data.ratio=10"]).to_dict()
    del saved["data"]["mnist1d"]  # a run recorded before the key existed
    assert resume_changes(saved, load_config(None, ["data.ratio=10"])) == []


def test_ldam_drw_that_would_never_reweight_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"loss ldam-drw re-weights from epoch 160 .* "
                                          r"schedule.epochs is 60.*drw_epoch below 60 .*: 48\)"):
        load_config(None, ["loss.name=ldam-drw", "schedule.epochs=60"])
    config = load_config(None, ["loss.name=ldam-drw", "schedule.epochs=60",
                                "loss.kwargs.drw_epoch=48"])
    assert config.loss.kwargs["drw_epoch"] == 48
    assert load_config(None, ["loss.name=ldam-drw", "schedule.epochs=200"]).schedule.epochs == 200


@pytest.mark.parametrize("name, methods, tuning, final", [
    ("compare_tuned_mnist1d_lt.yaml",
     ["plain", "sam", "imbsam", "ccsam", "focalsam", "ssesam", "bisam", "crsam"], 28, 40),
    ("compare_tuned_mnist1d_lt_la.yaml", ["plain", "sam", "imbsam", "focalsam"], 14, 20),
    ("compare_tuned_mnist1d_lt_ldam.yaml", ["plain", "sam", "imbsam", "ccsam", "ssesam"], 15, 25),
])
def test_shipped_mnist1d_recipes(name: str, methods: list[str], tuning: int, final: int) -> None:
    compare = read_compare(CONFIGS / name)
    assert list(compare.by_method()) == methods
    assert len(compare.tuning_runs()) == tuning and compare.tune.seeds == [0]
    assert len(compare.seeds) == 5 and len(compare.final_runs(
        {m: points[0].row for m, points in compare.by_method().items()})) == final
    for planned in compare.tuning_runs():
        c = planned.config
        assert not c.run.eval_test and c.data.val_per_class == 300  # tuning never reads test
        assert (c.data.name, c.data.mnist1d, c.schedule.epochs) == ("mnist1d",
                                                                     {"num_samples": 40000}, 60)


@pytest.mark.parametrize("name, methods, tuning, final", [
    ("compare_tuned_fmnist_lt_mlp.yaml",
     ["plain", "sam", "imbsam", "ccsam", "focalsam", "ssesam", "bisam", "crsam"], 32, 40),
    ("compare_tuned_fmnist_lt_mlp_la.yaml", ["plain", "sam", "imbsam", "focalsam"], 17, 20),
    ("compare_tuned_fmnist_lt_mlp_ldam.yaml", ["plain", "sam", "imbsam", "ccsam", "ssesam"], 20,
     25),
    ("compare_efficient_fmnist_lt_mlp.yaml",
     ["plain", "sam", "focalsam", "imbsam", "msam", "ksam", "looksam", "gsam", "fsam",
      "focalsam-every5", "imbsam-top25"], 21, 55),
])
def test_shipped_fmnist_mlp_recipes(name: str, methods: list[str], tuning: int, final: int) -> None:
    compare = read_compare(CONFIGS / name)
    assert list(compare.by_method()) == methods
    assert len(compare.tuning_runs()) == tuning and compare.tune.seeds == [0]
    assert len(compare.final_runs(
        {m: points[0].row for m, points in compare.by_method().items()})) == final
    for planned in compare.tuning_runs():
        c = planned.config
        assert not c.run.eval_test and c.data.val_per_class == 500  # tuning never reads test
        assert (c.data.name, c.data.ratio, c.data.augment, c.model.name, c.schedule.epochs) == (
            "fashion-mnist", 200, "none", "mlp", 40)
        assert c.model.head == ("normed" if c.loss.name == "ldam-drw" else "linear")


def _row(label: str, few: list[float], trace: list[float] | None = None) -> Row:
    row = Row(label, label, seeds=list(range(len(few))))
    row.last["few"] = few
    row.pairing = [None] * len(few)
    if trace is not None:
        row.sharpness["trace"] = trace
    return row


@pytest.mark.parametrize("few, verdict", [
    ([0.60, 0.62, 0.65, 0.61, 0.63], "holds"),                 # +10, +11, +12, +11, +12 pts
    ([0.40, 0.41, 0.42, 0.40, 0.41], "does not hold"),
    ([0.52, 0.48, 0.55, 0.45, 0.50], "inconclusive: within noise"),
])
def test_claim_verdicts(few: list[float], verdict: str) -> None:
    sam = _row("sam", [0.50, 0.51, 0.53, 0.50, 0.51])
    claim = Claim("x beats SAM on few", "p", "ce", "x", "sam", "few")
    m = measure(claim, [sam, _row("x", few)])
    diffs = [a - b for a, b in zip(few, sam.last["few"])]
    assert m["verdict"] == verdict and m["seeds"] == [0, 1, 2, 3, 4]
    assert m["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    # t_{0.975, 4} = 2.776445
    assert m["half"] == pytest.approx(2.776445 * statistics.stdev(diffs) / 5 ** 0.5, rel=1e-5)


def test_sharpness_claims_are_lower_is_flatter() -> None:
    sam = _row("sam", [0.5] * 3, trace=[100.0, 120.0, 110.0])
    flat = _row("crsam", [0.5] * 3, trace=[80.0, 95.0, 90.0])
    claim = Claim("CR-SAM lowers the trace", "p", "ce", "crsam", "sam", "trace")
    m = measure(claim, [sam, flat])
    assert m["verdict"] == "holds" and m["mean"] == pytest.approx(-65 / 3)
    one = measure(claim, [_row("sam", [0.5], [1.0]), _row("crsam", [0.5], [0.5])])
    assert one["verdict"] == "inconclusive: fewer than 2 paired seeds"
    unmeasured = measure(claim, [_row("sam", [0.5] * 3), _row("crsam", [0.5] * 3)])
    assert unmeasured["verdict"] == "not measured: run the compare with --sharpness"
    with pytest.raises(ValueError, match="no runs of 'crsam' in compare 'ce' \\(it has sam\\)"):
        measure(claim, [sam])
    tuned = _row("crsam rho=0.1 a=0.1", [0.5] * 3, trace=[80.0, 95.0, 90.0])
    tuned.method = "crsam"  # a tuned row is labelled with its setting; claims name the method
    assert measure(claim, [sam, tuned])["mean"] == pytest.approx(-65 / 3)
    other = _row("crsam rho=0.2 a=0.1", [0.5] * 3, trace=[1.0, 1.0, 1.0])
    other.method = "crsam"
    with pytest.raises(ValueError, match="2 rows of 'crsam'"):
        measure(claim, [sam, tuned, other])
    with pytest.raises(ValueError, match="metric 'acc' is not one of overall, many"):
        Claim("bad", "p", "ce", "a", "b", "acc")


def test_claims_file_names_its_compares(tmp_path: Path) -> None:
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"compares": {"ce": "a.yaml"}, "claims": [
        {"claim": "c", "paper": "p", "in": "la", "method": "a", "than": "b", "metric": "few"}]}))
    with pytest.raises(ValueError, match="is in compare 'la', which 'compares' does not name"):
        read_claims(path)
    for protocol in ("mnist1d-lt100", "fmnist-lt200-mlp"):
        shipped = read_claims(CONFIGS.parent / "docs" / "results" / protocol / "claims.yaml")
        assert {c.where for c in shipped[1]} <= set(shipped[0])
        for recipe in shipped[0].values():
            assert (CONFIGS.parent / recipe).is_file()


def test_claims_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from samkit.report.claims import main

    assert main(["--help"]) == 0
    assert "usage: python -m samkit.report.claims CLAIMS.yaml" in capsys.readouterr().out
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err
