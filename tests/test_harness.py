"""Faults and bad inputs of the harness (issue 11): nothing lost, nothing poisoned, one-line errors.

Every test runs on the generated Fashion-MNIST stand-in (the `tiny_fmnist` fixture) with a tiny model
(tests/harness_models.py), so each takes a second or two on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from samkit.cli import main
from samkit.train.checkpoint import (
    CheckpointError,
    json_text,
    load_checkpoint,
    read_json,
    read_jsonl,
    save_checkpoint,
)
from samkit.train.config import ConfigError, load_config
from samkit.train.loop import Interrupted, Trainer, TrainingError


def recipe(out: Path, root: Path, *overrides: str) -> list[str]:
    """Overrides of the default recipe for a run of a few steps (2 epochs x 3 steps)."""
    return [f"data.root={root}", "data.limit_per_class=300", "data.batch_size=32",
            "data.eval_batch_size=400", "model.name=harness_models:TinyNet", "schedule.epochs=2",
            "run.max_steps_per_epoch=3", f"run.out={out}", "run.name=r", "run.deterministic=true",
            "run.threads=1", *overrides]


def train(out: Path, root: Path, *overrides: str, resume: bool = False, on_step=None) -> Trainer:
    trainer = Trainer(load_config(None, recipe(out, root, *overrides)), resume=resume,
                      progress=False, on_step=on_step)
    trainer.run()
    return trainer


def epochs_logged(run: Path) -> list[int]:
    return [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# ---- 1: a skipped step leaves the normalisation statistics as they were ------------------------


@pytest.mark.parametrize("method,norm_stats", [
    ("sam", "update"), ("focalsam", "freeze"), ("imbsam", "update"), ("plain", "update"),
])
def test_a_skipped_step_leaves_running_statistics_unchanged(
        tmp_path: Path, tiny_fmnist: Path, method: str, norm_stats: str) -> None:
    seen: dict[int, list[torch.Tensor]] = {}

    def keep(trainer: Trainer, epoch: int, step: int) -> None:
        seen[trainer.state["global_step"]] = [b.clone() for b in trainer.model.buffers()
                                              if b.is_floating_point()]

    trainer = train(tmp_path, tiny_fmnist, f"optim.method={method}", "optim.kwargs={}",
                    f"optim.norm_stats={norm_stats}", "model.name=harness_models:NanOnFifth",
                    on_step=keep)
    forwards_per_step = 1 if method == "plain" else 2
    bad = (5 - 1) // forwards_per_step + 1  # the step whose passes saw the NaN pixel
    assert trainer.state["nonfinite"] == 1
    for before, after in zip(seen[bad - 1], seen[bad], strict=True):
        assert torch.equal(before, after)
    assert all(torch.isfinite(b).all() for b in trainer.model.buffers())
    ckpt = load_checkpoint(tmp_path / "r/checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert math.isfinite(read_json(tmp_path / "r/summary.json")["last"]["test_loss"])


def test_a_huge_radius_stops_without_poisoning_the_checkpoints(
        tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    """rho=1e30 under "update" puts inf into the running statistics on steps not skipped."""
    args = recipe(tmp_path, tiny_fmnist, "optim.method=sam", "optim.kwargs={rho: 1.0e+30}",
                  "run.max_nonfinite=2", "schedule.epochs=3")
    code, err = run_cli(capsys, "train", "--quiet", *args)
    assert code == 1 and "non-finite" in err and len(err.strip().splitlines()) == 1
    run = tmp_path / "r"
    if (run / "checkpoint.pt").exists():  # whatever was saved is finite
        for name in ("checkpoint.pt", "best.pt"):
            state = load_checkpoint(run / name)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _poison_buffers(at: tuple[int, int]):
    def hook(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == at:
            with torch.no_grad():
                trainer.model.body[1].running_var.fill_(float("nan"))
    return hook


def test_a_non_finite_model_stops_and_keeps_the_last_good_checkpoints(
        tmp_path: Path, tiny_fmnist: Path) -> None:
    run = tmp_path / "r"
    trainer = Trainer(load_config(None, recipe(tmp_path, tiny_fmnist, "schedule.epochs=3")),
                      progress=False, on_step=_poison_buffers((1, 3)))
    saved: dict[str, bytes] = {}
    original = trainer._end_epoch

    def remember() -> None:
        original()
        saved.update({n: (run / n).read_bytes() for n in ("checkpoint.pt", "best.pt")})

    trainer._end_epoch = remember
    with pytest.raises(TrainingError, match=r"not finite after epoch 2: the run stopped; the last "
                                            r"good checkpoint \(after epoch 1\)") as stop:
        trainer.run()
    assert f"samkit train --resume {run} optim.lr=0.005" in str(stop.value)
    assert {n: (run / n).read_bytes() for n in saved} == saved
    assert epochs_logged(run) == [0] and not (run / "summary.json").exists()
    assert "not finite" in read_json(run / "stopped.json")["reason"]


def test_a_stop_before_any_checkpoint_says_so_and_leaves_no_run_directory(
        tmp_path: Path, tiny_fmnist: Path) -> None:
    def poison(trainer: Trainer, epoch: int, step: int) -> None:
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingError, match="no checkpoint had been written, so there is nothing "
                                            r"to keep; run again .*optim.lr=0.005"):
        train(tmp_path, tiny_fmnist, "run.max_nonfinite=2", on_step=poison)
    assert not (tmp_path / "r").exists()  # the same command can simply be run again
    train(tmp_path, tiny_fmnist)
    assert epochs_logged(tmp_path / "r") == [0, 1]


# ---- 2: damaged checkpoints are refused --------------------------------------------------------


def test_a_damaged_checkpoint_is_refused(tmp_path: Path, tiny_fmnist: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    trainer = train(tmp_path, tiny_fmnist, "run.max_steps_per_epoch=2")
    path = tmp_path / "r/checkpoint.pt"
    data = bytearray(path.read_bytes())
    weight = trainer.model.head.weight.detach().numpy().tobytes()
    at = bytes(data).index(weight)  # flip bytes inside a tensor: the file still loads as a zip
    data[at:at + 100] = bytes(b ^ 0xFF for b in data[at:at + 100])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is damaged .*use best.pt"):
        load_checkpoint(path)
    (tmp_path / "r/summary.json").unlink()  # as if interrupted: resume must load the checkpoint
    code, err = run_cli(capsys, "train", "--quiet", "--resume", str(tmp_path / "r"))
    assert code == 2 and f"checkpoint {path} is damaged" in err


@pytest.mark.parametrize("content,match", [
    (torch.zeros(3), "holds a Tensor, not a samkit checkpoint"),
    ({"model": {}}, "lacks optimizer, loader, progress, rng"),
])
def test_a_checkpoint_of_another_kind_is_refused(tmp_path: Path, tiny_fmnist: Path,
                                                 capsys: pytest.CaptureFixture, content,
                                                 match: str) -> None:
    with pytest.raises(Interrupted):
        train(tmp_path, tiny_fmnist, on_step=sigint_at((0, 1)))
    torch.save(content, tmp_path / "r/checkpoint.pt")
    code, err = run_cli(capsys, "train", "--quiet", "--resume", str(tmp_path / "r"))
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_checksum_round_trip(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)},
             "progress": {"epoch": 2, "best": None, "loss": 0.5}, "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt", keys=("model", "progress", "rng"))
    assert loaded["progress"] == state["progress"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    bad = {**torch.load(tmp_path / "c.pt", weights_only=True)}
    bad["progress"]["epoch"] = 3  # a changed value with the old checksum
    torch.save(bad, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(tmp_path / "c.pt")


def sigint_at(at: tuple[int, int]):
    """An on_step hook that sends SIGINT at (epoch, step): the run saves a checkpoint and stops."""
    def hook(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == at:
            os.kill(os.getpid(), signal.SIGINT)
    return hook


# ---- 3, 4, 6: the run directory agrees with its checkpoint ---------------------------------------


def test_a_failed_first_checkpoint_logs_no_epoch_twice(
        tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full at the first checkpoint: one-line error; the retry logs epochs 0, 1 once."""
    real, calls = torch.save, []

    def full(obj, f, *args, **kwargs):
        calls.append(obj)
        if len(calls) == 2:  # checkpoint.pt, after best.pt and the epoch's metrics line
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    args = recipe(tmp_path, tiny_fmnist)
    code, err = run_cli(capsys, "train", "--quiet", *args)
    assert code == 1 and "no space left on device" in err and "checkpoint.pt" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setattr(torch, "save", real)
    assert run_cli(capsys, "train", "--quiet", "--resume", *args)[0] == 0
    assert epochs_logged(tmp_path / "r") == [0, 1]


