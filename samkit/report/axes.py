"""Axis helpers shared by the run, report and diagnostics plots (matplotlib only, no pyplot)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator


def count_ticks(low: float, high: float) -> list[float]:
    """Round tick values from `low` to `high`: 1, 2 and 5 times a power of ten over two decades
    at most, powers of ten over more; the ends themselves when fewer than two round values fall
    between them."""
    steps = (1, 2, 5) if high <= 100 * low else (1,)
    ticks = [m * 10**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in steps if low <= m * 10**k <= high]
    return ticks if len(ticks) >= 2 else sorted({low, high})


def log_count_axis(ax: Axes, counts: Sequence[float]) -> None:
    """A log x axis for training counts with plain labels (6, 20, 500, 5000): matplotlib's own
    log labels read 6x10^0 when the counts span less than a decade or two."""
    positive = [float(c) for c in counts if c > 0]
    ax.set_xscale("log")
    if not positive:
        return
    low, high = min(positive), max(positive)
    ax.set_xlim(low / 1.3, high * 1.3)
    ax.xaxis.set_major_locator(FixedLocator(count_ticks(low, high)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
