"""The worker protocol: what the training loop may ask of a backend's trainer, and what both share.

A *worker* here is the object a process trains with: the simulator (all K workers in one process) or one
rank of a distributed run (one worker). The loop (:mod:`saef.app.loop`) uses nothing else of it.
"""

from __future__ import annotations

from typing import Dict, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from .algorithm import Algorithm, AlgorithmState
from .transport import Transport

__all__ = ["Trainer", "TrainerBase", "model_penalty", "PRECISIONS", "check_precision"]

# The precisions of the forward and backward passes: the autocast dtype (None: no autocast). The parameters,
# the local optimizer's state and the errors stay fp32 whatever is chosen: error feedback accumulates
# differences far below bf16's resolution (2^-8 relative), which a bf16 error would round away.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got precision={precision!r}")
    return precision


def model_penalty(model: nn.Module, params: Sequence[Tensor]) -> Optional[Tensor]:
    """The model's own term of the objective on its parameters (e.g. logistic regression's regulariser),
    ``model.penalty(params)`` for parameters with a leading axis of W rows, in model order: ``(W,)``, added
    to each worker's data loss by every trainer and by evaluation. None for a model without one."""
    penalty = getattr(model, "penalty", None)
    return None if penalty is None else penalty(params)


@runtime_checkable
class Trainer(Protocol):
    """What a backend's trainer offers the training loop: the object in one process that hosts W of the
    job's K workers (all K in the simulator, one on a distributed rank) and steps them together."""

    num_workers: int  # K, the workers of the whole job
    rank: int  # this process's index (0 in the simulator)
    worker_ids: Sequence[int]  # the workers hosted here, in order: their shards of each batch are fed to step
    is_main: bool  # whether this process writes the records
    cheap_diagnostics: bool  # whether the mismatch terms are cheap enough to compute every step
    has_diagnostics: bool  # whether x~ and the mismatch terms are defined (by the rule, with compression)
    rounds: int  # exchanges between the workers so far (with local steps, one per H steps)

    def step(self, inputs: Tensor, targets: Tensor, lr: float) -> Tensor:
        """One step on the hosted workers' shards, concatenated in ``worker_ids`` order; the mean loss.
        Raises :class:`~saef.core.flat.NonFiniteStep`, with nothing changed, on a NaN or Inf."""

    def mismatch(self) -> Optional[Dict[str, float]]:
        """The gradient-mismatch terms, or None where the rule defines none."""

    @property
    def bits(self) -> Dict[str, int]:
        """Cumulative bits per worker: up, down, averaging."""

    def load_into(self, model: nn.Module, point: str = "x") -> nn.Module:
        """Write x (or x~) and the mean running statistics into ``model`` (collective where distributed)."""

    def average(self, value: float) -> float:
        """The mean of a per-process number over processes."""

    def state_dict(self) -> Dict[str, object]:
        """Everything needed to continue exactly (this process's share)."""

    def load_state_dict(self, state: Dict[str, object], reset_errors: bool = False) -> None:
        """Restore :meth:`state_dict`; ``reset_errors`` keeps the parameters and counters only."""


class TrainerBase:
    """What the simulator and one distributed rank share: the flat parameters ``x``, the algorithm, its
    state and the transport's ledger, and the read-outs of them. Subclasses set ``x``, ``algorithm``,
    ``state`` and ``transport``."""

    x: Tensor
    algorithm: Algorithm
    state: AlgorithmState
    transport: Transport
    precision: str = "fp32"  # of the forward (and so the backward): a key of PRECISIONS

    def run_forward(self, forward, *args) -> Tensor:
        """``forward(*args)`` (the model's forward), in this worker's precision: as it is for fp32 (whatever
        the model's dtype), else under autocast on x's device with the outputs cast back to fp32, so that
        the loss is taken in fp32."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return forward(*args)
        with torch.autocast(self.x.device.type, dtype=dtype):
            outputs = forward(*args)
        return outputs.float()

    @property
    def has_diagnostics(self) -> bool:
        return self.algorithm.has_diagnostics

    @property
    def rounds(self) -> int:
        """Exchanges between the workers so far: the algorithm's steps (with local steps, one per H inner steps)."""
        return self.state.step

    def parameters_at(self, point: str = "x") -> Tensor:
        """Flat parameters at x (the model iterate) or at the auxiliary iterate x~."""
        return self.algorithm.point(self.state, self.x, point)

    def mismatch(self) -> Optional[Dict[str, float]]:
        """The two gradient-mismatch terms (see :meth:`Algorithm.mismatch`), or None where the rule
        defines none (EF21, direct) or nothing is compressed."""
        return self.algorithm.mismatch(self.state) if self.has_diagnostics else None

    @property
    def bits(self) -> Dict[str, int]:
        """Cumulative bits per worker: up (to the server), down (from it), averaging (error all-reduce, sent + received)."""
        return self.transport.ledger.per_worker()

    def _algorithm_state(self) -> Dict[str, object]:
        """x (what the workers hold), the model iterate (what is evaluated: the same as x except for rules
        whose server keeps its own, as EF21 double-way; assembling it is collective where distributed),
        the algorithm's state and the ledger."""
        return {"x": self.x.clone(), "model": self.parameters_at("x").clone(), "algorithm": self.state.state_dict(),
                "ledger": self.transport.ledger.state_dict()}

    def _load_algorithm_state(self, state: Dict[str, object], reset_errors: bool) -> None:
        """Restore x, the algorithm's state and the ledger exactly; or, with ``reset_errors``, start the
        rule's and the local optimizer's state afresh from the saved *model iterate* (for EF21 double-way
        the server's x, not the workers' copy), keeping the step, the per-worker bit counts and what the
        local optimizer carries over (Adam's v; see :meth:`Algorithm.fresh_state`)."""
        if tuple(state["x"].shape) != tuple(self.x.shape):
            raise ValueError(f"state has {state['x'].numel()} parameters, the model has {self.x.numel()}")
        if reset_errors:
            self.x.copy_(state.get("model", state["x"]))
            self.state = self.algorithm.fresh_state(self.x, state["algorithm"])
            self.transport.ledger.load_per_worker(state["ledger"])  # this process's wire counters stay its own
        else:
            self.x.copy_(state["x"])
            self.state.load_state_dict(state["algorithm"])
            self.transport.ledger.load_state_dict(state["ledger"])
