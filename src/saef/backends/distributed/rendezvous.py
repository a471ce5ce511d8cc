"""Joining a torch.distributed job, bounded in time: :func:`init_distributed` and the rendezvous thread."""

from __future__ import annotations

import datetime
import os
import threading

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "RendezvousTimeout", "LauncherMissing"]


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> torch.device:
    """Join the job torchrun (or the caller's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    describes; NCCL when this rank gets a GPU, gloo otherwise. Returns this rank's device.

    ``timeout_s`` bounds every wait: the rendezvous (also when whatever answers on MASTER_PORT is not a
    peer, or no peer comes) and every collective after it. A rank that dies or hangs makes the others fail
    after at most that long instead of waiting for ever.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise LauncherMissing(
            f"--backend dist needs a torch.distributed launcher (environment lacks {', '.join(missing)}); "
            "run it as: torchrun --nproc_per_node K -m saef train --backend dist ..."
        )
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        this = torch.device(device if ":" in device else f"cuda:{local}")
        torch.cuda.set_device(this)
    else:
        this = torch.device("cpu")
    if not dist.is_initialized():
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        _within(timeout_s, lambda: _rendezvous("nccl" if use_cuda else "gloo", datetime.timedelta(seconds=timeout_s)),
                f"the rendezvous at {where} did not complete within --timeout {timeout_s:g} s (a rank missing, or "
                "something other than a saef rank on that port)")
    return this


class RendezvousTimeout(RuntimeError):
    """The ranks did not all meet within the timeout."""


class LauncherMissing(RuntimeError, ValueError):
    """No launcher describes the job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are unset): a usage error."""


def _within(seconds: float, work, message: str):
    """``work()``, or :class:`RendezvousTimeout` with ``message`` once ``seconds`` have passed. torch's own
    timeouts do not bound every wait of the rendezvous (a peer that accepts the connection and never
    answers holds it for ever), so the work runs in a daemon thread that is left behind if it hangs."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="saef-rendezvous", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RendezvousTimeout(message)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _rendezvous(backend: str, timeout: datetime.timedelta) -> None:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0":
        dist.init_process_group(backend, timeout=timeout)
        return
    # After a torchrun restart the rendezvous store still holds the dead round's addresses under the same
    # keys, and a rank may connect to a peer that no longer exists. A per-round prefix keeps each round's
    # keys apart.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not hosted, timeout=timeout)
    store = dist.PrefixStore(f"saef/restart-{restart}/", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
