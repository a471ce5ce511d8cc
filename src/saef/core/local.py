"""Local optimizers: how a worker turns its gradient into the direction the feedback rule compresses, and
how the parameters move by what the server sends back.

A local optimizer keeps named state tensors (per worker, with a leading axis of W rows, or shared, of shape
(P,)) and per-layer hyperparameters (a :class:`~saef.core.perlayer.LayerSettings`); what the algorithm
(:mod:`saef.core.algorithm`) and the rules call is declared by :class:`LocalOptimizer`, chiefly::

    update(state, grads, points)   each worker's direction m_k, (W, P), from its gradient
    scale(lr)                      what the rule multiplies the direction by before it adds its error
    apply(state, x, update, lr)    x moves by what the server sent (in the direction's scaled units)
    shift(state, error, columns)   an error in those units as a shift of the parameters (SAEF's point, x~)

Two are registered (:func:`register_optimizer`, :func:`optimizer_class`): ``sgd`` (momentum SGD, the
paper's) and ``adam`` (compressed-momentum Adam, 1-bit Adam's scheme; with the SAEF rule, SAEF-Adam).
:func:`make_optimizer` builds the one a configuration names.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Dict, Optional, Protocol, Sequence, Tuple, Type, runtime_checkable

import torch
from torch import Tensor

from ..compress import Layout
from .perlayer import LayerSettings, PerLayer, Scalar

__all__ = ["LocalOptimizer", "MomentumSGD", "Adam", "register_optimizer", "available_optimizers", "make_optimizer",
           "optimizer_class"]

Grads = Sequence[Tuple[Tensor, slice]]  # pairs of a (W, n) gradient and the stretch of the flat axis it covers


@runtime_checkable
class LocalOptimizer(Protocol):
    """What a local optimizer offers the algorithm and the rules. A class registered with
    :func:`register_optimizer` is built as ``cls(layout, config, full_precision_until)``: the layers, the
    :class:`~saef.core.AlgorithmConfig` (its settings are the starting values), and the steps before
    which it runs in full precision (the warm-up; infinity when nothing is compressed)."""

    name: ClassVar[str]  # the name a configuration uses (``optimizer="sgd"``)
    settings: ClassVar[Tuple[str, ...]]  # the per-group hyperparameters, in the order :meth:`set` takes them
    kept_on_reset: ClassVar[Tuple[str, ...]]  # state tensors a reset of the errors carries over
    layout: Layout  # the layers it steps

    def init(self, x: Tensor, rows: int) -> Dict[str, Tensor]:
        """The named state at the start, for parameters ``x`` (P,) and ``rows`` (W) local workers."""

    def set(self, *values) -> None:
        """This step's hyperparameters, in the order of :attr:`settings`: one value each, or one per layer.
        Parts made by :meth:`part` read them from here."""

    def part(self, layers: Sequence[int], layout: Layout) -> "LocalOptimizer":
        """The optimizer of the consecutive ``layers`` (over ``layout``, their sub-layout): the same
        arithmetic, its hyperparameters read from this one at every step (a later :meth:`set` reaches it)."""

    def update(self, state, grads: Grads, points: Callable[[], Tensor]) -> Tensor:
        """Each worker's direction m_k, (W, P), from ``grads`` and ``points()``, the (W, P) gradient points
        (called only when needed, e.g. for weight decay)."""

    def scale(self, lr: PerLayer) -> PerLayer:
        """What the rule multiplies the direction by before it adds its error (lr for momentum SGD)."""

    def apply(self, state, x: Tensor, update: Tensor, lr: PerLayer) -> None:
        """Move ``x`` in place by what the server sent, ``update`` (in the direction's scaled units)."""

    def shift(self, state, error: Tensor, columns: slice = slice(None)) -> Tensor:
        """``error`` (in the direction's scaled units) on the stretch ``columns``, as a shift of the
        parameters (SAEF's gradient point, x~)."""

    def check_new_layers(self, state, reset: bool = False) -> None:
        """Raise ValueError where the state cannot start from zero at its step (new layers, or a reset of
        the errors with ``reset``)."""


class _LayerSettingsMixin:
    """What both built-in optimizers share: their hyperparameters in a :class:`LayerSettings`, and parts
    that read them from the whole's."""

    settings: Tuple[str, ...] = ()

    def __init__(self, layout: Layout, config, full_precision_until: float = 0,
                 settings: Optional[LayerSettings] = None):
        self.layout, self.config = layout, config
        # The steps that exchange dense values (the warm-up, or all of them when nothing is compressed).
        self.full_precision_until = full_precision_until
        self.hyper = LayerSettings(layout) if settings is None else settings
        if settings is None:
            self.set(*(getattr(config, name) for name in self.settings))

    def part(self, layers: Sequence[int], layout: Layout):
        return type(self)(layout, self.config, self.full_precision_until, self.hyper.view(layers, layout))


class MomentumSGD(_LayerSettingsMixin):
    """Momentum SGD, as ``torch.optim.SGD`` keeps it: ``m_k <- mu m_k + g_k + wd z_k`` (m_k = g_k + wd z_k
    when mu = 0), where z_k is the point the gradient was taken at. The rule compresses lr m_k (plus its
    error), so what the server sends is a step of the parameters: ``x <- x - update``. mu and wd may differ by
    layer (:meth:`set`; parameter groups)."""

    name = "sgd"
    settings = ("momentum", "weight_decay")  # the per-group hyperparameters (saef.SAEF's param_groups)

    def set(self, momentum: Scalar, weight_decay: Scalar) -> None:
        """This step's momentum and weight decay: one number each, or one per layer."""
        self.hyper.put("momentum", momentum)
        self.hyper.put("weight_decay", weight_decay)

    momentum = property(lambda self: self.hyper["momentum"], doc="mu, per layer")
    weight_decay = property(lambda self: self.hyper["weight_decay"], doc="wd, per layer")

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


class Adam(_LayerSettingsMixin):
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

    def __init__(self, layout: Layout, config, full_precision_until: float = 0,
                 settings: Optional[LayerSettings] = None):
        # full_precision_until: the steps that exchange dense gradients and update v -- the warm-up, or all
        # of them when nothing is compressed (then this is plain Adam; compressed values cannot carry g^2,
        # so v freezes).
        self.unit = PerLayer(1.0, layout, "scale")  # what the rule multiplies the momentum by: nothing
        super().__init__(layout, config, full_precision_until, settings)

    def set(self, betas, eps: Scalar, weight_decay: Scalar) -> None:
        """This step's (b1, b2), eps and weight decay: one value each, or one per layer."""
        put_adam_settings(self.hyper, self.layout, betas, eps, weight_decay)

    b1 = property(lambda self: self.hyper["b1"], doc="beta_1, per layer")
    b2 = property(lambda self: self.hyper["b2"], doc="beta_2, per layer")
    eps = property(lambda self: self.hyper["eps"], doc="eps, per layer")
    weight_decay = property(lambda self: self.hyper["weight_decay"], doc="decoupled weight decay, per layer")

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


def put_adam_settings(hyper: LayerSettings, layout: Layout, betas, eps: Scalar, weight_decay: Scalar) -> None:
    """Adam's (and AdamW's) settings into ``hyper`` as b1, b2, eps, weight_decay: ``betas`` is one (b1, b2)
    or one pair per layer; eps and weight decay one value each or one per layer."""
    per_layer = not (len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas))
    b1, b2 = zip(*betas) if per_layer else betas
    hyper.put("b1", PerLayer(list(b1) if per_layer else b1, layout, "betas[0]"))
    hyper.put("b2", PerLayer(list(b2) if per_layer else b2, layout, "betas[1]"))
    hyper.put("eps", eps)
    hyper.put("weight_decay", weight_decay)


