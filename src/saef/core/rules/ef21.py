"""EF21 (Richtárik et al. 2021), with momentum EF21-SGDM (Fatkhullin et al. 2023), and the EF21-P downlink.

Per layer, worker k, step t, learning rate lr_t; v_k is the local optimizer's direction (momentum SGD:
v_k <- mu v_k + grad f(y; batch_k) + wd y)::

    y     = x (single-way)  |  w (double-way: the model copy the workers hold)
    c_k   = C(v_k - g_k);   g_k <- g_k + c_k;   worker k sends c_k
    g    <- g + mean_k c_k                         (the server; g = mean_k g_k)
    x    <- x - lr_t g
    double-way:  s = C_s(x - w);  w <- w + s;      the server sends s
    start:  v_k = g_k = g = 0,  w = x_0

With mu > 0 this is EF21-SGDM with its eta = 1 - mu and step lr / (1 - mu). With C = C_s = identity it is
exactly momentum SGD (g = mean_k v_k, w = x).

Where it lives: the parameters the algorithm moves in place are what every worker holds -- x single-way,
w double-way. Single-way, every process keeps g whole and applies ``g <- g + mean_k c_k; x <- x - lr g``
itself from the dense mean the server sends back. Double-way, g and the true model x are server state
(the layers owned here; zero elsewhere), and x is what is evaluated. EF21 defines no auxiliary iterate:
its x~ and mismatch terms are left empty.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from ..perlayer import PerLayer
from .base import FeedbackRule

__all__ = ["EF21"]


class EF21(FeedbackRule):
    name = "ef21"
    optimizers = ("sgd",)  # its estimates track momentum SGD's direction and it moves x by lr g itself

    def init(self, x: Tensor) -> Dict[str, Tensor]:
        state = {
            "worker_estimate": x.new_zeros(self.plan.num_local, x.numel()),  # g_k: worker k's running estimate
            "server_estimate": x.new_zeros(x.numel()),  # g = mean_k g_k
        }
        if self.config.double_way:  # the true model x, kept by the server for its layers
            state["server_model"] = self.plan.only_owned(x.detach().clone())
        return state

    def uplink(self, state, x: Tensor, direction: Tensor, scale: PerLayer) -> Tensor:
        return torch.sub(direction, state.worker_estimate, out=self.plan.buffer("ef21-uplink", direction))  # v_k - g_k

    def settle_worker(self, state, payloads, context) -> None:
        uplink = self.plan.uplink
        uplink.add_decoded(payloads, self.plan.layout, state.worker_estimate, **uplink.context_args(context))  # g_k <- g_k + c_k

    def serve(self, state, x: Tensor, mean: Tensor, lr: PerLayer) -> Tensor:
        if not self.config.double_way:  # the dense mean goes back; every worker updates g and x itself
            return mean
        plan = self.plan
        estimate = plan.owned_part(state.server_estimate).add_(mean)  # g <- g + mean_k c_k
        model = lr.subset(plan.owned, plan.owned_layout).add(plan.owned_part(state.server_model), estimate, sign=-1)  # x <- x - lr g
        plan.put_owned(state.server_estimate, estimate)
        plan.put_owned(state.server_model, model)
        held = plan.owned_part(x)  # w, the layers owned here
        return torch.sub(model, held, out=plan.buffer("ef21-downlink", model))  # x - w, compressed to s

    def apply(self, state, x: Tensor, update: Tensor, lr: PerLayer) -> None:
        if self.config.double_way:
            x += update  # w <- w + s
        else:
            state.server_estimate.add_(update)  # g <- g + mean_k c_k
            lr.add(x, state.server_estimate, sign=-1)  # x <- x - lr g

    def model(self, state, x: Tensor) -> Tensor:
        if self.config.double_way:
            return self.plan.transport.server_total(state.server_model)
        return x
