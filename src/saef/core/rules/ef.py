"""Local error feedback (EF) and step-ahead error feedback (SAEF): Algorithm 1 of the paper.

Per layer, worker k, step t, learning rate lr_t; m_k is the local optimizer's direction
(momentum SGD: m_k <- mu m_k + grad f(z_k; batch_k) + wd z_k); b is ``error_decay`` (1: Algorithm 1)::

    z_k   = x - b e_k  (SAEF)    |   z_k = x  (EF)          point where worker k takes its gradient
    D_k   = b e_k + lr_t m_k
    e_k  <- D_k - C(D_k);         worker k sends C(D_k)
    D     = e_s + mean_k C(D_k);  e_s <- D - C_s(D);   x <- x - C_s(D)
    if (t + 2) % p == 0:  e_k <- mean_j e_j               (error averaging for step t + 1)

Single-way compression is the case C_s = identity (then e_s stays exactly 0). Error averaging "at the
start of step t when (t + 1) % p == 0" is done at the end of step t - 1, so the state is always ready for
the next gradient; at t = 0 the errors are zero and averaging is a no-op. With C = identity both rules are
exactly distributed momentum SGD.

Diagnostics: the auxiliary iterate x~ = x - (e_s + mean_k e_k) and the mismatch terms built from it.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from ..perlayer import PerLayer
from .base import FeedbackRule

__all__ = ["LocalErrorFeedback", "StepAheadErrorFeedback"]


class LocalErrorFeedback(FeedbackRule):
    """EF: the gradient at x; the worker error e_k and server error e_s fed back into the next step."""

    name = "ef"
    averages_errors = True
    has_diagnostics = True
    local_steps = True  # defined with local steps (saef.core.rounds): the pseudo-gradient is its direction

    def init(self, x: Tensor) -> Dict[str, Tensor]:
        return {
            "worker_error": x.new_zeros(self.plan.num_local, x.numel()),  # e_k: what C left out, fed back next step
            "server_error": x.new_zeros(x.numel()),  # e_s: what C_s left out (owned layers; else 0)
        }

    def uplink(self, state, x: Tensor, direction: Tensor, scale: PerLayer) -> Tensor:
        # e_k is overwritten in place: first with D_k, then with D_k - C(D_k) (no new (W, P) buffers).
        if self.config.error_decay != 1.0:  # (SparseLoCo's decayed error: D_k = b e_k + ...)
            state.worker_error.mul_(self.config.error_decay)
        return scale.add(state.worker_error, direction)  # D_k = e_k + lr m_k (Adam: e_k + m_k; local steps: + delta_k)

    def settle_worker(self, state, payloads, context) -> None:
        uplink = self.plan.uplink
        uplink.subtract_decoded(payloads, self.plan.layout, state.worker_error, **uplink.context_args(context))  # e_k <- D_k - C(D_k)

    def serve(self, state, x: Tensor, mean: Tensor, lr: PerLayer) -> Tensor:
        return self.plan.owned_part(state.server_error).add_(mean)  # D = e_s + mean_k C(D_k)

    def settle_server(self, state, served: Tensor, applied: Tensor) -> None:
        served.sub_(applied)  # e_s <- D - C_s(D)
        self.plan.put_owned(state.server_error, served)

    def end_step(self, state) -> None:
        p = self.config.average_every
        if p is not None and (state.step + 1) % p == 0:
            error = state.worker_error
            error.copy_(self.plan.transport.mean_over_workers(error).unsqueeze(0).expand_as(error))

    def compression_error(self, state) -> Tensor:
        """e_s + mean_k e_k, (P,): the gap between x and x~."""
        transport = self.plan.transport
        mean_error = transport.mean_over_workers(state.worker_error, purpose="diagnostics")
        return self.plan.optimizer.shift(state, transport.server_total(state.server_error) + mean_error)


class StepAheadErrorFeedback(LocalErrorFeedback):
    """SAEF: as EF, with each worker's gradient taken at x - e_k, a step ahead."""

    name = "saef"

    def points(self, state, x: Tensor, columns: slice = slice(None), out: Optional[Tensor] = None) -> Tensor:
        shift = self.plan.optimizer.shift(state, state.worker_error, columns)  # e_k (Adam: lr e_k / (sqrt(v) + eps))
        if self.config.error_decay != 1.0:  # where the decayed error b e_k will move x
            shift = shift * self.config.error_decay
        return torch.sub(x[columns].unsqueeze(0), shift, out=out)