_OPTIMIZERS: Dict[str, Type[LocalOptimizer]] = {}


def register_optimizer(optimizer: Type[LocalOptimizer], *, overwrite: bool = False) -> None:
    """Make ``optimizer`` (a class with every member of :class:`LocalOptimizer`) available under its
    ``name`` (``AlgorithmConfig(optimizer=...)``)."""
    missing = [member for member in _members() if not hasattr(optimizer, member) and member != "layout"]
    if not isinstance(optimizer, type) or missing:
        raise ValueError(f"a local optimizer must be a class with every member of LocalOptimizer, got {optimizer!r}"
                         + (f" (missing {', '.join(missing)})" if missing else ""))
    if optimizer.name in _OPTIMIZERS and not overwrite:
        raise ValueError(f"local optimizer {optimizer.name!r} is already registered (pass overwrite=True to replace it)")
    _OPTIMIZERS[optimizer.name] = optimizer


def _members() -> Tuple[str, ...]:
    """The members :class:`LocalOptimizer` declares (attributes and methods)."""
    declared = set(LocalOptimizer.__annotations__) | {name for name, value in vars(LocalOptimizer).items()
                                                      if callable(value) and not name.startswith("_")}
    return tuple(sorted(declared))


def available_optimizers() -> Tuple[str, ...]:
    return tuple(_OPTIMIZERS)


def optimizer_class(name: str) -> Type[LocalOptimizer]:
    """The local optimizer registered as ``name`` (ValueError naming the choices otherwise)."""
    if name not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got optimizer={name!r}")
    return _OPTIMIZERS[name]


def make_optimizer(config, layout: Layout) -> LocalOptimizer:
    """The local optimizer of ``config`` over ``layout``: full precision through the warm-up, or for good
    when nothing is compressed."""
    until = math.inf if config.lossless else config.warmup_steps
    return optimizer_class(config.optimizer)(layout, config, until)


for _optimizer in (MomentumSGD, Adam):
    register_optimizer(_optimizer)
