"""What a training run shows while it runs: a progress bar per epoch on a terminal, plain lines
when the output goes to a file or a pipe, and an estimate of the whole run's remaining time.

Three levels, chosen by the command's `-q` flags:

* default: per-epoch bars (only when stderr is a terminal; a file gets no `\\r` frames, but a plain
  progress line at most every `interval` seconds instead) and one result line per epoch;
* `-q`: the result line per epoch, no bars and no progress lines;
* `-qq`: nothing while training (the command still prints its final summary and any error).

Epochs are shown from 1 (`epoch 3/8`); the remaining time is the wall time per step measured so
far in this process (evaluation included, once an epoch has ended) times the steps left in the run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

from tqdm import tqdm


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes and captured output)."""
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def say(message: str) -> None:
    """Print a line on stdout, above a progress bar if one is drawn, and flush it (a log file
    gets each line as it happens)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    """A duration as h:mm:ss or m:ss, rounded to the second: 83.4 -> "1:23"."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunDisplay:
    """Bars, progress lines and the remaining-time estimate of one run.

    Args:
        epochs: the run's number of epochs.
        bars: progress bars wanted (drawn only if stderr is a terminal).
        verbose: result lines and messages wanted (False: silent).
        interval: seconds between plain progress lines when bars are wanted but stderr is not a
            terminal.
        clock: the time source (seconds); tests pass a fake one.
    """

    def __init__(self, epochs: int, *, bars: bool = True, verbose: bool = True,
                 interval: float = 60.0, clock: Callable[[], float] | None = None) -> None:
        self.epochs = epochs
        self.verbose = verbose
        self.bars = bars and verbose and is_terminal(sys.stderr)
        self.lines = bars and verbose and not self.bars
        self.interval = interval
        self.clock = clock or time.perf_counter
        self.start = self.clock()
        self.timed_steps = 0
        self.epoch, self.steps, self.step = 0, 0, 0
        self.last_line = self.start
        self.bar: tqdm | None = None

    def say(self, message: str) -> None:
        """Print a line (above the bar, if one is drawn) and flush it, unless silent."""
        if self.verbose:
            say(message)

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        """Epoch `epoch` (0-based index) of `steps` steps begins, `done` of them already taken."""
        self.epoch, self.steps, self.step = epoch, steps, done
        if self.bars:
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{self.epochs}",
                            leave=False, unit="step", file=sys.stderr)

    def advance(self) -> None:
        """One step was taken."""
        self.step += 1
        self.timed_steps += 1
        left = self.remaining()
        if self.bar is not None:
            if left is not None:
                self.bar.set_postfix_str(f"run ~{format_duration(left)} left", refresh=False)
            self.bar.update(1)
        elif self.lines and self.clock() - self.last_line >= self.interval:
            self.last_line = self.clock()
            self.say(f"epoch {self.epoch + 1}/{self.epochs}: step {self.step}/{self.steps}"
                     + ("" if left is None else f", run ~{format_duration(left)} left"))

    def end_epoch(self) -> None:
        """The epoch's steps are over (its bar goes)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def steps_left(self) -> int:
        """Steps of the run not yet taken."""
        return (self.epochs - self.epoch - 1) * self.steps + (self.steps - self.step)

    def remaining(self) -> float | None:
        """Estimated seconds to the end of the run (None before a step has been timed)."""
        if self.timed_steps == 0:
            return None
        per_step = (self.clock() - self.start) / self.timed_steps
        return per_step * self.steps_left()

    def eta_text(self) -> str:
        """"; ~m:ss left" for a result line, or "" on the last epoch or with no estimate."""
        left = self.remaining()
        if left is None or self.steps_left() == 0:
            return ""
        return f"; run ~{format_duration(left)} left"
