"""What a newcomer meets first: --version, a fast --help, recipe paths that exist, output that reads
well on a terminal and in a log file, epochs counted from 1, their own model found from the current
folder, plots that label what they show, and a report that counts seeds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samkit
from samkit.cli import QUANTITIES, build_parser, main
from samkit.train.checkpoint import load_checkpoint, save_checkpoint
from samkit.train.config import ConfigError, load_config
from samkit.train.loop import Interrupted, Trainer, import_user_module
from samkit.train.progress import RunDisplay, format_duration
from samkit.train.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny(data: Path, out: Path, *overrides: str) -> list[str]:
    """A recipe that trains for about a second on the generated Fashion-MNIST stand-in."""
    return [f"data.root={data}", "data.limit_per_class=300", "data.batch_size=64",
            "optim.method=plain", "schedule.epochs=2", "run.max_steps_per_epoch=3",
            f"run.out={out}", "run.name=tiny", "run.deterministic=true", *overrides]


# ---- the command itself ---------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from importlib import metadata

    assert capsys.readouterr().out.strip() == f"samkit {metadata.version('samkit')}"
    assert metadata.version("samkit") == samkit.__version__


def test_parser_imports_neither_torch_nor_matplotlib() -> None:
    """`samkit --help` answers without loading torch or matplotlib (2.5 s before, ~0.1 s now)."""
    code = ("import sys, samkit.cli; samkit.cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'tqdm', 'numpy') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_sharpness_names_in_the_parser_are_the_analysis_ones() -> None:
    from samkit.analysis.run import QUANTITIES as ANALYSED

    assert QUANTITIES == ANALYSED


def _help_texts() -> list[str]:
    parser = build_parser()
    subs = next(a for a in parser._actions if a.choices and "train" in a.choices)
    return [parser.format_help(), *(p.format_help() for p in subs.choices.values())]


def test_recipes_named_in_help_and_readme_exist() -> None:
    texts = {f"help {i}": t for i, t in enumerate(_help_texts())}
    texts["README.md"] = (ROOT / "README.md").read_text()
    named = {(where, path) for where, text in texts.items()
             for path in re.findall(r"configs/[\w./-]+\.ya?ml", text)}
    assert any(where == "help 1" for where, _ in named)  # `train --help` names a recipe
    missing = sorted(f"{path} (in {where})" for where, path in named if not (ROOT / path).is_file())
    assert not missing


# ---- what a run prints ----------------------------------------------------------------------------


def test_durations_and_the_whole_run_estimate() -> None:
    assert [format_duration(s) for s in (0, 59.6, 83.4, 3600, 3725)] == [
        "0:00", "1:00", "1:23", "1:00:00", "1:02:05"]
    now = [100.0]
    display = RunDisplay(4, bars=False, verbose=False, clock=lambda: now[0])
    assert display.remaining() is None and display.eta_text() == ""
    display.start_epoch(1, 10, done=3)  # resumed in the second epoch, after step 3
    for _ in range(4):
        now[0] += 2.0
        display.advance()
    # 2 s per step; left: 3 of this epoch and 2 more epochs of 10
    assert display.steps_left() == 23 and display.remaining() == pytest.approx(46.0)
    assert display.eta_text() == "; run ~0:46 left"


def test_piped_output_has_plain_lines_at_a_rate(capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a terminal: no bar frames, but a plain progress line every `interval` seconds."""
    now = [0.0]
    display = RunDisplay(2, bars=True, verbose=True, interval=10.0, clock=lambda: now[0])
    display.start_epoch(0, 6)
    for _ in range(6):
        now[0] += 4.0
        display.advance()
    display.end_epoch()
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err and captured.err == ""
    assert captured.out.splitlines() == ["epoch 1/2: step 3/6, run ~0:36 left",
                                         "epoch 1/2: step 6/6, run ~0:24 left"]
    monkeypatch.setattr("samkit.train.progress.is_terminal", lambda stream: True)
    bars = RunDisplay(2, bars=True, verbose=True, clock=lambda: now[0])
    bars.start_epoch(0, 6)
    now[0] += 4.0
    bars.advance()
    bars.end_epoch()
    assert "epoch 1/2" in capsys.readouterr().err  # a terminal gets the bar


