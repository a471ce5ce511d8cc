"""The step of every feedback rule, written once: local optimizer, compression, transport, rule.

It works on flat tensors: the parameters ``x`` of shape ``(P,)`` (all layers concatenated) and per-worker
state of shape ``(W, P)``, where W is the number of workers whose state lives in this process (all K in the
simulator, one on a real rank). Compression is layer-wise: each layer is a slice ``[offset, offset + d)``
of the flat axis. What each worker and the server keep is the feedback rule's (:mod:`saef.core.rules`);
the direction a worker compresses comes from the local optimizer (:mod:`saef.core.local`); communication
goes through a :class:`~saef.core.transport.Transport`. One step, as the phases of a :class:`Flight`::

    begin   m_k  <- local optimizer (gradient at the rule's point z_k)
            u_k   = rule.uplink(m_k)         worker k hands C(u_k) to the uplink (transport.begin_uplink)
    serve   rule.settle_worker(C(u_k))       the worker's state, while the payloads travel
            mean  = mean_k C(u_k)            (the transport: at the owner of each layer)
            s     = rule.serve(mean)         the server hands C_s(s) to the downlink (transport.begin_downlink)
            rule.settle_server(C_s(s))       the server's state
    finish  rule.apply(C_s(s))               every worker applies what the server sent
    end     step counter + 1; rule.end_step  (error averaging, over all layers: Algorithm.end_step)

:meth:`Algorithm.step` runs them one after the other. Every phase but the end is layer-wise, so the
flights of the parts of a partition of the layers (:meth:`Algorithm.part`), followed by one end of
the whole, are the whole's step bit for bit: what an overlapped step (:mod:`saef.core.overlap`) relies on.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from ..compress import SERVER, Context, Identity, Layout
from .config import AlgorithmConfig, check_lr
from .local import LocalOptimizer, make_optimizer
from .perlayer import PerLayer, Scalar
from .rounds import OuterOptimizer
from .rules import Plan, rule_class
from .transport import Pending, Transport

__all__ = ["AlgorithmState", "Algorithm", "Flight"]


class AlgorithmState:
    """Everything the algorithm remembers between steps (all of it goes into checkpoints): the step
    counter t and named tensors -- the local optimizer's (``worker_momentum``) and the rule's (e.g.
    ``worker_error``, ``server_error``), each readable as an attribute."""

    def __init__(self, step: int, tensors: Dict[str, Tensor], round_position: int = 0, inner_steps: int = 0):
        self.step = step  # t: steps taken so far (with local steps: rounds, exchanges); decides when errors are averaged
        self.tensors = tensors
        self.round_position = round_position  # local steps: inner steps taken in the current round (0 .. H - 1)
        self.inner_steps = inner_steps  # local steps: inner steps taken since the inner optimizer's state began

    def __getattr__(self, name: str) -> Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(f"the algorithm's state has no {name!r} (it holds {', '.join(tensors) or 'no tensors'})")

    def state_dict(self) -> Dict[str, object]:
        """Copies of every field (safe to keep while training goes on)."""
        return {"step": self.step, "tensors": {name: t.clone() for name, t in self.tensors.items()},
                "round_position": self.round_position, "inner_steps": self.inner_steps}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        saved = state.get("tensors") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or set(saved) != set(self.tensors):
            names = sorted(saved) if isinstance(saved, dict) else None
            raise ValueError(f"the saved state holds {names}, expected {sorted(self.tensors)} (another method?)")
        for name, own in self.tensors.items():
            new = saved[name]
            if not isinstance(new, Tensor) or tuple(new.shape) != tuple(own.shape):
                raise ValueError(f"{name} in the state has shape {tuple(getattr(new, 'shape', ()))}, expected "
                                 f"{tuple(own.shape)} (different model or number of workers?)")
        for name, own in self.tensors.items():
            own.copy_(saved[name])
        self.step = int(state["step"])
        self.round_position, self.inner_steps = int(state.get("round_position", 0)), int(state.get("inner_steps", 0))


class Algorithm:
    """The algorithm over a fixed list of layer shapes and a transport.

    Example (one simulated step of 2 workers on a 3-element parameter)::

        >>> ef = Algorithm([(3,)], AlgorithmConfig(method="saef", compressor="sign"),
        ...                    InProcessTransport(2))
        >>> x = torch.zeros(3); state = ef.init_state(x)
        >>> z = ef.gradient_points(state, x)            # (2, 3): where each worker takes its gradient
        >>> ef.step(state, x, grads=torch.ones(2, 3), lr=0.1)
    """

    def __init__(self, shapes: Sequence[Sequence[int]], config: AlgorithmConfig, transport: Transport,
                 ids: Optional[Sequence[int]] = None, optimizer: Optional[LocalOptimizer] = None):
        self.config = config
        self.transport = transport
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        # ids: each layer's index in the whole model (a part of it keeps them: random draws derive from them)
        self.layout = Layout([math.prod(s) for s in self.shapes], self.shapes, ids)
        self.sizes, self.offsets, self.num_params = self.layout.sizes, self.layout.offsets, self.layout.total
        self.uplink, self.downlink = config.compressor, config.downlink_compressor
        # The local optimizer: the config's, or (a part's) one that reads its settings from the whole's. With
        # local steps, the outer step of the exchange that ends each round (over the inner optimizer's steps).
        if optimizer is None:
            optimizer = OuterOptimizer(self.layout, config) if config.local_steps else make_optimizer(config, self.layout)
        self.optimizer = optimizer
        self.local_steps = config.local_steps  # H inner steps per exchange, or None: every step exchanges
        self.plan = Plan(self.layout, transport, self.uplink, self.downlink, self.optimizer)
        self.rule = rule_class(config.method)(config, self.plan)
        # The full-precision warm-up: the same rule over identity compressors both ways (its errors stay
        # exactly zero), for the first config.warmup_steps steps.
        self.warmup_rule = rule_class(config.method)(config, Plan(self.layout, transport, Identity(), Identity(), self.optimizer)) \
            if config.warmup_steps else None
        # Where each layer's compressor state lies (PowerSGD's Q), by layer id; empty for stateless ones.
        self.state_slices = {name: dict(zip(self.layout.ids, Layout(c.state_sizes(self.layout)).slices))
                             for name, c in (("uplink", self.uplink), ("downlink", self.downlink))}
        # x~ and the mismatch terms: defined by the rule, and trivial (zero) when nothing is compressed.
        self.has_diagnostics = self.rule.has_diagnostics and not config.lossless
        if config.average_every == 1 and transport.num_workers == 1:
            warnings.warn("average_every=1 with a single worker does nothing", stacklevel=2)

    def layer(self, i: int) -> slice:
        return self.layout.slices[i]

    def init_state(self, x: Tensor) -> AlgorithmState:
        """The state at the start (zero momentum, errors, estimates) for ``x`` (P,) and this process's W workers."""
        self._check_flat(x, "x")
        state = AlgorithmState(0, {**self.optimizer.init(x, self.transport.num_local), **self.rule.init(x)})
        if self.local_steps:  # each worker's iterate, at the first round's start (x: the errors are zero)
            state.tensors["local_iterate"] = x.unsqueeze(0).repeat(self.transport.num_local, 1)
        for name, compressor, senders in (("uplink", self.uplink, self.transport.worker_ids), ("downlink", self.downlink, (SERVER,))):
            size = sum(c.stop - c.start for c in self.state_slices[name].values())
            if size:  # the compressor's own state per sender, seeded from the run (step -1: before the first)
                rows = x.new_zeros(len(senders), size)
                compressor.init_state(self.layout, Context(self.config.seed, -1, senders, rows, self.state_slices[name]))
                state.tensors[f"{name}_state"] = rows if name == "uplink" else rows[0]
        return state

    def fresh_state(self, x: Tensor, saved: Dict[str, object]) -> AlgorithmState:
        """The state of a reset (``reset_errors``): as at a start, at the saved step, with the tensors the
        local optimizer carries over through a reset taken from ``saved`` (a state dict) where it holds them
        with the same shape (Adam's v, which only full-precision steps update)."""
        state = self.init_state(x)
        state.step = int(saved["step"])
        tensors = saved.get("tensors", {})
        for name in self.optimizer.kept_on_reset:
            old = tensors.get(name)
            if isinstance(old, Tensor) and old.shape == state.tensors[name].shape:
                state.tensors[name].copy_(old)
        self.optimizer.check_new_layers(state, reset=True)
        return state

    def layer_columns(self, name: str, i: int) -> slice:
        """Where layer i lies on the last axis of the state tensor ``name`` (or of x): the flat parameter
        axis, except for a compressor's own state (``uplink_state``, ``downlink_state``), which has its own."""
        direction = name[: -len("_state")]
        if direction in self.state_slices and name.endswith("_state"):
            return self.state_slices[direction][self.layout.ids[i]]
        return self.layout.slices[i]

    def contexts(self, state: AlgorithmState):
        """The uplink's and the downlink's :class:`~saef.compress.Context` of this step."""
        seed, t, tensors = self.config.seed, state.step, state.tensors
        server = tensors.get("downlink_state")
        return (Context(seed, t, self.transport.worker_ids, tensors.get("uplink_state"), self.state_slices["uplink"]),
                Context(seed, t, (SERVER,), None if server is None else server.unsqueeze(0), self.state_slices["downlink"]))

    def in_warmup(self, state: AlgorithmState) -> bool:
        """Whether the next step is one of the full-precision warm-up."""
        return state.step < self.config.warmup_steps

    def _check_flat(self, x: Tensor, name: str) -> None:
        if x.dim() != 1 or x.shape[0] != self.num_params:
            raise ValueError(f"{name} must be a flat tensor of {self.num_params} elements, got shape {tuple(x.shape)}")

    # --- where the gradients are taken -------------------------------------------------------------
    def gradient_points(self, state: AlgorithmState, x: Tensor) -> Tensor:
        """z_k, (W, P): e.g. x - e_k for SAEF, x (an expanded view, no copy) for EF; with local steps each
        worker's own iterate y_k."""
        if self.local_steps:
            return state.local_iterate
        return self.rule.points(state, x)

    @torch.no_grad()
    def write_gradient_points(self, state: AlgorithmState, x: Tensor, targets: Sequence[Tensor]) -> None:
        """Write z_k of layer i into ``targets[i]`` (W d_i elements each, e.g. a model's parameters when
        W = 1): the same values as :meth:`gradient_points`, in one pass and without a (W, P) temporary."""
        w = self.transport.num_local
        for target, s in zip(self._check_layers(targets, "targets"), self.layout.slices):
            if self.local_steps:
                target.copy_(state.local_iterate[:, s].reshape(target.shape))
            elif target.is_contiguous():
                self.rule.points(state, x, s, out=target.view(w, -1))
            else:  # (e.g. a channels-last parameter) no flat view to write into
                target.copy_(self.rule.points(state, x, s).reshape(target.shape))

    def _check_layers(self, tensors: Sequence[Tensor], name: str) -> Sequence[Tensor]:
        w = self.transport.num_local
        if len(tensors) != len(self.sizes) or any(t.numel() != w * d for t, d in zip(tensors, self.sizes)):
            got = [tuple(t.shape) for t in tensors]
            raise ValueError(f"{name} must be one tensor per layer with {w} x (layer size) elements, "
                             f"layer sizes {self.sizes}, got shapes {got}")
        return tensors

    # --- one step ---------------------------------------------------------------------------------
    def step(self, state: AlgorithmState, x: Tensor, grads: Union[Tensor, Sequence[Tensor]], lr: Scalar) -> None:
        """Apply one step in place to ``x`` and ``state``: its phases (:class:`Flight`) one after the other.

        Args:
            x: the parameters every worker holds, (P,), updated in place.
            grads: grad f(z_k; batch_k) for the W local workers, taken at :meth:`gradient_points` of the
                current state: one (W, P) tensor, or one tensor per layer with W d_i elements (e.g. the
                ``.grad`` of a model's parameters when W = 1; no flat copy is made then).
            lr: the learning rate of this step (>= 0): one number, or one per layer (parameter groups).
        """
        if self.local_steps:
            self._inner_step(state, x, grads, lr)
            return
        self._exchange(state, x, grads, lr)

    def _exchange(self, state: AlgorithmState, x: Tensor, grads, lr: Scalar) -> None:
        flight = self.begin(state, x, grads, lr)
        flight.serve()
        flight.finish()
        self.end_step(state)

    def _inner_step(self, state: AlgorithmState, x: Tensor, grads, lr: Scalar) -> None:
        """Local steps (:mod:`saef.core.rounds`): one inner step of every worker's own optimizer on its
        iterate y_k; the H-th of a round exchanges delta_k = start_k - y_k, and y_k starts the next round
        at its new start_k."""
        lr = self.per_layer(lr, "lr")
        for _, value in lr.runs:
            check_lr(value)
        pairs = self._gradient_pairs(grads)
        y = state.local_iterate
        state.inner_steps += 1
        self.optimizer.inner.step(state, y, pairs, lr, state.inner_steps)
        state.round_position += 1
        if state.round_position < self.local_steps:
            return
        delta = self.plan.buffer("round-delta", y)
        torch.sub(self.rule_for(state).points(state, x), y, out=delta)  # delta_k = start_k - y_k
        self._exchange(state, x, delta, self.config.outer_lr)
        self.start_round(state, x)

    def start_round(self, state: AlgorithmState, x: Tensor) -> None:
        """Local steps: a round begins, each worker's iterate y_k at its start_k (the rule's point)."""
        state.round_position = 0
        self.rule_for(state).points(state, x, out=state.local_iterate)

    def begin(self, state: AlgorithmState, x: Tensor, grads: Union[Tensor, Sequence[Tensor]], lr: Scalar) -> "Flight":
        """The first phase of a step (arguments as for :meth:`step`): each worker's direction, what it
        compresses, and its payloads handed to the uplink. Returns the step in flight, whose
        :meth:`Flight.serve` and :meth:`Flight.finish` run the rest of it but :meth:`end_step`."""
        lr = self.per_layer(lr, "lr")
        for _, value in lr.runs:  # (one run per distinct stretch: no pass over every layer)
            check_lr(value)
        return Flight(self, state, x, self._gradient_pairs(grads), lr)

    def rule_for(self, state: AlgorithmState):
        """The rule of the step the state is at: the warm-up's (identity compressors) or the configured one."""
        return self.warmup_rule if self.in_warmup(state) else self.rule

    def end_step(self, state: AlgorithmState) -> None:
        """After every layer's step has finished (the flights of all parts, for an overlapped step): the
        step counter moves, then the rule's end of step (error averaging), over all layers at once."""
        rule = self.rule_for(state)  # the rule the step ran with (decided before the counter moves)
        state.step += 1
        rule.end_step(state)

    # --- parts: consecutive layers stepped on their own (the buckets of an overlapped step) --------------
    def part(self, layers: range) -> "Algorithm":
        """The algorithm over the consecutive ``layers`` of this one, with their ids, the transport's part
        for them (:meth:`Transport.part`) and the local optimizer's part (:meth:`LocalOptimizer.part`),
        which reads its per-layer settings from this one's at every step. Every phase of a step but its end
        is layer-wise, so the flights of the parts of a partition, followed by :meth:`end_step` of the
        whole, are the whole's step, bit for bit."""
        layers = list(layers)
        if self.local_steps:
            raise ValueError("local steps exchange once a round, whole: their steps cannot be cut into parts (buckets)")
        if not layers or layers != list(range(layers[0], layers[-1] + 1)) or layers[-1] >= len(self.shapes):
            raise ValueError(f"a part is a non-empty range of consecutive layers of 0 .. {len(self.shapes) - 1}, got {layers}")
        return Algorithm([self.shapes[i] for i in layers], self.config, self.transport.part(layers),
                         ids=[self.layout.ids[i] for i in layers],
                         optimizer=self.optimizer.part(layers, self.layout.subset(layers)))

    def part_state(self, state: AlgorithmState, layers: range) -> AlgorithmState:
        """The state of :meth:`part` ``(layers)``: views of this state's columns for those layers (what a
        part's step changes, it changes here), at the same step."""
        layers = list(layers)
        tensors = {}
        for name, tensor in state.tensors.items():
            first, last = self.layer_columns(name, layers[0]), self.layer_columns(name, layers[-1])
            tensors[name] = tensor[..., first.start:last.stop]
        return AlgorithmState(state.step, tensors)

    def per_layer(self, value: Scalar, name: str) -> PerLayer:
        """``value`` (one number or one per layer) over this algorithm's layers."""
        return value if isinstance(value, PerLayer) else PerLayer(value, self.layout, name)

    def _gradient_pairs(self, grads):
        w = self.transport.num_local
        if isinstance(grads, Tensor):
            if tuple(grads.shape) != (w, self.num_params):
                raise ValueError(f"grads must have shape {(w, self.num_params)} (workers, parameters), got {tuple(grads.shape)}")
            return [(grads, slice(None))]
        return [(g.reshape(w, -1), s) for g, s in zip(self._check_layers(grads, "grads"), self.layout.slices)]

    # --- read-outs ---------------------------------------------------------------------------------
    def compression_error(self, state: AlgorithmState) -> Tensor:
        """e_s + mean_k e_k, (P,), as a shift of the parameters (for Adam: times lr / (sqrt(v) + eps)): the
        gap between x and the auxiliary iterate x~ (EF and SAEF)."""
        return self.rule.compression_error(state)

    def auxiliary_iterate(self, state: AlgorithmState, x: Tensor) -> Tensor:
        """x~ = x - (e_s + mean_k e_k), the point whose update is plain momentum SGD (eq. 3); for Adam the
        errors are mapped to parameters (:meth:`compression_error`)."""
        return x - self.compression_error(state)

    def point(self, state: AlgorithmState, x: Tensor, which: str = "x") -> Tensor:
        """The parameters to evaluate: ``"x"`` (the model iterate; for EF21 double-way the server's x, which
        is not what the workers hold) or ``"auxiliary"`` (x~, for the rules that define it)."""
        if which == "x":
            return self.rule.model(state, x)
        if which == "auxiliary":
            return self.auxiliary_iterate(state, x)
        raise ValueError(f"point must be 'x' or 'auxiliary', got point={which!r}")

    def mismatch(self, state: AlgorithmState) -> Dict[str, float]:
        """The gradient-mismatch terms of the paper, without the L^2 factor (EF and SAEF):

        * ``mismatch_ef``   = ||e_s + mean_k e_k||^2           (bounds EF's mismatch, eq. 9)
        * ``mismatch_saef`` = mean_k ||e_s + mean_j e_j - e_k||^2  (bounds SAEF's mismatch, eq. 10)

        with every error as a shift of the parameters (for Adam: times lr / (sqrt(v) + eps)).
        """
        total = self.compression_error(state)
        local = (total.unsqueeze(0) - self.optimizer.shift(state, state.worker_error)).square().sum()
        spread = self.transport.sum_over_processes(local.reshape(1))[0] / self.transport.num_workers
        return {"mismatch_ef": float(total.square().sum()), "mismatch_saef": float(spread)}


