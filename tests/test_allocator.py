"""samkit.train.allocator: glibc keeps freed CPU memory for reuse, when asked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from samkit.train import allocator

CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from samkit.train.allocator import keep_freed_memory

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    applied = keep_freed_memory() if sys.argv[1] == "apply" else False
    t = torch.ones(6 * 2**20)  # 24 MiB, written
    before = rss()
    del t
    print(applied, (before - rss()) / 2**20)
    """
)


def freed(apply: bool, **env: str) -> tuple[bool, float]:
    """(applied, MiB returned to the system when a 24 MiB tensor is freed), in a fresh process."""
    clean = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "apply" if apply else "no"],
        env={**clean, **env}, capture_output=True, text=True, check=True,
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_freed_memory_is_kept_for_reuse() -> None:
    applied, returned = freed(apply=True)
    if not applied:
        pytest.skip("this Linux's C library has no mallopt (not glibc)")
    assert returned < 1
    assert freed(apply=False) == (False, pytest.approx(24, abs=1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_an_allocator_chosen_in_the_environment_is_left_alone() -> None:
    applied, returned = freed(apply=True, MALLOC_TRIM_THRESHOLD_="0")
    assert not applied
    assert returned == pytest.approx(24, abs=1)


@pytest.mark.parametrize("opt_in", ["1", None])
def test_the_command_line_applies_it_when_asked(opt_in: str | None, monkeypatch) -> None:
    from samkit import cli

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    if opt_in is None:
        monkeypatch.delenv(allocator.OPT_IN, raising=False)
    else:
        monkeypatch.setenv(allocator.OPT_IN, opt_in)
    assert cli.main(["methods"]) == 0
    assert calls == ([1] if opt_in else [])
