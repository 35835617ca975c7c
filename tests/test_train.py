"""The training harness: recipes, the run directory, exact resume, the non-finite guard, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from samkit.cli import main
from samkit.train.checkpoint import load_checkpoint
from samkit.train.config import ConfigError, ScheduleConfig, load_config, parse_overrides
from samkit.train.loop import Interrupted, Trainer, TrainingError
from samkit.train.schedules import lr_factor, rho_at

FASHION: Path | None = None  # the generated stand-in, set for every test by generated_fashion


@pytest.fixture(autouse=True)
def generated_fashion(tiny_fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every recipe of `tiny` reads the generated Fashion-MNIST stand-in (tests/datagen.py), so
    these tests need nothing beside the clone. Modules that import `tiny` import this too."""
    monkeypatch.setitem(globals(), "FASHION", tiny_fmnist)


def tiny(tmp_path: Path, *overrides: str) -> list[str]:
    """A recipe that trains for seconds on the generated Fashion-MNIST stand-in (300 images per
    class, learnable: class templates plus noise)."""
    return [f"data.root={FASHION}", "data.limit_per_class=300", "data.batch_size=64",
            "schedule.epochs=2", "run.max_steps_per_epoch=6", f"run.out={tmp_path}",
            "run.name=tiny", "run.deterministic=true", *overrides]


# ---- recipes ----------------------------------------------------------------------------------------


def test_default_recipe_is_fashion_mnist_lt_focal_sam() -> None:
    c = load_config()
    assert (c.data.name, c.data.ratio, c.model.name, c.optim.method) == (
        "fashion-mnist", 100.0, "small-cnn", "focalsam")


def test_overrides_are_typed_and_nested() -> None:
    c = load_config(None, ["optim.kwargs.rho=0.3", "schedule.milestones=[160, 180]",
                           "optim.method=sam", "run.threads=1", "data.ratio=10"])
    assert c.optim.kwargs == {"rho": 0.3}  # Focal-SAM's gamma and lam do not fit SAM
    assert c.schedule.milestones == [160.0, 180.0] and c.data.ratio == 10.0
    assert parse_overrides(["a.b=x", "a.c=1e-3"]) == {"a": {"b": "x", "c": 0.001}}
    whole = load_config(None, ["optim.method=imbsam", "optim.kwargs={rho: 0.1, eta: 200}"])
    assert whole.optim.kwargs == {"rho": 0.1, "eta": 200}  # a whole mapping replaces


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrate=0.1"], r"unknown key optim.lrate; valid keys here: base, kwargs, lr"),
    (["bogus=1"], r"unknown key bogus; valid keys here: data, loss, model, optim, run"),
    (["schedule.epochs=ten"], r"schedule.epochs must be int; got 'ten'"),
    (["data.ratio=0.5"], r"data.ratio must be >= 1; got 0.5"),
    (["schedule.lr=linear"], r"schedule.lr must be cosine, step or constant; got 'linear'"),
    (["optim.rho_schedule=[[1.5, 0.2]]"], r"optim.rho_schedule\[0\] must be"),
    (["optim.method=bsam", "optim.rho_schedule=[[0.5, 0.1]]"],
     r"optim.rho_schedule sets each param group's 'rho', which bsam does not read \(its radii "
     r"are rho_max, rho_min\)"),
    (["optim.method=ssesam", "optim.rho_schedule=[[0.5, 0.1]]"], r"its radii are rho_head"),
    (["optim.method=plain", "optim.rho_schedule=[[0.5, 0.1]]"], r"plain does not read \(it has no"),
    (["optim.lr"], r"override 'optim.lr' is not key=value"),
])
def test_bad_recipes_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_recipe_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(load_config(None, ["optim.method=sam"]).to_dict()))
    assert load_config(path).optim.method == "sam"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_schedules() -> None:
    cos = ScheduleConfig(epochs=10, lr="cosine")
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 5) == pytest.approx(0.5)
    assert lr_factor(cos, 10) == pytest.approx(0.0, abs=1e-12)
    step = ScheduleConfig(epochs=200, lr="step", milestones=[160, 180], decay=0.01,
                          warmup_epochs=5)
    assert lr_factor(step, 2.5) == pytest.approx(0.5)
    assert [lr_factor(step, t) for t in (100, 160, 179.9, 180)] == pytest.approx(
        [1.0, 0.01, 0.01, 1e-4])
    c = load_config(None, ["optim.rho_schedule=[[0.8, 0.2]]"])
    assert rho_at(c.optim, 7, 10) is None and rho_at(c.optim, 8, 10) == 0.2


# ---- runs ---------------------------------------------------------------------------------------


