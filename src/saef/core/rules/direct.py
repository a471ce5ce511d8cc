"""Compressed SGD without feedback ("direct"): the baseline for unbiased compressors.

Algorithm 1 with the errors dropped. Per layer, worker k, step t; m_k is the local optimizer's direction
(momentum SGD: m_k <- mu m_k + grad f(x; batch_k) + wd x)::

    worker k sends C(lr_t m_k)
    D = mean_k C(lr_t m_k);   x <- x - C_s(D)  (double-way)  |  x - D  (single-way)

With C = C_s = identity it is exactly momentum SGD. Nothing is fed back, so there is no auxiliary iterate.
"""

from __future__ import annotations

from torch import Tensor

from ..perlayer import PerLayer
from .base import FeedbackRule

__all__ = ["Direct"]


class Direct(FeedbackRule):
    name = "direct"
    local_steps = True  # defined with local steps (saef.core.rounds): C(delta_k), DiLoCo's exchange

    def uplink(self, state, x: Tensor, direction: Tensor, scale: PerLayer) -> Tensor:
        return scale.multiply(direction, out=self.plan.buffer("direct-uplink", direction))  # lr m_k (Adam: m_k)
