"""``--backend dist``: the backend the training loop drives when each process is one rank."""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import nn

from ...core import AlgorithmConfig
from ..base import Backend, PeerFailed, RanksDisagree
from .groups import forget_direction_groups
from .rendezvous import RendezvousTimeout, init_distributed
from .trainer import DistributedTrainer

__all__ = ["DistributedBackend"]


class DistributedBackend(Backend):
    """``--backend dist``: this process is one rank, one worker, of a torch.distributed job (torchrun)."""

    name = "dist"

    def start(self, workers: int):
        device = init_distributed(self.device_name, self.timeout)
        self.rank, self.processes = dist.get_rank(), dist.get_world_size()
        return device, self.processes  # one worker per rank, whatever was asked

    def main_first(self, work):
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except (ValueError, OSError) as failure:  # bad data: every rank stops with it, none waits
                error = failure
        self.settle(error)
        return result if self.rank == 0 else work()

    def settle(self, error):
        outcomes = [None] * self.processes
        dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, message) for r, message in enumerate(outcomes) if message is not None]
        if failed:
            rank, message = failed[0]
            raise PeerFailed(f"rank {rank} failed: {message}")

    def gather(self):
        def every_rank(value):
            values = [None] * self.processes
            dist.all_gather_object(values, value)
            return values

        return every_rank

    def agree(self, values):
        everyone = [None] * self.processes
        dist.all_gather_object(everyone, values)
        keys = list(values) + [k for other in everyone for k in other if k not in values]
        for key in keys:
            differing = [r for r, other in enumerate(everyone) if other.get(key) != everyone[0].get(key)]
            if differing:
                first = differing[0]
                raise RanksDisagree(f"the ranks disagree on {key}: rank 0 has {everyone[0].get(key)!r}, rank {first} has "
                                    f"{everyone[first].get(key)!r}" + (f" (and {len(differing) - 1} more ranks differ)" if len(differing) > 1 else "")
                                    + "; start every rank with the same settings")

    def restarted(self) -> bool:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0

    def make_trainer(self, model: nn.Module, config: AlgorithmConfig, precision: str = "fp32") -> DistributedTrainer:
        return DistributedTrainer(model, config=config, server=self.server, precision=precision, overlap_bytes=self.overlap_bytes)

    def close(self) -> None:
        if dist.is_initialized():
            forget_direction_groups()  # (freed with the rest, not at the interpreter's exit)
            dist.destroy_process_group()

    def failure_message(self, error: BaseException):
        if not isinstance(error, RuntimeError):
            return None
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        if isinstance(error, RendezvousTimeout):
            return f"rank {rank}: {error}"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"rank {rank}: distributed training failed, another rank may have died or hung "
                f"({type(error).__name__}: {first})")
