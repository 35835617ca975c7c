"""The README's integration examples run as written (issue 13): every python block of the section
"Inside other training loops" is executed; the fine-tuning commands resolve to the recipe they name."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from samkit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index("## Inside other training loops")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def python_blocks() -> list[str]:
    return [code for lang, code in section_blocks() if lang == "python"]


def test_the_section_has_an_example_per_integration():
    blocks = python_blocks()
    assert len(blocks) == 3
    for name in ("integrations.lightning", "integrations.accelerate", "integrations.transformers"):
        assert sum(name in b for b in blocks) == 1, name


@pytest.mark.parametrize("index", range(3))
def test_python_example_runs_as_written(index, tmp_path, monkeypatch, capsys):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[index]
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = capsys.readouterr().out
    if "integrations.lightning" in code:
        assert namespace["trainer"].global_step == 8  # 2 epochs x 8 batches / accumulate 2
        assert re.search(r"^8 tensor\(", out, flags=re.M)
    elif "integrations.accelerate" in code:
        assert out.count("loss ") == 8  # one line per step: 2 epochs x 4 windows
    else:
        assert namespace["trainer"].state.global_step == 8
        assert namespace["trainer"].state.log_history[-2]["loss"] > 0


def test_fine_tuning_commands_resolve_to_the_recipe(capsys):
    commands = [line for lang, code in section_blocks() if lang == "bash"
                for line in code.splitlines() if line.startswith("samkit train")]
    assert len(commands) == 2
    for command in commands:
        assert main(shlex.split(command)[1:] + ["--print-config"]) == 0
        printed = capsys.readouterr().out
        assert "hf:" in printed and "focalsam" in printed
