"""saef: distributed training with compressed communication and step-ahead error feedback.

Public API:

* :func:`simulate` -- the algorithm on a toy problem given per-worker gradient functions;
* :class:`Simulator` -- K workers training a ``torch.nn.Module`` in one process;
* :class:`SAEF` -- a ``torch.optim``-style optimizer for one's own training loop;
* :func:`make_compressor`, :func:`register_compressor` -- the compressor registry;
* :class:`Algorithm`, :class:`AlgorithmConfig` -- the algorithm itself, over a transport.

The package is in layers, each importing only those below it: :mod:`saef.compress` (compressors),
:mod:`saef.core` (feedback rules, local optimizers, the transport interface), :mod:`saef.backends`
(simulator, torch.distributed), :mod:`saef.app` (loop, CLI, records); :mod:`saef.zoo` holds datasets and
models (see docs/architecture.md).
"""

from .app.optim import SAEF
from .backends.distributed.fsdp import compress_replicas
from .backends.distributed.hook import CommHookState, comm_hook, local_gradients_hook
from .backends.inprocess import InProcessTransport
from .backends.simulator import Simulator, simulate
from .compress import Compressor, available_compressors, make_compressor, register_compressor
from .core import Algorithm, AlgorithmConfig, AlgorithmState, Transport
from .core.rules import available_rules, register_rule

from ._version import __version__

__all__ = [
    "Algorithm",
    "AlgorithmConfig",
    "AlgorithmState",
    "InProcessTransport",
    "Transport",
    "Compressor",
    "available_compressors",
    "make_compressor",
    "register_compressor",
    "available_rules",
    "register_rule",
    "SAEF",
    "CommHookState",
    "comm_hook",
    "local_gradients_hook",
    "compress_replicas",
    "Simulator",
    "simulate",
    "__version__",
]
