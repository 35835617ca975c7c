"""`samkit sharpness` on a trained run: the JSON and plots it promises, without touching the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from samkit.cli import main
from samkit.train.checkpoint import load_checkpoint
from samkit.train.config import load_config
from samkit.train.loop import Trainer


def test_sharpness_command_on_a_run(tmp_path: Path, capsys: pytest.CaptureFixture,
                                   tiny_fmnist: Path) -> None:
    config = load_config(None, [f"data.root={tiny_fmnist}", "data.limit_per_class=100",
                                "schedule.epochs=1", "run.max_steps_per_epoch=4",
                                f"run.out={tmp_path}", "run.name=r", "optim.method=sam"])
    Trainer(config, progress=False).run()
    run = tmp_path / "r"
    before = load_checkpoint(run / "checkpoint.pt")["model"]
    code = main(["sharpness", str(run), "--quiet", "--per-class", "4", "--hvps", "9",
                 "--what", "trace,classwise,groups,landscape"])
    assert code == 0
    assert "normalised trace" in capsys.readouterr().out
    out = run / "sharpness"
    result = json.loads((out / "sharpness.json").read_text())
    assert result["samples"] == sum(min(4, n) for n in result["counts"]) == 32
    assert result["trace"]["num_hvps"] == 9
    assert result["normalized_trace"]["value"] == pytest.approx(
        result["trace"]["estimate"] / result["normalized_trace"]["grad_norm"])
    cls = result["classwise"]
    assert len(cls["multi_step"]) == 10
    assert all(m >= o - 1e-9 and m >= 0 for m, o in zip(cls["multi_step"], cls["one_step"]))
    # counts 100 ... 1: every class is few-shot (< 200), the tail is n < 200 too: head is empty
    assert result["groups"]["names"] == ["few", "tail"]
    for name in ("class_sharpness.png", "landscape_1d.png", "landscape_2d.png"):
        assert (out / name).stat().st_size > 0
    after = load_checkpoint(run / "checkpoint.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sharpness_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sharpness", str(tmp_path), "--quiet"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