@pytest.mark.parametrize("quiet,lines", [([], True), (["-q"], True), (["-qq"], False)])
def test_train_output_by_quiet_level(tmp_path: Path, tiny_fmnist: Path,
                                     capsys: pytest.CaptureFixture, quiet: list[str],
                                     lines: bool) -> None:
    """Captured output is not a terminal: never a `\\r` frame; -q keeps the result line of every
    epoch (with the run's remaining time), -qq only the final summary."""
    threads = torch.get_num_threads()
    assert main(["train", *tiny(tiny_fmnist, tmp_path), *quiet]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    result = [x for x in captured.out.splitlines() if x.startswith("epoch ")]
    if lines:
        assert len(result) == 2
        assert re.fullmatch(r"epoch 1/2: train loss \d\.\d{4}, test overall \d\.\d{4} \(many "
                            r"n/a, medium \d\.\d{4}, few \d\.\d{4}\); run ~\d+:\d\d left",
                            result[0])
        assert result[1].startswith("epoch 2/2: ") and "left" not in result[1]
    else:
        assert result == []
    assert captured.out.splitlines()[-4].startswith("run: ")
    # run.threads defaults to torch's own: the run leaves the process's setting alone
    assert load_config(None, []).run.threads is None and torch.get_num_threads() == threads
    assert json.loads((tmp_path / "tiny/env.json").read_text())["threads"] == threads


def test_threads_setting() -> None:
    assert load_config(None, ["run.threads=auto"]).run.threads == "auto"
    assert load_config(None, ["run.threads=3"]).run.threads == 3
    with pytest.raises(ConfigError, match=r"run.threads must be null, auto or >= 1; got 0"):
        load_config(None, ["run.threads=0"])
    with pytest.raises(ConfigError, match=r"run.threads must be null, auto or >= 1; got 'all'"):
        load_config(None, ["run.threads=all"])


# ---- epochs from 1 ----------------------------------------------------------------------------------


def test_epochs_are_numbered_from_one_and_old_runs_resume(
        tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    def stop_in_epoch_2(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            os.kill(os.getpid(), signal.SIGINT)

    for name in ("new", "old"):
        config = load_config(None, tiny(tiny_fmnist, tmp_path, f"run.name={name}"))
        with pytest.raises(Interrupted):
            Trainer(config, on_step=stop_in_epoch_2).run()
    run = tmp_path / "new"
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert (ckpt["progress"]["epoch"], ckpt["progress"]["step"]) == (1, 1)  # epochs completed
    assert ckpt["progress"]["best"]["epoch"] == 1
    # a run directory of samkit 0.1.0: records and the best epoch counted from 0, no marker
    old = tmp_path / "old"
    record = json.loads((old / "metrics.jsonl").read_text())
    (old / "metrics.jsonl").write_text(json.dumps({**record, "epoch": 0}) + "\n")
    ckpt = load_checkpoint(old / "checkpoint.pt")
    del ckpt["progress"]["epoch_numbering"]
    ckpt["progress"]["best"]["epoch"] = 0
    save_checkpoint(old / "checkpoint.pt", ckpt)
    assert [m["epoch"] for m in read_metrics(old)] == [1]
    capsys.readouterr()
    for name in ("new", "old"):
        assert main(["train", "--resume", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert f"resuming {tmp_path / name} at epoch 2/2, after step 1" in out
        assert "epoch 2/2: train loss" in out
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["last"]["epoch"] == 2 and summary["best"]["epoch"] in (1, 2)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # the old file is rewritten
    new, old = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("new", "old"))
    assert new["best"] == old["best"] and new["last"] == old["last"]


# ---- the user's own model ---------------------------------------------------------------------------

USER_MODELS = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def make_net(num_classes, in_channels):
    return Net(num_classes, in_channels)
'''


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the user's models, made the current one, with neither it nor "" on
    sys.path (as under the `samkit` console script)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "nc_models.py").write_text(USER_MODELS)
    (folder / "nc_broken.py").write_text("import nc_no_such_dependency\n")
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(folder))])
    for name in ("nc_models", "nc_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder


def test_user_model_from_the_current_folder_trains_and_is_analysed(
        user_folder: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    out = user_folder / "runs"
    assert main(["train", *tiny(tiny_fmnist, out, "model.name=nc_models:make_net"), "-qq"]) == 0
    assert sys.path[-1] == str(user_folder)  # appended last: it shadows no installed module
    code = main(["sharpness", str(out / "tiny"), "-q", "--what", "trace,eigen,classwise",
                 "--per-class", "3", "--hvps", "6"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    eigen = re.search(r"top eigenvalues \[(.*)\]; bottom \[(.*)\]", printed)
    values = ", ".join(eigen.groups()).split(", ")
    assert len(values) == 6 and all(len(v.lstrip("-").replace(".", "").lstrip("0")) <= 4 or
                                    "e" in v for v in values)
    result = json.loads((out / "tiny/sharpness/sharpness.json").read_text())
    assert [format(v, ".4g") for v in result["eigen"]["top"]] == values[:3]
    assert (out / "tiny/sharpness/class_sharpness.png").stat().st_size > 0


def test_user_model_errors_say_what_to_do(user_folder: Path) -> None:
    from samkit.train.loop import make_model

    with pytest.raises(ValueError, match=r"cannot import nc_missing .* run samkit from the "
                                         r"folder that holds nc_missing.py, or add"):
        make_model(load_config(None, ["model.name=nc_missing:make_net"]), 10, 1)
    with pytest.raises(ValueError, match=r"cannot import nc_broken .*nc_no_such_dependency"):
        make_model(load_config(None, ["model.name=nc_broken:make_net"]), 10, 1)
    with pytest.raises(ValueError, match=r"cannot import make_nett from nc_models"):
        make_model(load_config(None, ["model.name=nc_models:make_nett"]), 10, 1)
    assert import_user_module("json") is json  # installed modules come first


# ---- plots and the report ---------------------------------------------------------------------------


def fake_run(folder: Path, *, seed: int = 0, label: str = "sam", zero_based: bool = False) -> Path:
    """A finished run directory as the loop writes it (3 classes, 2 epochs), without training."""
    folder.mkdir(parents=True)
    first = 0 if zero_based else 1  # samkit 0.1.0 numbered the records from 0
    records = [{"epoch": first + e, "train_loss": 1.0 - 0.3 * e, "overall": 0.5 + 0.1 * e + seed,
                "many": 0.8, "medium": 0.5, "few": None} for e in range(2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    last = {**records[-1], "test_loss": 0.9, "ece": 0.1}
    summary = {"method": "sam", "label": label, "seed": seed, "epochs": 2, "last": last,
               "best": last, "per_class": [0.9, 0.7, 0.5], "classes": ["cat", "dog", "emu"],
               "counts": [500, 60, 6], "groups": ["many", "medium", "medium"],
               "thresholds": {"many": 100, "few": 5}, "images_per_second": 100.0,
               "train_time_s": 3.0, "forwards_per_step": 2.0, "peak_memory_mb": 10.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_report_counts_distinct_seeds(tmp_path: Path) -> None:
    from samkit.report.table import load_runs, markdown, write_report

    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", zero_based=True)
    with pytest.raises(ValueError, match=rf"{a} and {b} are both seed 0 of sam: .* different "
                                         r"run.label values"):
        write_report([a, b], tmp_path / "report")
    c = fake_run(tmp_path / "c", seed=1, zero_based=True)
    rows = load_runs([a, c])
    assert rows[0].seeds == [0, 1]
    assert [e for e, _ in rows[0].curves[1]] == [1, 2]  # an old run's epochs read from 1
    assert "| sam | 2 | " in markdown(rows)
    assert len(load_runs([a, fake_run(tmp_path / "d", label="sam-again")])) == 2


def test_count_axis_ticks_read_as_numbers() -> None:
    import matplotlib.pyplot as plt

    from samkit.report.axes import count_ticks, log_count_axis

    assert count_ticks(6, 9) == [6, 9]
    assert count_ticks(3, 300) == [5, 10, 20, 50, 100, 200]
    assert count_ticks(1, 5000) == [1, 10, 100, 1000]
    fig, ax = plt.subplots()
    log_count_axis(ax, [6, 7, 9])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["6", "9"]
    assert ax.get_xscale() == "log" and ax.get_xticklabels(minor=True) == []
    plt.close(fig)


def test_run_plots_title_the_run_and_leave_out_empty_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from samkit.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig))
    run = fake_run(tmp_path / "my-run")
    plots.plot_per_class(run, tmp_path / "per_class.png")
    plots.plot_curves(run, tmp_path / "curves.png")
    per_class, curves = figures
    ax = per_class.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["many (1)", "medium (2)"]
    assert [t.get_text() for t in ax.texts] == ["cat", "dog", "emu"]
    assert ax.get_title().startswith("my-run (sam): overall 0.600")
    assert curves.get_suptitle() == "my-run (sam)"
    assert list(curves.axes[0].lines[0].get_xdata()) == [1, 2]


def test_class_sharpness_plot_names_the_classes(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from samkit.analysis import plots
    from samkit.analysis.sharpness import SharpnessResult

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: figures.append(fig))
    three = np.array([0.3, 0.2, 0.1])
    result = SharpnessResult(names=["0", "1", "2"], classes=[[0], [1], [2]], counts=three,
                             rho=0.05, steps=5, normalize="batch", loss=three, grad_norm=three,
                             one_step=three, multi_step=three, trajectory=three[:, None])
    plots.plot_sharpness_vs_count(result, [500, 60, 6], tmp_path / "s.png",
                                  labels=["cat", "dog", "emu"])
    assert [t.get_text() for t in figures[0].axes[0].texts] == ["cat", "dog", "emu"]
    with pytest.raises(ValueError, match="2 labels for 3 classes; give one per class"):
        plots.plot_sharpness_vs_count(result, [500, 60, 6], tmp_path / "s.png",
                                      labels=["cat", "dog"])
