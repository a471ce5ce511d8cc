"""Progress where no bar can show it: when the output is not a terminal (a log file, a job scheduler), the
loop prints a line every ``--log-every`` steps, or every :data:`EVERY_SECONDS` seconds by default, so that a
long epoch is never silent (a GPT epoch of 7 minutes used to print nothing until its end)."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, Sequence

__all__ = ["ProgressLines", "EVERY_SECONDS", "progress_lines"]

EVERY_SECONDS = 30.0


class ProgressLines:
    """A line after a step every ``every`` steps (0: every :data:`EVERY_SECONDS` seconds)."""

    def __init__(self, log: Callable[[str], None], steps: int, epoch: int, epochs: int, every: int):
        self.log, self.steps, self.epoch, self.epochs, self.every = log, steps, epoch, epochs, every
        self.started = self.last = time.perf_counter()
        self.reported = 0  # losses already summarised in a line

    def update(self, step_in_epoch: int, losses: Sequence[float]) -> None:
        now = time.perf_counter()
        due = step_in_epoch % self.every == 0 if self.every else now - self.last >= EVERY_SECONDS
        if not due or step_in_epoch >= self.steps:  # (the epoch's own line comes at its end)
            return
        recent = [v for v in losses[self.reported:] if math.isfinite(v)]
        self.reported, self.last = len(losses), now
        loss = f"  train loss {sum(recent) / len(recent):.4f}" if recent else ""
        self.log(f"epoch {self.epoch}/{self.epochs}  step {step_in_epoch}/{self.steps}{loss}  ({now - self.started:.0f} s)")
        sys.stdout.flush()  # (a pipe or a file buffers what it is given: the line is for now)


def progress_lines(show: bool, log, steps: int, epoch: int, epochs: int, every: int) -> Optional[ProgressLines]:
    """Lines where progress is shown (``show``) and the output is not a terminal (where the bar is); else None."""
    if not show or sys.stderr.isatty():
        return None
    return ProgressLines(log, steps, epoch, epochs, every)
