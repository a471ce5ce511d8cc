"""Backends: where the workers run. :mod:`.simulator` (K workers in one process, with :mod:`.stacked` and
:mod:`.inprocess`) and :mod:`.distributed` (one worker per torch.distributed rank). They import
:mod:`saef.core` and never each other; :mod:`.registry` names them.
"""

from .base import Backend
from .registry import available_backends, make_backend, optimizer_transport, register_backend

__all__ = ["Backend", "available_backends", "make_backend", "optimizer_transport", "register_backend"]
