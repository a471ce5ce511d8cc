"""Local optimizers: how a worker turns its gradient into the direction the feedback rule compresses.

A local optimizer keeps per-worker state (named tensors with a leading axis of W rows) and, each step,
updates it from the W gradients and returns the ``(W, P)`` direction. Today: momentum SGD.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["MomentumSGD"]


class MomentumSGD:
    """Momentum SGD, as ``torch.optim.SGD`` keeps it: ``m_k <- mu m_k + g_k + wd z_k`` (m_k = g_k + wd z_k
    when mu = 0), where z_k is the point the gradient was taken at."""

    name = "sgd"

    def __init__(self, momentum: float, weight_decay: float):
        self.momentum = momentum
        self.weight_decay = weight_decay

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        return {"worker_momentum": x.new_zeros(rows, x.numel())}  # m_k, (W, P): each worker's momentum

    def update(self, state, grads: Sequence[Tuple[Tensor, slice]], points: Callable[[], Tensor]) -> Tensor:
        """m_k from ``grads`` -- pairs of a ``(W, n)`` gradient and the stretch of the flat axis it covers --
        and ``points()``, the (W, P) gradient points (read only with weight decay). Returns m, (W, P)."""
        m = state.worker_momentum
        for g, columns in grads:
            part = m[:, columns]
            if self.momentum:  # m <- g + mu m, one pass
                torch.add(g, part, alpha=self.momentum, out=part)
            else:  # mu = 0: the momentum buffer is just this step's gradient
                part.copy_(g)
        if self.weight_decay:
            m.add_(points(), alpha=self.weight_decay)
        return m
