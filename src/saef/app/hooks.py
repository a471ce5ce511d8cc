"""Points where a test or a tool can step into a running training loop. Empty in normal use.

Each is a list of callables; append to it before the run starts. The test suite uses them to kill a run
at a chosen step, or half-way through writing a checkpoint (``tests/_faults.py``), so that no fault
injection lives in the library itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List

__all__ = ["after_step", "before_checkpoint_write", "call"]

after_step: List[Callable[[int, int], None]] = []  # called with (steps taken so far, rank) after every step
before_checkpoint_write: List[Callable[[Path, str, bytes, int, int], None]] = []  # (folder, file name, bytes, step, rank)


def call(hooks: List[Callable], *args) -> None:
    for hook in list(hooks):
        hook(*args)
