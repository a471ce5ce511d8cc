"""Local optimizers: how a worker turns its gradient into the direction the feedback rule compresses.

A local optimizer keeps per-worker state (named tensors with a leading axis of W rows) and, each step,
updates it from the W gradients and returns the ``(W, P)`` direction. Today: momentum SGD.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ..compress import Layout
from .perlayer import PerLayer, Scalar

__all__ = ["MomentumSGD"]


class MomentumSGD:
    """Momentum SGD, as ``torch.optim.SGD`` keeps it: ``m_k <- mu m_k + g_k + wd z_k`` (m_k = g_k + wd z_k
    when mu = 0), where z_k is the point the gradient was taken at. mu and wd may differ by layer
    (:meth:`set`; parameter groups)."""

    name = "sgd"

    def __init__(self, layout: Layout, momentum: Scalar, weight_decay: Scalar):
        self.layout = layout
        self.set(momentum, weight_decay)

    def set(self, momentum: Scalar, weight_decay: Scalar) -> None:
        """This step's momentum and weight decay: one number each, or one per layer."""
        self.momentum = PerLayer(momentum, self.layout, "momentum")
        self.weight_decay = PerLayer(weight_decay, self.layout, "weight_decay")

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        return {"worker_momentum": x.new_zeros(rows, x.numel())}  # m_k, (W, P): each worker's momentum

    def update(self, state, grads: Sequence[Tuple[Tensor, slice]], points: Callable[[], Tensor]) -> Tensor:
        """m_k from ``grads`` -- pairs of a ``(W, n)`` gradient and the stretch of the flat axis it covers --
        and ``points()``, the (W, P) gradient points (read only with weight decay). Returns m, (W, P)."""
        m = state.worker_momentum
        for g, columns in grads:
            part = m[:, columns]
            for within, mu in self.momentum.pieces(columns):
                g_in, m_in = (g, part) if within == slice(None) else (g[:, within], part[:, within])
                if mu:  # m <- g + mu m, one pass
                    torch.add(g_in, m_in, alpha=mu, out=m_in)
                else:  # mu = 0: the momentum buffer is just this step's gradient
                    m_in.copy_(g_in)
        if any(wd for _, wd in self.weight_decay.runs):
            at = points()
            for columns, wd in self.weight_decay.runs:
                if wd:  # layers without weight decay are left alone, as torch.optim.SGD leaves them
                    m[:, columns].add_(at[:, columns], alpha=wd)
        return m