def test_resume_without_a_checkpoint_checks_the_recipe(tmp_path: Path, tiny_fmnist: Path) -> None:
    """A run killed in epoch 0 (config.yaml, a metrics line, no checkpoint) resumes only as itself,
    from scratch, and then matches an uninterrupted run."""
    straight = weights(train(tmp_path / "a", tiny_fmnist))
    run = tmp_path / "b/r"
    train(tmp_path / "b", tiny_fmnist)
    for name in ("checkpoint.pt", "best.pt", "summary.json"):
        (run / name).unlink()
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"\0" * 1000)  # a kill during a write
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"made with another recipe: .*optim.method: "
                                          r"'focalsam' -> 'sam'"):
        train(tmp_path / "b", tiny_fmnist, "optim.method=sam", "run.name=r", resume=True)
    assert (run / "config.yaml").read_text() == saved
    resumed = weights(train(tmp_path / "b", tiny_fmnist, resume=True))
    assert_same(straight, resumed)
    assert epochs_logged(run) == [0, 1]
    assert not list(run.glob(".*.tmp"))


# ---- 5: one process per run directory ------------------------------------------------------------


def test_a_second_process_is_refused_and_a_dead_ones_lock_does_not_block(
        tmp_path: Path, tiny_fmnist: Path) -> None:
    refused: list[str] = []

    def second(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == (0, 1):
            with pytest.raises(ValueError) as err:
                train(tmp_path, tiny_fmnist, resume=True)
            refused.append(str(err.value))

    train(tmp_path, tiny_fmnist, on_step=second)
    assert refused and f"run directory {tmp_path / 'r'} is in use by another samkit process " \
        f"(pid {os.getpid()})" in refused[0]
    assert epochs_logged(tmp_path / "r") == [0, 1]
    # a process that holds the lock and dies (kill -9) leaves nothing that blocks
    (tmp_path / "s").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path / "s/.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match="in use by another samkit process"):
        train(tmp_path, tiny_fmnist, "run.name=s", resume=True)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    train(tmp_path, tiny_fmnist, "run.name=s", resume=True)
    assert epochs_logged(tmp_path / "s") == [0, 1]


# ---- 7, 8: names stay inside run.out; metrics are JSON ------------------------------------------


def test_run_names_and_compare_labels_stay_inside_the_output_folder(tmp_path: Path) -> None:
    from samkit.report.compare import expand

    with pytest.raises(ConfigError, match=r"run.name must be a plain name .*; got '../../x'"):
        load_config(None, ["run.name=../../x"])
    spec = {"out": str(tmp_path), "methods": {"../evil": {"optim": {"method": "sam"}}}}
    with pytest.raises(ConfigError, match=r"methods.../evil: run.name must be a plain name"):
        expand(spec)


def test_metrics_hold_null_for_non_finite_numbers(tmp_path: Path) -> None:
    from samkit.train.loop import _append_metrics

    _append_metrics(tmp_path, {"epoch": 0, "test_loss": math.nan, "per_class": [0.5, math.inf]})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "epoch": 0, "test_loss": None, "per_class": [0.5, None]}
    assert json_text({"a": [1.0, -math.inf]}, indent=None) == '{"a": [1.0, null]}'


