"""The algorithm: feedback rules, local optimizers, the transport interface, the bit ledger.

Imports :mod:`saef.compress` and nothing above it. :mod:`.algorithm` holds the step every rule shares (its
phases: :class:`Flight`), :mod:`.rules` the rules, :mod:`.local` the local optimizers (their protocol and
registry), :mod:`.transport` the interface the backends implement, :mod:`.trainer` the protocol the training
loop uses.
"""

from .algorithm import Algorithm, AlgorithmState, Flight
from .config import AlgorithmConfig
from .flat import NonFiniteStep, all_finite, check_dense, flatten, unflatten, write_flat
from .ledger import BitLedger
from .local import LocalOptimizer, available_optimizers, optimizer_class, register_optimizer
from .transport import Pending, Transport
from .trainer import PRECISIONS, Trainer, TrainerBase, check_precision, model_penalty

__all__ = ["Algorithm", "AlgorithmState", "Flight", "LocalOptimizer", "available_optimizers", "optimizer_class",
           "register_optimizer", "AlgorithmConfig", "NonFiniteStep", "all_finite", "check_dense", "flatten",
           "unflatten", "write_flat", "BitLedger", "Pending", "Transport", "Trainer", "TrainerBase", "model_penalty", "PRECISIONS", "check_precision"]
