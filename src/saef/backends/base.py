"""The backend interface: how a training run reaches its workers.

A backend starts (joins a job, picks the device), says how many workers there are and which process this
is, builds the :class:`~saef.core.Trainer` the loop trains with, and offers the few collective services the
loop needs (run something on the main process first, a barrier for checkpoints). The loop
(:mod:`saef.app.loop`) gets a backend by name from :mod:`saef.backends.registry` and never asks which one.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch
from torch import nn

from ..core import AlgorithmConfig, Trainer

__all__ = ["Backend", "RanksDisagree", "PeerFailed", "resolve_device"]

T = TypeVar("T")


class RanksDisagree(ValueError):
    """The processes of one job were started with different settings."""


class PeerFailed(ValueError):
    """Another process of the job failed on bad input (its own message says how)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device = {name!r} but no CUDA device is available")
    return torch.device(name)


class Backend:
    """Base class of the backends. Construct with the run's backend options; then :meth:`start`.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        timeout: seconds any wait on another process may take (where there are others).
        server: where the server's work runs (``sharded`` or ``rank0``; where it means something).
        overlap_bytes: the most bytes of gradients in a bucket of a step overlapped with backward (0: no
            overlap; where it means something).
    """

    name = "backend"
    rank = 0  # this process's index
    processes = 1  # processes in the job

    def __init__(self, *, device: str = "auto", timeout: float = 300.0, server: str = "sharded", overlap_bytes: int = 0):
        self.device_name, self.timeout, self.server = device, timeout, server
        self.overlap_bytes = int(overlap_bytes)

    def start(self, workers: int) -> Tuple[torch.device, int]:
        """Join the job; returns this process's device and the number of workers K (``workers`` asked)."""
        raise NotImplementedError

    def main_first(self, work: Callable[[], T]) -> T:
        """``work()`` on the main process, then on the others (e.g. generating a dataset cache once)."""
        return work()

    def gather(self) -> Optional[Callable[[Any], List[Any]]]:
        """A function that gathers one value from every process once all have called it (a barrier for
        checkpoints), or None with one process."""
        return None

    def settle(self, error: Optional[BaseException]) -> None:
        """After a step that may fail on some processes only (opening the run directory on the main one):
        every process learns whether any failed, and all raise -- the failed ones their own error, the
        others :class:`PeerFailed` naming it -- instead of the others waiting at the next collective."""
        if error is not None:
            raise error

    def agree(self, values: Dict[str, Any]) -> None:
        """Check that every process has the same ``values`` (e.g. its resolved configuration and its
        model's shapes); raise :class:`RanksDisagree` on every process, naming the first key that differs
        and the processes, if not. One process agrees with itself."""

    def launches(self) -> List[Optional[str]]:
        """Every process's launcher (one string per process, the same across the launcher's restarts), so a
        restarted job can tell the run directory it made; None where no launcher restarts the job."""
        return [None] * self.processes

    def restarted(self) -> bool:
        """Whether a launcher restarted this job after a failure (then the run resumes)."""
        return False

    def make_trainer(self, model: nn.Module, config: AlgorithmConfig, precision: str = "fp32") -> Trainer:
        """This process's worker over ``model``, its forward in ``precision`` (fp32 or bf16)."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave the job (after a run that ended normally)."""

    def ignored(self) -> List[str]:
        """The options this backend was given away from their defaults but does not use (the loop names
        them once at the start, so a setting that does nothing is not mistaken for one that does)."""
        return []

    def failure_message(self, error: BaseException) -> Optional[str]:
        """One line for a failure of the backend itself (a peer died, the network broke), or None."""
        return None