# ---- 9: what a resume may change ------------------------------------------------------------------


def test_resume_may_change_run_settings_and_after_a_failure_the_learning_rate(
        tmp_path: Path, tiny_fmnist: Path) -> None:
    run = tmp_path / "r"
    with pytest.raises(TrainingError):
        train(tmp_path, tiny_fmnist, "schedule.epochs=3", on_step=_poison_buffers((1, 3)))
    with pytest.raises(ConfigError, match=r"made with another recipe: data.ratio: 100.0 -> "
                                          r"10.0; run.seed: 0 -> 1; resume with the run's own"):
        train(tmp_path, tiny_fmnist, "schedule.epochs=3", "run.seed=1", "data.ratio=10",
              "schedule.decay=0.5", resume=True)
    trainer = train(tmp_path, tiny_fmnist, "schedule.epochs=4", "optim.lr=0.005",
                    "run.max_nonfinite=30", resume=True)
    assert trainer.state["epoch"] == 4 and epochs_logged(run) == [0, 1, 2, 3]
    (change,) = read_jsonl(run / "changes.jsonl")
    assert {c["key"]: (c["old"], c["new"]) for c in change["changes"]} == {
        "optim.lr": (0.05, 0.005), "run.max_nonfinite": (20, 30), "schedule.epochs": (3, 4)}
    assert "not finite" in change["after"]["reason"] and not (run / "stopped.json").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.005
    # without a failure the learning rate is part of the run; run settings are not
    with pytest.raises(ConfigError, match=r"optim.lr: 0.005 -> 0.1 \(the learning rate and "
                                          r"radius may change only after the run stopped"):
        train(tmp_path, tiny_fmnist, "schedule.epochs=4", "optim.lr=0.1", resume=True)
    summary = Trainer(load_config(None, recipe(tmp_path, tiny_fmnist, "schedule.epochs=4",
                                               "optim.lr=0.005", "run.threads=2")),
                      resume=True, progress=False).run()
    assert summary["epochs"] == 4  # a finished run: run settings do not matter


def test_resume_with_more_epochs_continues_a_finished_run(tmp_path: Path,
                                                          tiny_fmnist: Path) -> None:
    train(tmp_path, tiny_fmnist)
    trainer = train(tmp_path, tiny_fmnist, "schedule.epochs=3", resume=True)
    assert trainer.state["epoch"] == 3 and epochs_logged(tmp_path / "r") == [0, 1, 2]
    assert read_json(tmp_path / "r/summary.json")["epochs"] == 3
    with pytest.raises(ValueError, match="has 3 epochs; schedule.epochs=2 cannot undo them"):
        train(tmp_path, tiny_fmnist, resume=True)
