"""Fault injection: `samkit train` killed with SIGKILL at random points, inside checkpoint writes too,
and resumed each time, ends with the weights of an uninterrupted run; its run directory stays
consistent after every kill (the checkpoint loads, each epoch is logged once)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from samkit.cli import main
from samkit.train.checkpoint import load_checkpoint, read_jsonl

EPOCHS = 5


def args(out: Path, data: Path) -> list[str]:
    return ["train", "--quiet", "--resume", f"data.root={data}", "data.limit_per_class=300",
            "data.batch_size=32", "data.eval_batch_size=400", "model.name=harness_models:TinyNet",
            f"schedule.epochs={EPOCHS}", "run.max_steps_per_epoch=3", f"run.out={out}",
            "run.name=r", "run.deterministic=true", "run.threads=1"]


def start(argv: list[str]) -> tuple[int, Any]:
    """Run `samkit ARGV` in a forked child (no second import of torch), its checkpoint writes
    announced and slowed (SAMKIT_SLOW_WRITES); return its pid and its stderr as a text stream."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.environ["SAMKIT_SLOW_WRITES"] = "0.2"
            code = main(argv)
        finally:
            os._exit(code)
    os.close(write)
    return pid, os.fdopen(read)


def saved_epoch(run: Path) -> int:
    """The epoch the run's checkpoint holds (0 without one); the checkpoint must load."""
    if not (run / "checkpoint.pt").exists():
        return 0
    return load_checkpoint(run / "checkpoint.pt", keys=("model", "progress"))["progress"]["epoch"]


def check_consistent(run: Path) -> None:
    """What a kill may leave: a loadable checkpoint (or none) and each of its epochs logged once."""
    epochs = [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")]
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    saved = saved_epoch(run)
    # the checkpoint's epochs, and at most the one whose checkpoint was being written
    assert saved <= len(epochs) <= saved + 1, (epochs, saved)


def kill_when(pid: int, stderr: Any, writes: int | None, delay: float) -> str:
    """SIGKILL the child during its `writes`-th checkpoint write, or `delay` seconds after it
    started (writes=None); returns where it was killed (or that it finished first)."""
    where = "finished"
    if writes is None:
        end = time.monotonic() + delay
        while time.monotonic() < end:
            if os.waitpid(pid, os.WNOHANG)[0]:
                stderr.close()
                return where
            time.sleep(0.02)
        where = f"after {delay:.1f} s"
    else:
        seen = 0
        for line in stderr:
            if line.startswith("samkit: writing"):
                seen += 1
                if seen == writes:
                    time.sleep(0.05)  # inside the pause, before the rename
                    where = f"in write {writes} ({line.split()[-1]})"
                    break
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    stderr.close()
    return where


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(
        tmp_path: Path, tiny_fmnist: Path) -> None:
    assert main(args(tmp_path / "a", tiny_fmnist)) == 0
    rng = random.Random(11)
    run = tmp_path / "b/r"
    where = []
    for i in range(6):
        # kills 1-3 and 5 inside a write the child is sure to reach (each epoch left writes a
        # checkpoint); the timed kills come after the first three, as a fast child may finish first
        left = EPOCHS - saved_epoch(run)
        writes = rng.randint(1, max(1, min(3, left))) if i in (0, 1, 2, 4) else None
        pid, stderr = start(args(tmp_path / "b", tiny_fmnist))
        where.append(kill_when(pid, stderr, writes, rng.uniform(0.2, 1.5)))
        if run.exists():
            check_consistent(run)
    assert sum(w.startswith("in write") for w in where) >= 3, where
    assert main(args(tmp_path / "b", tiny_fmnist)) == 0, where
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    assert not list(run.glob(".*.tmp")), where
    a = load_checkpoint(tmp_path / "a/r/checkpoint.pt")["model"]
    b = load_checkpoint(run / "checkpoint.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), (key, where)
