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
    assert epochs_logged(run) == [1] and not (run / "summary.json").exists()
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
    assert epochs_logged(tmp_path / "r") == [1, 2]


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
    assert epochs_logged(tmp_path / "r") == [1, 2]


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
    assert epochs_logged(run) == [1, 2]
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
    assert epochs_logged(tmp_path / "r") == [1, 2]
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
    assert epochs_logged(tmp_path / "s") == [1, 2]


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
    assert trainer.state["epoch"] == 4 and epochs_logged(run) == [1, 2, 3, 4]
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
    assert trainer.state["epoch"] == 3 and epochs_logged(tmp_path / "r") == [1, 2, 3]
    assert read_json(tmp_path / "r/summary.json")["epochs"] == 3
    with pytest.raises(ValueError, match="has 3 epochs; schedule.epochs=2 cannot undo them"):
        train(tmp_path, tiny_fmnist, resume=True)


# ---- 10, 14: every ordinary mistake is one line -----------------------------------------------------


def _files(tmp_path: Path) -> dict[str, str]:
    """Recipes and compare recipes with the mistakes users make, by name (without .yaml)."""
    texts: dict[str, bytes] = {
        "list.yaml": b"- a\n- b\n", "scalar.yaml": b"42\n", "latin1.yaml": b"run:\n  name: \xe9\n",
        "cmp_yaml.yaml": b"methods: {sam: [\n", "cmp_base.yaml": b"base: nope.yaml\nmethods: {sam: {}}\n",
    }
    for name, data in texts.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder").mkdir()
    return {name.removesuffix(".yaml"): str(tmp_path / name) for name in [*texts, "folder"]}


@pytest.mark.parametrize("argv,message", [
    (["train", "{list}"], "recipe {list} is a YAML list, not a mapping of sections"),
    (["train", "{scalar}"], "recipe {scalar} is a YAML int, not a mapping"),
    (["train", "{latin1}"], "recipe {latin1} is not UTF-8 text; save it as UTF-8"),
    (["train", "{folder}"], "recipe {folder} is a directory; give the path of a YAML recipe"),
    (["train", "loss.kwargs.foo=1"], "loss.kwargs does not fit loss ce (CrossEntropy"),
    (["train", "run.device=tpu"], "run.device=tpu is not a device; use auto, cpu, cuda"),
    (["train", "run.compile=bogus"], "run.compile=bogus is not a torch.compile backend; use true"),
    (["train", "model.name=harness_models:cifar_only"], "model.name=harness_models:cifar_only "
     "does not fit the data ((1, 28, 28) images): mat1 and mat2 shapes cannot be multiplied"),
    (["train", "data.subsample_seed=-1"], "data.subsample_seed must be >= 0; got -1"),
    (["train", "run.out=/proc/samkit"], "check the path, its permissions and the free space"),
    (["compare", "{cmp_yaml}"], "compare recipe {cmp_yaml} is not valid UTF-8 YAML ("),
    (["compare", "{cmp_base}"], "the compare recipe's base: {tmp}/nope.yaml does not exist"),
    (["compare", "{cmp_base}", "--seeds", "a,b"], "--seeds a,b: give comma-separated "
     "integers"),
])
def test_cli_mistakes_are_one_line(tmp_path: Path, tiny_fmnist: Path,
                                   capsys: pytest.CaptureFixture, argv: list[str],
                                   message: str) -> None:
    files = {**_files(tmp_path), "tmp": str(tmp_path)}
    argv = [a.format(**files) for a in argv]
    if argv[0] == "train":
        argv = ["train", "--quiet", *argv[1:],
                *[a for a in recipe(tmp_path / "runs", tiny_fmnist) if a.split("=")[0] not in
                  {a.split("=")[0] for a in argv[1:]}]]
    code, err = run_cli(capsys, *argv)
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message.format(**files) in err
    assert not (tmp_path / "runs/r").exists()  # no half-made run directory blocks the retry


def test_a_failure_in_the_first_epoch_leaves_no_run_directory(tmp_path: Path,
                                                              tiny_fmnist: Path) -> None:
    def crash(trainer: Trainer, epoch: int, step: int) -> None:
        raise ValueError("a step failed")

    with pytest.raises(ValueError, match="a step failed"):
        train(tmp_path, tiny_fmnist, on_step=crash)
    assert not (tmp_path / "r").exists()
    train(tmp_path, tiny_fmnist)  # the same command, without --resume


