"""Which run directory a run writes, decided once for every process of the job.

* ``--output DIR``: that directory (a new run refuses one that is not empty; ``--resume`` reopens it);
* no ``--output``: a new directory named after the run and the time, ``runs/<name>-<time>``, reserved by
  creating it, so two runs started in the same second get two directories (the second gets ``-2``);
* a job that a launcher (torchrun ``--max-restarts``) restarted after a failure: the directory this launch
  made, recognised by the launchers recorded in its ``environment.json`` (:meth:`Backend.launches`), which
  the run then resumes -- from its newest checkpoint, or from the beginning if it had written none.

The main process decides and the others take its answer, so all write the same directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from ..files import parse_json, read_inside
from .config import TrainConfig, default_output

__all__ = ["choose", "ENVIRONMENT_LIMIT"]

ENVIRONMENT_LIMIT = 1 << 20  # bytes of a run's environment.json read when looking for a restarted launch's run


def choose(config: TrainConfig, backend, resume: bool) -> Tuple[Path, bool, List[Optional[str]]]:
    """``(directory, resume, launches)``: where the run writes, whether it continues what is there, and every
    process's launcher (to record in a new run's environment)."""
    launches = backend.launches()
    if backend.restarted():
        own = _on_main(backend, lambda: _own_run(config, launches))
        if own is not None:
            return Path(own), True, launches
    if config.output:
        return Path(config.output), resume, launches
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(_on_main(backend, lambda: str(_reserve(default_output(config, stamp))))), False, launches


def _on_main(backend, work: Callable[[], Any]) -> Any:
    """``work()`` on the main process, its answer handed to every process (an OSError there stops all)."""
    value, error = None, None
    if backend.rank == 0:
        try:
            value = work()
        except OSError as failure:
            error = failure
    backend.settle(error)
    gather = backend.gather()
    return gather(value)[0] if gather is not None else value


def _own_run(config: TrainConfig, launches: List[Optional[str]]) -> Optional[str]:
    """The run directory that this job's launch made before it was restarted, or None: ``--output`` if given,
    else the newest ``runs/<name>-*`` of this run's name, when its environment.json records one of
    ``launches``."""
    ours = {launch for launch in launches if launch is not None}
    if config.output:
        candidates = [Path(config.output)]
    else:
        candidates = sorted(Path(".").glob(str(default_output(config, "*"))), reverse=True)
    for candidate in candidates:
        try:
            recorded = parse_json(read_inside(candidate.resolve(), "environment.json", ENVIRONMENT_LIMIT),
                                  candidate / "environment.json")
        except (OSError, ValueError):  # not a run directory (yet), or not one we can read: not ours
            continue
        if isinstance(recorded, dict) and isinstance(recorded.get("launches"), list) and ours & set(map(str, recorded["launches"])):
            return str(candidate)
    return None


def _reserve(path: Path) -> Path:
    """Create ``path``, or ``path-2``, ``path-3``, ... if it exists: a directory no other run has."""
    for attempt in range(1, 1000):
        candidate = path if attempt == 1 else path.with_name(f"{path.name}-{attempt}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path} and 998 more directories of that name exist; give --output")
