"""Backends by name: ``"sim"`` (K workers in this process) and ``"dist"`` (one worker per torch.distributed
rank). Modules load on first use, so the simulator never imports ``torch.distributed`` machinery.
"""

from __future__ import annotations

import importlib
from typing import Dict, Sequence, Tuple, Union

import torch

from ..core import Transport
from .base import Backend

__all__ = ["register_backend", "make_backend", "available_backends", "optimizer_transport", "hooks_without_exchange"]

_BACKENDS: Dict[str, Union[str, type]] = {
    "sim": "saef.backends.simulator:SimulatorBackend",
    "dist": "saef.backends.distributed:DistributedBackend",
}


def register_backend(name: str, backend: Union[str, type], *, overwrite: bool = False) -> None:
    """Make ``backend`` (a :class:`Backend` subclass, or ``"module:Class"`` to import on first use)
    available as ``saef train --backend NAME``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    if name in _BACKENDS and not overwrite:
        raise ValueError(f"backend {name!r} is already registered (pass overwrite=True to replace it)")
    _BACKENDS[name] = backend


def available_backends() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def make_backend(name: str, **options) -> Backend:
    """The backend ``name``, constructed with ``options`` (device, timeout, server, overlap_bytes)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(available_backends())}")
    target = _BACKENDS[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
    return target(**options)


def optimizer_transport(params: Sequence[torch.Tensor], server: str = "sharded") -> Transport:
    """The transport of a one-worker-per-process optimizer (:class:`saef.SAEF`): the torch.distributed one
    when a process group is initialised (the parameters are broadcast from rank 0 first), else one worker
    alone in this process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        from .inprocess import InProcessTransport

        return InProcessTransport(1)
    from .distributed import DistributedTransport

    with torch.no_grad():
        for p in params:  # every rank starts from rank 0's x_0
            dist.broadcast(p, src=0)
    return DistributedTransport([p.numel() for p in params], server, dtype=params[0].dtype, device=params[0].device)


def hooks_without_exchange() -> tuple:
    """The DDP communication hooks that leave each rank's gradient as it is (saef.local_gradients_hook, and
    torch's noop_hook): under them, DDP exchanges nothing."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    from .distributed.hook import local_gradients_hook

    return local_gradients_hook, noop_hook
