"""The feedback-rule interface, and the plan that tells a rule where it runs.

A step of every rule has the same skeleton (:class:`saef.core.algorithm.Flight`): the local optimizer
turns gradients into each worker's direction m_k; the rule says what each worker compresses and keeps,
what the server compresses and keeps, and how the parameters move. The transport in between does not
know which rule runs. A rule's methods, in the order a step calls them, by phase of the step::

    begin   points(state, x)              where worker k takes its gradient, (W, P)
            uplink(state, x, m, scale)    what each worker compresses, (W, P)
    serve   settle_worker(state, sent, context)     the worker's state after sending C(uplink)
            serve(state, x, mean, lr)     what the server compresses, from the mean of the workers' payloads
            settle_server(state, served, applied)   the server's state after sending C_s(served)
    finish  apply(state, x, update, lr)   every worker applies what the server sent
    end     end_step(state)               after the step counter moved (e.g. error averaging)

Everything that belongs to one step comes in as an argument: ``context`` is the uplink's
:class:`~saef.compress.Context` of this step (the seed, step and senders a random compressor redraws
from, a stateful one's state); ``lr`` and ``scale`` are :class:`~saef.core.perlayer.PerLayer` (one value,
or one per layer for parameter groups): apply them with their ``add`` and ``multiply``. ``scale`` is the
local optimizer's (lr for momentum SGD, whose server reply is a step of x; 1 for Adam, whose reply is the
new momentum), and so is how x moves by the reply (``plan.optimizer.apply``). The :class:`Plan` holds only
what stays the same from step to step. State is named tensors (:meth:`FeedbackRule.init`); worker-side
tensors have a leading axis of W rows, server-side tensors span all P parameters. A server-side tensor
that only the server updates holds the owned layers (zero elsewhere) where the server is sharded; one that
every worker updates from what the server sends (EF21's g, single-way) is whole on every process.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ...compress import Compressor, Context, Layout, Payload
from ..perlayer import PerLayer

__all__ = ["FeedbackRule", "Plan"]


class Plan:
    """Where a rule runs, the same at every step: the layers, the workers hosted here (W of K), the layers
    whose server work runs here, the two compressors, the local optimizer, and buffers reused every step.
    Nothing of one step is kept here (a step's contexts are the arguments of the rule's methods)."""

    def __init__(self, layout: Layout, transport, uplink: Compressor, downlink: Compressor, optimizer):
        self.layout = layout
        self.transport = transport
        self.optimizer = optimizer  # the local optimizer (saef.core.local): how x moves by the server's reply
        self.uplink, self.downlink = uplink, downlink
        self.num_local, self.num_workers = transport.num_local, transport.num_workers
        self.owned = [i for i in range(len(layout)) if transport.owns(i, len(layout))]
        self.owned_layout = layout if len(self.owned) == len(layout) else layout.subset(self.owned)
        # When the owned layers lie side by side on the flat axis, their part of a tensor is one view.
        self.owned_range = layout.span(self.owned)

    def buffer(self, name: str, like: Tensor) -> Tensor:
        """A tensor shaped like ``like``, allocated once (kept by the layout) and reused every step."""
        key = ("step-buffer", name, tuple(like.shape), like.dtype, like.device)
        return self.layout.memo(key, lambda: torch.empty_like(like))

    def owned_part(self, flat: Tensor) -> Tensor:
        """The owned layers of a ``(P,)`` tensor end to end: a view when they lie side by side, else a copy
        (write changes back with :meth:`put_owned`)."""
        if self.owned_range is not None:
            return flat[self.owned_range]
        return torch.cat([flat[self.layout.slices[i]] for i in self.owned])

    def put_owned(self, flat: Tensor, part: Tensor) -> None:
        """Write ``part`` (from :meth:`owned_part`) back into ``flat``; nothing to do for a view."""
        if self.owned_range is None:
            for i, s in zip(self.owned, self.owned_layout.slices):
                flat[self.layout.slices[i]] = part[s]

    def only_owned(self, flat: Tensor) -> Tensor:
        """``flat`` with every layer not owned here set to zero, in place (server-side state)."""
        for i, s in enumerate(self.layout.slices):
            if i not in self.owned:
                flat[s] = 0
        return flat


class FeedbackRule:
    """Base class of the feedback rules: the methods of the module docstring, with the defaults of a rule
    that keeps nothing (gradient at x, the mean sent back as it is, x <- x - update)."""

    name: str = "rule"
    averages_errors: bool = False  # whether average_every (error averaging) applies
    optimizers = None  # the local optimizers the rule is defined with: a tuple of names, or None for any
    has_diagnostics: bool = False  # whether x~ and the mismatch terms are defined
    local_steps: bool = False  # whether it is defined with local steps (the round's pseudo-gradient as direction)

    def __init__(self, config, plan: Plan):
        self.config = config
        self.plan = plan

    def init(self, x: Tensor) -> Dict[str, Tensor]:
        """The rule's named state for parameters ``x`` (P,), at the start."""
        return {}

    def points(self, state, x: Tensor, columns: slice = slice(None), out: Optional[Tensor] = None) -> Tensor:
        """z_k on the stretch ``columns`` of the flat axis, (W, n), into ``out`` if given (else possibly an
        expanded view of x: no copy)."""
        points = x[columns].unsqueeze(0).expand(self.plan.num_local, -1)
        return points if out is None else out.copy_(points)

    def uplink(self, state, x: Tensor, direction: Tensor, scale: PerLayer) -> Tensor:
        """What each worker compresses, from its direction times ``scale`` (the local optimizer's: lr for
        momentum SGD, 1 for Adam)."""
        raise NotImplementedError

    def settle_worker(self, state, payloads: Sequence[Payload], context: Context) -> None:
        """After the workers' ``payloads`` (C(uplink), made in ``context``) were handed over: nothing to
        keep by default."""

    def serve(self, state, x: Tensor, mean: Tensor, lr: PerLayer) -> Tensor:
        return mean

    def settle_server(self, state, served: Tensor, applied: Tensor) -> None:
        """Nothing to keep by default."""

    def apply(self, state, x: Tensor, update: Tensor, lr: PerLayer) -> None:
        self.plan.optimizer.apply(state, x, update, lr)  # momentum SGD: x <- x - update

    def end_step(self, state) -> None:
        """Nothing by default."""

    def model(self, state, x: Tensor) -> Tensor:
        """The iterate to evaluate: by default the parameters every worker holds."""
        return x

    def compression_error(self, state) -> Tensor:
        """The gap between x and the auxiliary iterate x~ (rules with ``has_diagnostics`` only)."""
        raise ValueError(f"method {self.name!r} defines no auxiliary iterate")
