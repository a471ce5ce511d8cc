"""saef: distributed training with compressed communication and step-ahead error feedback.

Public API:

* :func:`simulate` -- Algorithm 1 on a toy problem given per-worker gradient functions;
* :class:`Simulator` -- K workers training a ``torch.nn.Module`` in one process;
* :class:`SAEF` -- a ``torch.optim``-style optimizer for one's own training loop;
* :func:`make_compressor`, :func:`register_compressor` -- the compressor registry;
* :class:`ErrorFeedback`, :class:`ErrorFeedbackConfig` -- the algorithm itself, over a transport.
"""

from .algorithm import ErrorFeedback, ErrorFeedbackConfig, ErrorFeedbackState
from .comm import InProcessTransport, Transport
from .compressors import Compressor, available_compressors, make_compressor, register_compressor
from .optim import SAEF
from .simulator import Simulator, simulate

__version__ = "0.1.0"

__all__ = [
    "ErrorFeedback",
    "ErrorFeedbackConfig",
    "ErrorFeedbackState",
    "InProcessTransport",
    "Transport",
    "Compressor",
    "available_compressors",
    "make_compressor",
    "register_compressor",
    "SAEF",
    "Simulator",
    "simulate",
    "__version__",
]
