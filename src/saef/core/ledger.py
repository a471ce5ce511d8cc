"""The bit ledger: every bit a process's workers send or receive, counted in one place.

A transport owns one ledger and records into it as payloads move; the algorithm, the trainers and the
records read it. Counts are of real payload tensors (``numel * element_size``), never nominal ratios.
"""

from __future__ import annotations

from typing import Dict

__all__ = ["BitLedger", "PER_WORKER"]

# Bits per worker, cumulative: what one worker sent to the server (up), received from it (down), and sent
# plus received for error averaging (the dense error goes out, its mean comes back, as in an all-reduce).
# These are the columns of a run's records; their sum is all the algorithm's traffic of one worker.
PER_WORKER = ("bits_up", "bits_down", "bits_averaging")


class BitLedger:
    """Cumulative counters: the three per-worker bit counts of :data:`PER_WORKER`, and any further
    counters a transport keeps (the distributed one records the bytes handed to and returned by
    ``torch.distributed`` per direction, as ``wire_<direction>_<sent|received>``)."""

    def __init__(self):
        self.counts: Dict[str, int] = {key: 0 for key in PER_WORKER}

    def add(self, key: str, amount: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + int(amount)

    def per_worker(self) -> Dict[str, int]:
        """Bits per worker: up (to the server), down (from it), averaging (error all-reduce, both ways)."""
        return {key: self.counts[key] for key in PER_WORKER}

    def state_dict(self) -> Dict[str, int]:
        return dict(self.counts)

    def load_per_worker(self, state: Dict[str, int]) -> None:
        """Take only the per-worker bit counts of ``state`` (another process's ledger, on --reset-errors)."""
        if not isinstance(state, dict) or any(key not in state for key in PER_WORKER):
            raise ValueError(f"a bit ledger's state must hold the counters {PER_WORKER}")
        self.counts.update({key: int(state[key]) for key in PER_WORKER})

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if not isinstance(state, dict) or any(key not in state for key in PER_WORKER):
            raise ValueError(f"a bit ledger's state must hold the counters {PER_WORKER}")
        self.counts = {key: int(value) for key, value in state.items()}