def test_ctrl_c_during_start_up_is_one_line_and_leaves_nothing(
        tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import samkit.train.loop as loop

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "_write_recipe", ctrl_c)  # inside the new run directory
    code, err = run_cli(capsys, "train", "--quiet", *recipe(tmp_path, tiny_fmnist))
    assert code == 130 and err.startswith("error: interrupted; nothing is lost")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_ctrl_c_during_the_final_plots_keeps_the_run_and_resume_draws_them(
        tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import samkit.report.plots as plots

    real = plots.plot_run

    def ctrl_c(run_dir: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_run", ctrl_c)
    args = recipe(tmp_path, tiny_fmnist)
    code, err = run_cli(capsys, "train", "--quiet", *args)
    assert code == 130 and len(err.strip().splitlines()) == 1 and "--resume" in err
    assert (tmp_path / "r/summary.json").exists() and not (tmp_path / "r/plots").exists()
    monkeypatch.setattr(plots, "plot_run", real)
    assert run_cli(capsys, "train", "--quiet", "--resume", *args)[0] == 0
    assert (tmp_path / "r/plots/curves.png").is_file()


def test_a_second_sigint_while_the_checkpoint_is_written_does_not_break_it(
        tmp_path: Path, tiny_fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import samkit.train.loop as loop

    real = loop.save_checkpoint

    def save_while_interrupted(path: Path, state: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again
        real(path, state)

    def first(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == (0, 2):
            monkeypatch.setattr(loop, "save_checkpoint", save_while_interrupted)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(tmp_path, tiny_fmnist, on_step=first)
    assert load_checkpoint(tmp_path / "r/checkpoint.pt")["progress"]["step"] == 2


def test_cli_overrides_after_flags_and_resume_with_an_override(
        tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    args = recipe(tmp_path, tiny_fmnist)
    with pytest.raises(Interrupted):
        train(tmp_path, tiny_fmnist, on_step=sigint_at((0, 1)))
    # `--resume run.out=X`: the override is not taken for the run directory; and an override
    # after a flag is still an override
    out = f"run.out={tmp_path}"
    rest = [a for a in args if a != out]
    assert run_cli(capsys, "train", "--resume", out, *rest[:3], "--quiet", *rest[3:])[0] == 0
    assert epochs_logged(tmp_path / "r") == [1, 2]
    summary = tmp_path / "r/summary.json"
    mode = 0o666 & ~_umask()
    for name in ("summary.json", "checkpoint.pt", "best.pt", "config.yaml", "metrics.jsonl"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == mode, name
    summary.write_text("{not json")
    code, err = run_cli(capsys, "report", str(tmp_path / "r"), "--out", str(tmp_path / "rep"))
    assert code != 0 and f"{summary} is damaged" in err
    summary.unlink()
    (tmp_path / "r/metrics.jsonl").write_text('{"epoch": 0}\n{"epo\n')
    code, err = run_cli(capsys, "train", "--quiet", "--resume", *args)
    assert code != 0 and f"{tmp_path / 'r/metrics.jsonl'} line 2 is damaged" in err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- 11: torchrun's cleanup does not hide the real error -------------------------------------------


def test_leaving_the_process_group_after_a_setup_failure(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    trainer = Trainer(load_config(None, ["run.device=cpu"]), progress=False)
    trainer._leave_group()  # no model was made: no AttributeError
    assert not dist.is_initialized()


# ---- 13: overriding the method drops the default method's settings --------------------------------


def test_overriding_the_method_drops_its_settings_and_renames_the_run() -> None:
    c = load_config(None, ["optim.method=imbsam", "optim.kwargs.eta=200"])
    assert c.optim.kwargs == {"eta": 200} and c.run.name == "fmnist-lt100-imbsam"
    c = load_config(None, ["optim.method=sam", "run.name=mine"])
    assert c.optim.kwargs == {} and c.run.name == "mine"
    c = load_config(None, ["optim.method=focalsam", "optim.kwargs.rho=0.2"])
    assert c.optim.kwargs == {"rho": 0.2, "gamma": 2.0, "lam": 0.8}
    c = load_config(None, ["loss.name=ldam", "loss.kwargs.max_m=0.3"])
    assert c.loss.kwargs == {"max_m": 0.3}