class Flight:
    """One step of an :class:`Algorithm` under way (made by :meth:`Algorithm.begin`), in named
    phases that run in this order::

        flight = algorithm.begin(state, x, grads, lr)  # direction, what each worker compresses, uplink handed over
        flight.serve()    # worker's state settled; the mean received; the server's work, downlink handed over
        flight.finish()   # the update received; every worker applies it
        algorithm.end_step(state)                      # the counter moves; error averaging

    Between the phases the payloads travel, so a caller may do other work there: an overlapped step
    (:mod:`saef.core.overlap`) runs the phases of several parts in turn, asks :meth:`received` before it
    serves (where the transport's directions run apart, so backward need not wait), and :meth:`land` waits for every part's update before it
    decides whether to apply them. Everything of this one step lives here (the rule, lr, the compressors'
    contexts, the payloads under way); nothing of it is left in the algorithm or its rule's plan.
    """

    def __init__(self, algorithm: "Algorithm", state: AlgorithmState, x: Tensor, pairs, lr: PerLayer):
        self.algorithm, self.state, self.x, self.lr = algorithm, state, x, lr
        self.rule = rule = algorithm.rule_for(state)  # the warm-up's or the configured one, for the whole step
        plan = rule.plan
        self.uplink_context, self.downlink_context = algorithm.contexts(state)
        direction = algorithm.optimizer.update(state, pairs, lambda: rule.points(state, x))
        sent = rule.uplink(state, x, direction, algorithm.optimizer.scale(lr))
        self._payloads = plan.uplink.encode_layers(sent, algorithm.layout, **plan.uplink.context_args(self.uplink_context))
        self._uplink: Optional[Pending] = algorithm.transport.begin_uplink(
            self._payloads, plan.uplink, algorithm.layout, context=self.uplink_context)
        self._downlink: Optional[Pending] = None
        self._update: Optional[Tensor] = None
        self.phase = "begun"  # then "served", "landed", "finished"

    def _enter(self, phase: str, after: Sequence[str]) -> None:
        if self.phase not in after:
            raise RuntimeError(f"a step in flight cannot go to {phase!r} from {self.phase!r} "
                               "(its phases run in order: begin, serve, finish)")
        self.phase = phase

    def received(self) -> bool:
        """Whether the uplink's mean has arrived, so that :meth:`serve` would not wait for the network
        (asked without waiting)."""
        return self._uplink is not None and self._uplink.ready()

    def serve(self) -> None:
        """The second phase: the workers' state settled (the transport holds its own copy of the
        payloads), the mean of the uplink waited for, the server's work for the layers owned here, its
        payloads handed to the downlink and its state settled."""
        self._enter("served", ("begun",))
        algorithm, rule, state = self.algorithm, self.rule, self.state
        plan = rule.plan
        rule.settle_worker(state, self._payloads, self.uplink_context)
        mean = self._uplink.wait()
        self._payloads = self._uplink = None
        served = rule.serve(state, self.x, mean, self.lr) if plan.owned else None
        server_payloads, applied = self._server_payloads(plan, served, mean)
        self._downlink = algorithm.transport.begin_downlink(server_payloads, applied, plan.downlink, algorithm.layout,
                                                            context=self.downlink_context)
        if served is not None:
            rule.settle_server(state, served, applied)

    def land(self) -> None:
        """Wait for the update the server sent (part of :meth:`finish`; apart, so that an overlapped step
        can have every part's update arrive before it decides to apply them or to undo the step)."""
        self._enter("landed", ("served",))
        self._update = self._downlink.wait()
        self._downlink = None

    def finish(self) -> None:
        """The last phase: the update received (if :meth:`land` did not already), and every worker applies
        it. The step then ends with :meth:`Algorithm.end_step`, over all layers."""
        if self.phase == "served":
            self.land()
        self._enter("finished", ("landed",))
        self.rule.apply(self.state, self.x, self._update, self.lr)
        self._update = None

    def _server_payloads(self, plan: Plan, served: Optional[Tensor], mean: Tensor):
        """The server's payloads of the layers owned here, and their dense values C_s(served)."""
        if served is None:  # no layer served in this process
            return [], mean.new_zeros(0)
        owned = plan.owned_layout
        context = plan.downlink.context_args(self.downlink_context)
        payloads = plan.downlink.encode_layers(served.unsqueeze(0), owned, **context)
        applied = plan.downlink.decode_layers_into(payloads, owned, plan.buffer("applied", served.unsqueeze(0)), **context)[0]
        return payloads, applied
