"""Local optimizers: how a worker turns its gradient into the direction the feedback rule compresses, and
how the parameters move by what the server sends back.

A local optimizer keeps named state tensors (per worker, with a leading axis of W rows, or shared, of shape
(P,)) and offers the algorithm (:mod:`saef.core.algorithm`) four things:

    update(state, grads, points)   each worker's direction m_k, (W, P), from its gradient
    scale(lr)                      what the rule multiplies the direction by before it adds its error
    apply(state, x, update, lr)    x moves by what the server sent (in the direction's scaled units)
    shift(state, error, columns)   an error in those units as a shift of the parameters (SAEF's point, x~)

Two are registered: ``sgd`` (momentum SGD, the paper's) and ``adam`` (compressed-momentum Adam, 1-bit Adam's
scheme; with the SAEF rule, SAEF-Adam). :func:`make_optimizer` builds the one a configuration names.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ..compress import Layout
from .perlayer import PerLayer, Scalar

__all__ = ["MomentumSGD", "Adam", "available_optimizers", "make_optimizer", "optimizer_class"]

Grads = Sequence[Tuple[Tensor, slice]]  # pairs of a (W, n) gradient and the stretch of the flat axis it covers


class MomentumSGD:
    """Momentum SGD, as ``torch.optim.SGD`` keeps it: ``m_k <- mu m_k + g_k + wd z_k`` (m_k = g_k + wd z_k
    when mu = 0), where z_k is the point the gradient was taken at. The rule compresses lr m_k (plus its
    error), so what the server sends is a step of the parameters: ``x <- x - update``. mu and wd may differ by
    layer (:meth:`set`; parameter groups)."""

    name = "sgd"
    settings = ("momentum", "weight_decay")  # the per-group hyperparameters (saef.SAEF's param_groups)

    def __init__(self, layout: Layout, config, full_precision_until: float = 0):
        self.layout = layout
        self.set(config.momentum, config.weight_decay)

    def set(self, momentum: Scalar, weight_decay: Scalar) -> None:
        """This step's momentum and weight decay: one number each, or one per layer."""
        self.momentum = PerLayer(momentum, self.layout, "momentum")
        self.weight_decay = PerLayer(weight_decay, self.layout, "weight_decay")

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        return {"worker_momentum": x.new_zeros(rows, x.numel())}  # m_k, (W, P): each worker's momentum

    def update(self, state, grads: Grads, points: Callable[[], Tensor]) -> Tensor:
        """m_k from ``grads`` and ``points()``, the (W, P) gradient points (read only with weight decay).
        Returns m, (W, P)."""
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

    kept_on_reset = ()  # state tensors a reset (reset_errors) carries over

    def check_new_layers(self, state, reset: bool = False) -> None:
        """Layers may start from zero state at any step."""

    def scale(self, lr: PerLayer) -> PerLayer:
        return lr  # the rule compresses lr m_k: a step of the parameters

    def apply(self, state, x: Tensor, update: Tensor, lr: PerLayer) -> None:
        x -= update

    def shift(self, state, error: Tensor, columns: slice = slice(None)) -> Tensor:
        return error[..., columns]  # the error is already in the parameters' units


