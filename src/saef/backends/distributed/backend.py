"""``--backend dist``: the backend the training loop drives when each process is one rank."""

from __future__ import annotations

import json
import os

import torch
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
        outcomes = all_gather_json(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, message) for r, message in enumerate(outcomes) if message is not None]
        if failed:
            rank, message = failed[0]
            raise PeerFailed(f"rank {rank} failed: {message}")

    def gather(self):
        return all_gather_json

    def agree(self, values):
        everyone = all_gather_json(values)
        values = everyone[self.rank]  # (as the others see it: through JSON)
        keys = list(values) + [k for other in everyone for k in other if k not in values]
        for key in keys:
            differing = [r for r, other in enumerate(everyone) if other.get(key) != everyone[0].get(key)]
            if differing:
                first = differing[0]
                raise RanksDisagree(f"the ranks disagree on {key}: rank 0 has {everyone[0].get(key)!r}, rank {first} has "
                                    f"{everyone[first].get(key)!r}" + (f" (and {len(differing) - 1} more ranks differ)" if len(differing) > 1 else "")
                                    + "; start every rank with the same settings")

    def launches(self):
        return all_gather_json(_launch_id())

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


def all_gather_json(value):
    """Every rank's ``value`` (JSON: numbers, strings, lists, dicts, None), in rank order, once all have
    called it. The ranks trust each other, but what they exchange is data, not code: JSON bytes in tensors
    (torch's ``all_gather_object`` would unpickle a peer's bytes)."""
    data = json.dumps(value).encode()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    mine = torch.zeros(max(lengths), dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in lengths]
    dist.all_gather(everyone, mine)
    return [json.loads(bytes(t[:n].cpu().numpy())) for t, n in zip(everyone, lengths)]


def _launch_id() -> str:
    """This process's launcher, as the same string across its restarts and a different one for any other
    launch: the host, the launcher's process id and start time, and torchrun's run id."""
    import socket

    parent = os.getppid()
    try:  # field 22 of /proc/PID/stat: the process's start time in clock ticks since boot
        with open(f"/proc/{parent}/stat", "rb") as handle:
            started = handle.read(4096).rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()}/{parent}/{started}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
