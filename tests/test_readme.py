"""Every `samkit ...` command in the README's code blocks runs, shortened: generated Fashion-MNIST
data, one step of one epoch, and stand-ins for what a CPU test cannot have (a GPU, a download)."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest

from samkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
# What the test swaps in; each left side must appear in the README as written.
STAND_INS = {
    "run.device=cuda": "run.device=cpu",  # no GPU in the test
    "run.compile=true": "run.compile=eager",  # inductor's C++ build takes minutes on a CPU
    "mymodels:make_net": "harness_models:TinyNet",  # the README's placeholder
}
# Commands left out, by their start, and why (each must still be in the README).
NOT_RUN = {
    "samkit download fashion-mnist": "needs the network",
    "samkit train configs/imagenet_lt_clip_lora_focal.yaml": "needs CLIP's weights (the "
    "integration tests run this recipe's model from a small random config)",
}


def not_run(line: str) -> bool:
    return any(line.startswith(start) for start in NOT_RUN)


def readme_commands() -> list[str]:
    """The `samkit` lines of the README's bash blocks, in order, without their comments."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0]
            line = re.split(r"\s(?:\d?>|\|)", line)[0].strip()  # the shell's redirections and pipes
            if line.startswith("samkit "):
                lines.append(line)
    return lines


def shortened(line: str, data: Path, index: int) -> list[str]:
    """The command's arguments, with the stand-ins and the overrides that make it a quick run."""
    for old, new in STAND_INS.items():
        line = line.replace(old, new)
    argv = []
    for word in shlex.split(line)[1:]:
        argv += sorted(glob.glob(word)) if "*" in word else [word]
    short = [f"data.root={data}", "data.name=fashion-mnist", "data.limit_per_class=300",
             "data.batch_size=32", "data.eval_batch_size=400", "schedule.epochs=1",
             "run.max_steps_per_epoch=1", "run.threads=1"]
    if "mnist1d" in line:  # generated, small (the test points SAMKIT_CACHE at its own folder)
        short = ["data.mnist1d.num_samples=1500", "data.n_max=80", "data.ratio=10",
                 "data.val_per_class=20", *short[3:]]
    if argv[0] == "train" and "--resume" not in argv and "--print-config" not in argv:
        if not any(a.startswith("run.name=") for a in argv):
            short.append(f"run.name=readme-{index}")  # the default names would collide
        return [*argv, *short]
    if argv[0] == "train":
        return [*argv, *short]
    if argv[0] == "compare":
        if "--seeds" not in argv:
            argv += ["--seeds", "0"]
        if "--methods" not in argv:
            argv += ["--methods", "plain,sam"]
        return [*argv, *short, "--quiet"]
    if argv[0] == "sharpness":
        if "--what" not in argv:  # all of them takes a minute; the density and the landscape
            argv += ["--what", "trace,classwise,groups"]  # are tested in test_analysis.py
        return [*argv, "--hvps", "6", "--per-class", "4", "--quiet"]
    return argv


def test_the_readme_lists_the_harness_commands() -> None:
    lines = readme_commands()
    for old in [*STAND_INS, *NOT_RUN]:
        assert any(old in line for line in lines), old
    assert len([x for x in lines if x.startswith("samkit train")]) >= 8


def test_every_readme_command_runs(tmp_path: Path, tiny_fmnist: Path,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    ran = 0
    for index, line in enumerate(readme_commands()):
        if not_run(line):
            continue
        argv = shortened(line, tiny_fmnist, index)
        try:
            code = main(argv)
        except SystemExit as stop:  # --version: argparse prints and exits
            code = stop.code
        err = capsys.readouterr().err
        assert code == 0, f"{line}\n  ran as: samkit {shlex.join(argv)}\n  {err}"
        ran += 1
    assert ran == len([line for line in readme_commands() if not not_run(line)]) >= 15
    assert (tmp_path / "report/report.md").is_file()
    assert (tmp_path / "runs/imb/sharpness/sharpness.json").is_file()