class Adam:
    """Compressed-momentum Adam without bias correction, with decoupled weight decay (1-bit Adam's scheme).

    Per layer, step t, learning rate lr_t, ``d = sqrt(v) + eps``::

        full precision (t < warmup_steps, or nothing compressed): every worker sends its gradient g_k,
            g = mean_k g_k;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        compressed (v frozen): worker k's direction is m_k = b1 m + (1 - b1) g_k; the rule compresses
            m_k (plus its error) and the server's reply C_s(D) is the new shared momentum: m <- C_s(D)
        then:  x <- x - lr_t (m / d + wd x)

    m and v are shared by all workers (every process holds them whole: they follow from what the server
    sends). An error e in momentum units moves the parameters by ``lr e / d`` (:meth:`shift`, with the lr of
    the last step taken: the point of the next gradient is written before its lr is known, e.g. by
    :class:`saef.SAEF` before a scheduler runs), so SAEF takes its gradient at ``z_k = x - lr e_k / d``.
    """

    name = "adam"
    settings = ("betas", "eps", "weight_decay")

    def __init__(self, layout: Layout, config, full_precision_until: float = 0):
        self.layout = layout
        # The steps that exchange dense gradients and update v: the warm-up, or all of them when nothing
        # is compressed (then this is plain Adam; compressed values cannot carry g^2, so v freezes).
        self.full_precision_until = full_precision_until
        self.unit = PerLayer(1.0, layout, "scale")  # what the rule multiplies the momentum by: nothing
        self.set(config.betas, config.eps, config.weight_decay)

    def set(self, betas, eps: Scalar, weight_decay: Scalar) -> None:
        """This step's (b1, b2), eps and weight decay: one value each, or one per layer."""
        per_layer = not (len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas))
        b1, b2 = zip(*betas) if per_layer else betas
        self.b1 = PerLayer(list(b1) if per_layer else b1, self.layout, "betas[0]")
        self.b2 = PerLayer(list(b2) if per_layer else b2, self.layout, "betas[1]")
        self.eps = PerLayer(eps, self.layout, "eps")
        self.weight_decay = PerLayer(weight_decay, self.layout, "weight_decay")

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        return {
            "momentum": x.new_zeros(x.numel()),  # m: the momentum every worker shares (what the server sent)
            "second_moment": x.new_zeros(x.numel()),  # v: frozen once the values are compressed
            # lr / (sqrt(v) + eps) of the last step: how an error in momentum units moves the parameters
            "step_size": x.new_zeros(x.numel()),
        }

    # A reset keeps v: only full-precision steps update it, and after the warm-up none come.
    kept_on_reset = ("second_moment",)

    def _full_precision(self, state) -> bool:
        return state.step < self.full_precision_until

    def check_new_layers(self, state, reset: bool = False) -> None:
        """Refuse state that starts from v = 0 after the warm-up (new layers; a reset that found no v to
        keep): v would stay 0 there for good, and every step would be lr m / eps."""
        if self._full_precision(state) or (reset and bool(state.second_moment.any())):
            return
        what = "a reset of the errors that has no v to keep" if reset else "new layers"
        raise ValueError(f"optimizer 'adam' cannot start {what} at step {state.step}, after its warm-up of "
                         f"{self.full_precision_until} steps: v is updated only in full precision, so it would stay 0; "
                         f"add them before the warm-up ends, or give warmup_steps above {state.step}")

    def update(self, state, grads: Grads, points: Callable[[], Tensor]) -> Tensor:
        """g_k itself in full precision, else m_k = b1 m + (1 - b1) g_k; (W, P), in a reused buffer."""
        rows = grads[0][0].shape[0]
        m = state.momentum
        out = self.layout.memo(("adam-direction", rows, m.dtype, m.device), lambda: m.new_empty(rows, m.numel()))
        full = self._full_precision(state)
        for g, columns in grads:
            part = out[:, columns]
            if full:
                part.copy_(g)
                continue
            for within, b1 in self.b1.pieces(columns):
                g_in, o_in = (g, part) if within == slice(None) else (g[:, within], part[:, within])
                torch.mul(g_in, 1.0 - b1, out=o_in)
                o_in.add_(m[columns][within].unsqueeze(0), alpha=b1)
        return out

    def scale(self, lr: PerLayer) -> PerLayer:
        return self.unit  # the rule compresses the momentum itself

    def apply(self, state, x: Tensor, update: Tensor, lr: PerLayer) -> None:
        m, v, step = state.momentum, state.second_moment, state.step_size
        if self._full_precision(state):  # update = g, the mean gradient
            for columns, b1 in self.b1.runs:
                m[columns].mul_(b1).add_(update[columns], alpha=1.0 - b1)
            for columns, b2 in self.b2.runs:
                v[columns].mul_(b2).addcmul_(update[columns], update[columns], value=1.0 - b2)
        else:  # update = C_s(D), the new shared momentum
            m.copy_(update)
        torch.sqrt(v, out=step)
        for columns, eps in self.eps.runs:
            step[columns].add_(eps)
        step.reciprocal_()
        for columns, rate in lr.runs:  # step = lr / (sqrt(v) + eps)
            step[columns].mul_(rate)
        for columns, decay in self._decay(lr).runs:
            if decay:  # decoupled: x <- x - lr wd x, from x before the step
                x[columns].mul_(1.0 - decay)
        x.addcmul_(step, m, value=-1.0)

    def _decay(self, lr: PerLayer) -> PerLayer:
        """lr wd, per layer."""
        wd = self.weight_decay
        if lr.uniform and wd.uniform:
            return PerLayer(lr.runs[0][1] * wd.runs[0][1], self.layout, "lr * weight_decay")
        return PerLayer([a * b for a, b in zip(lr.values, wd.values)], self.layout, "lr * weight_decay")

    def shift(self, state, error: Tensor, columns: slice = slice(None)) -> Tensor:
        return error[..., columns] * state.step_size[columns]


_OPTIMIZERS = {"sgd": MomentumSGD, "adam": Adam}


def available_optimizers() -> Tuple[str, ...]:
    return tuple(_OPTIMIZERS)


def optimizer_class(name: str):
    """The local optimizer registered as ``name`` (ValueError naming the choices otherwise)."""
    if name not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got optimizer={name!r}")
    return _OPTIMIZERS[name]


def make_optimizer(config, layout: Layout):
    """The local optimizer of ``config`` over ``layout``: full precision through the warm-up, or for good
    when nothing is compressed."""
    until = math.inf if config.lossless else config.warmup_steps
    return optimizer_class(config.optimizer)(layout, config, until)
