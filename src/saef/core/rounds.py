"""Local steps: each worker takes H inner steps of its own optimizer, then the workers exchange what the
round changed (the pseudo-gradient) once -- DiLoCo and its descendants, with the feedback rules.

One round r (x is the shared model; rounds are the algorithm's steps, so error averaging with period p
happens before round r when (r + 1) % p == 0, as Algorithm 1 counts steps)::

    start_k = x - outer_lr * error_decay * e_k   (saef)  |  x  (ef, direct)    the rule's gradient point
    y_k     = start_k; H steps of the inner optimizer on worker k's batches    (sgd as torch.optim.SGD,
                                                                                adamw as torch.optim.AdamW)
    delta_k = start_k - y_k                                                    what the round changed
    ef, saef: D_k = error_decay e_k + delta_k;  c_k = C(D_k);  e_k = D_k - c_k |  direct: c_k = C(delta_k)
    g = mean_k c_k;  double-way: D = e_s + g;  g = C_s(D);  e_s = D - g         (direct: g = C_s(g), no e_s)
    outer step: u = mu u + g;  d = g + mu u (nesterov) | u;  x = x - outer_lr d  (mu = 0: d = g)

The exchange is an ordinary step of the algorithm (:class:`~saef.core.algorithm.Algorithm`) whose local
optimizer is :class:`OuterOptimizer`: its direction is delta_k, unscaled, and it moves x by the outer step.
The inner optimizers' state (momentum, AdamW's moments and step count) persists across rounds, per worker.
With H = 1, inner SGD without momentum, outer_lr 1 and no outer momentum, every rule is its per-step form
with momentum 0, up to rounding (delta_k = z - (z - lr g) is lr g to within an ulp).
"""

from __future__ import annotations

from typing import Dict, Iterator, Sequence, Tuple

import torch
from torch import Tensor

from ..compress import Layout
from .local import put_adam_settings
from .perlayer import LayerSettings, PerLayer

__all__ = ["InnerSGD", "InnerAdamW", "OuterOptimizer", "INNER_OPTIMIZERS", "inner_optimizer"]

Grads = Sequence[Tuple[Tensor, slice]]


class _Inner:
    """What both inner optimizers share: per-layer settings (read every step, as saef.SAEF sets them from
    its parameter groups), and the walk over the gradient in stretches of equal settings."""

    name = "inner"
    settings: Tuple[str, ...] = ()

    def __init__(self, layout: Layout, config):
        self.layout, self.config = layout, config
        self.hyper = LayerSettings(layout)
        self.set(*(getattr(config, name) for name in self.settings))

    def _stretches(self, y: Tensor, grads: Grads, lr: PerLayer, names: Sequence[str]) -> Iterator[tuple]:
        """``(g, y, values)`` over stretches of the flat axis on which lr and the settings ``names`` are each
        one value: the whole at once when all are uniform, else layer by layer."""
        hyper = [lr, *(self.hyper[name] for name in names)]
        whole = len(grads) == 1 and grads[0][1] == slice(None)
        if whole and all(h.uniform for h in hyper):
            yield grads[0][0], y, [h.runs[0][1] for h in hyper]
            return
        pairs = ([(grads[0][0][:, s], s) for s in self.layout.slices] if whole else grads)
        for i, (g, columns) in enumerate(pairs):
            yield g, y[:, columns], [h.values[i] for h in hyper]


class InnerSGD(_Inner):
    """torch.optim.SGD, batched over the W workers: ``d = g + wd y``; with momentum ``b = mu b + d`` (b = d at
    the first step, which the zero start gives), ``d = b``; ``y = y - lr d``."""

    name = "sgd"
    settings = ("momentum", "weight_decay")

    def set(self, momentum, weight_decay) -> None:
        self.hyper.put("momentum", momentum)
        self.hyper.put("weight_decay", weight_decay)

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        return {"inner_momentum": x.new_zeros(rows, x.numel())}

    def step(self, state, y: Tensor, grads: Grads, lr: PerLayer, count: int) -> None:
        buffers = state.inner_momentum
        offset = 0
        for g, part, (rate, mu, wd) in self._stretches(y, grads, lr, ("momentum", "weight_decay")):
            d = g.add(part, alpha=wd) if wd else g
            if mu:
                b = buffers[:, offset:offset + part.shape[1]]
                b.mul_(mu).add_(d)
                d = b
            part.add_(d, alpha=-rate)
            offset += part.shape[1]