def test_run_directory_holds_everything(tmp_path: Path) -> None:
    summary = Trainer(load_config(None, tiny(tmp_path)), progress=False).run()
    run = tmp_path / "tiny"
    for name in ("config.yaml", "env.json", "split.json", "metrics.jsonl", "summary.json",
                 "checkpoint.pt", "best.pt", "plots/per_class.png", "plots/curves.png"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    # n_max is 300 here (limit_per_class), ratio 100
    assert split["counts"] == [int(300 * 100 ** (-i / 9) + 1e-9) for i in range(10)]
    assert len(split["indices"]) == split["total"] == sum(split["counts"])
    assert split["thresholds"] == {"many": 1000, "few": 200}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]  # epochs numbered from 1
    assert summary["last"]["overall"] == pytest.approx(
        sum(metrics[-1]["per_class"]) / 10, abs=1e-12)
    assert 0.0 <= summary["last"]["overall"] <= 1.0 and summary["steps"] == 12
    assert summary["images_per_second"] > 0 and summary["nonfinite_steps"] == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")  # weights_only=True
    assert ckpt["progress"]["epoch"] == 2 and "base" in ckpt["optimizer"]
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    with pytest.raises(ValueError, match="exists; resume it with --resume"):
        Trainer(load_config(None, tiny(tmp_path)), progress=False).run()


@pytest.mark.parametrize("method", ["focalsam", "ssesam"])
def test_interrupted_run_resumes_exactly(tmp_path: Path, method: str) -> None:
    base = ["optim.method=" + method, "optim.kwargs={}", "run.max_steps_per_epoch=5"]
    straight = Trainer(load_config(None, tiny(tmp_path / "a", *base)), progress=False)
    straight.run()

    def interrupt(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGINT)

    stopped = Trainer(load_config(None, tiny(tmp_path / "b", *base)), progress=False,
                      on_step=interrupt)
    with pytest.raises(Interrupted):
        stopped.run()
    assert load_checkpoint(tmp_path / "b/tiny/checkpoint.pt")["progress"]["step"] == 2
    resumed = Trainer(load_config(None, tiny(tmp_path / "b", *base)), resume=True,
                      progress=False)
    resumed.run()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key

    def metrics(root: Path) -> list[dict]:
        lines = (root / "tiny/metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.endswith("time_s")}
                for x in lines]

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_repeated_nonfinite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path: Path) -> None:
    def poison(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    config = load_config(None, tiny(tmp_path, "run.max_nonfinite=3"))
    trainer = Trainer(config, progress=False, on_step=poison)
    good = {}

    original = trainer._end_epoch

    def remember() -> None:
        original()
        good["bytes"] = (tmp_path / "tiny/checkpoint.pt").read_bytes()

    trainer._end_epoch = remember
    with pytest.raises(TrainingError, match="3 non-finite steps in a row at epoch 2"):
        trainer.run()
    assert (tmp_path / "tiny/checkpoint.pt").read_bytes() == good["bytes"]
    assert not (tmp_path / "tiny/summary.json").exists()


def test_resume_of_a_finished_run_returns_its_summary(tmp_path: Path) -> None:
    first = Trainer(load_config(None, tiny(tmp_path)), progress=False).run()
    again = Trainer(load_config(None, tiny(tmp_path)), resume=True, progress=False).run()
    assert again["last"] == first["last"]
    with pytest.raises(ValueError, match="finished run in .* was made with another recipe"):
        Trainer(load_config(None, tiny(tmp_path, "optim.lr=0.2")), resume=True,
                progress=False).run()


def test_resume_with_another_recipe_is_refused(tmp_path: Path) -> None:
    def stop(trainer: Trainer, epoch: int, step: int) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        Trainer(load_config(None, tiny(tmp_path)), progress=False, on_step=stop).run()
    with pytest.raises(ValueError, match="made with another recipe"):
        Trainer(load_config(None, tiny(tmp_path, "optim.lr=0.2")), resume=True,
                progress=False).run()


# ---- the command --------------------------------------------------------------------------------


def test_cli_help_is_complete(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(word in out for word in ("train", "methods", "download"))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "Fashion-MNIST" in out and "optim.method=sam" in out


def test_cli_errors_name_the_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "optim.lrate=1"]) == 2
    assert "unknown key optim.lrate" in capsys.readouterr().err


def test_cli_train_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--quiet", *tiny(tmp_path, "optim.method=sam")]) == 0
    out = capsys.readouterr().out
    assert f"run: {tmp_path / 'tiny'}" in out and "plots:" in out
    assert main(["train", "--quiet", "--resume", str(tmp_path / "tiny")]) == 0
    summary = json.loads((tmp_path / "tiny/summary.json").read_text())
    assert summary["method"] == "sam" and math.isfinite(summary["last"]["overall"])


def test_cli_methods_lists_every_optimizer(capsys: pytest.CaptureFixture) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == [
        "asam", "bisam", "bsam", "ccsam", "crsam", "focalsam", "fsam", "gsam", "imbsam", "ksam",
        "looksam", "msam", "plain", "sam", "ssesam"]


def test_a_users_own_model_trains(tmp_path: Path) -> None:
    """model.name=package.module:factory builds the user's module (here a test model)."""
    summary = Trainer(load_config(None, tiny(tmp_path, "model.name=optim_helpers:ConvNet")),
                      progress=False).run()
    assert summary["steps"] == 12 and 0 <= summary["last"]["overall"] <= 1
    with pytest.raises(ValueError, match="cannot import Nope from optim_helpers"):
        Trainer(load_config(None, tiny(tmp_path / "x", "model.name=optim_helpers:Nope")),
                progress=False).run()
