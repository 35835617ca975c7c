"""Learning-rate and radius schedules as pure functions of the (fractional) epoch.

Pure functions keep resume exact: nothing about a schedule needs saving beyond the epoch.
"""

from __future__ import annotations

import bisect
import math

from samkit.train.config import OptimConfig, ScheduleConfig


def lr_factor(schedule: ScheduleConfig, t: float) -> float:
    """The multiplier of the base learning rate at fractional epoch t (0 <= t <= epochs).

    Linear warm-up over `warmup_epochs`, then cosine to 0 over the run, step decay by `decay` at
    each milestone, or constant.
    """
    if schedule.lr == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(t / schedule.epochs, 1.0)))
    elif schedule.lr == "step":
        factor = schedule.decay ** bisect.bisect_right(sorted(schedule.milestones), t)
    else:
        factor = 1.0
    if schedule.warmup_epochs > 0 and t < schedule.warmup_epochs:
        factor *= t / schedule.warmup_epochs
    return factor


def rho_at(optim: OptimConfig, epoch: int, epochs: int) -> float | None:
    """The radius that `optim.rho_schedule` sets at `epoch` ([[fraction, rho], ...]: from
    fraction * epochs on, rho), or None before its first entry."""
    value = None
    for fraction, rho in sorted(optim.rho_schedule):
        if epoch >= fraction * epochs:
            value = rho
    return value