class InnerAdamW(_Inner):
    """torch.optim.AdamW, batched over the W workers (step t counts every inner step taken)::

        y = y (1 - lr wd);  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
        y = y - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    name = "adamw"
    settings = ("betas", "eps", "weight_decay")

    def set(self, betas, eps, weight_decay) -> None:
        put_adam_settings(self.hyper, self.layout, betas, eps, weight_decay)

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        return {"inner_exp_avg": x.new_zeros(rows, x.numel()), "inner_exp_avg_sq": x.new_zeros(rows, x.numel())}

    def step(self, state, y: Tensor, grads: Grads, lr: PerLayer, count: int) -> None:
        m_all, v_all = state.inner_exp_avg, state.inner_exp_avg_sq
        offset = 0
        for g, part, (rate, b1, b2, eps, wd) in self._stretches(y, grads, lr, ("b1", "b2", "eps", "weight_decay")):
            columns = slice(offset, offset + part.shape[1])
            m, v = m_all[:, columns], v_all[:, columns]
            part.mul_(1 - rate * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            correction1, correction2 = 1 - b1 ** count, 1 - b2 ** count
            denominator = (v.sqrt() / correction2 ** 0.5).add_(eps)
            part.addcdiv_(m, denominator, value=-rate / correction1)
            offset += part.shape[1]


INNER_OPTIMIZERS = {cls.name: cls for cls in (InnerSGD, InnerAdamW)}


def inner_optimizer(config, layout: Layout) -> _Inner:
    """The inner optimizer ``config.inner_optimizer`` over ``layout``."""
    return INNER_OPTIMIZERS[config.inner_optimizer](layout, config)


class OuterOptimizer:
    """The local optimizer of the exchange at the end of a round (:class:`~saef.core.local.LocalOptimizer`):
    the direction is the pseudo-gradient delta_k as it is (``scale`` 1), and x moves by the outer step with
    outer_lr and (Nesterov) momentum, as torch.optim.SGD over the shared model. An error e_k is a
    displacement of the parameters that the outer step scales by outer_lr: :meth:`shift` is outer_lr e.
    Its :attr:`settings` are the inner optimizer's (set through it), which saef.SAEF reads per group."""

    name = "outer"
    kept_on_reset = ()

    def __init__(self, layout: Layout, config, full_precision_until: float = 0, inner=None):
        self.layout, self.config = layout, config
        self.inner = inner if inner is not None else inner_optimizer(config, layout)
        self.settings = self.inner.settings
        self.unit = PerLayer(1.0, layout, "scale")
        self.outer_lr = config.outer_lr

    def set(self, *values) -> None:
        self.inner.set(*values)

    def part(self, layers, layout):  # pragma: no cover - refused where it would be reached (no overlap)
        raise ValueError("local steps run whole steps: they cannot be cut into buckets (no --overlap)")

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        return {"outer_momentum": x.new_zeros(x.numel()), **self.inner.init(x, rows)}

    def update(self, state, grads: Grads, points) -> Tensor:
        (delta, columns), = grads  # (the round's delta_k, (W, P), made whole by the algorithm)
        return delta

    def scale(self, lr: PerLayer) -> PerLayer:
        return self.unit

    def apply(self, state, x: Tensor, update: Tensor, lr: PerLayer) -> None:
        mu = self.config.outer_momentum
        if not mu:
            lr.add(x, update, sign=-1.0)
            return
        u = state.outer_momentum
        u.mul_(mu).add_(update)
        lr.add(x, update.add(u, alpha=mu) if self.config.nesterov else u, sign=-1.0)

    def shift(self, state, error: Tensor, columns: slice = slice(None)) -> Tensor:
        return error[..., columns] * self.outer_lr

    def check_new_layers(self, state, reset: bool = False) -> None:
        """Layers may start from zero state at any round."""
