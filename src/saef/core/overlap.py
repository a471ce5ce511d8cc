"""A step whose communication overlaps the backward pass: buckets of layers, each started as its
gradients are made.

The step of :class:`~saef.core.algorithm.Algorithm` is layer-wise up to its end (error averaging), so
it can run on parts of the model (:meth:`Algorithm.part`), each part's step a
:class:`~saef.core.algorithm.Flight` with named phases. :class:`OverlappedStep` cuts the layers into
buckets of consecutive layers, last layers first (the order in which backward makes gradients), and hooks
every parameter (``register_post_accumulate_grad_hook``). When the gradients of bucket b are all there,
it begins b's flight (direction, payloads, uplink handed over): the network moves bucket b while backward
computes bucket b + 1. A flight serves (mean received, server payloads handed over), in bucket order, as
soon as its uplink has arrived: at every hook, the flight is asked whether it has
(:meth:`Flight.received`, which never waits), so backward is never held up by the network. After
backward, the remaining phases run in bucket order, then the step's end over all layers.

Collectives must be started in one order on every rank. The flights begin in bucket order, whatever order
the hooks fire in. Whether an uplink has arrived when a hook fires differs from rank to rank, so the
downlinks may start at other moments relative to the uplinks on each rank: that needs a transport whose
two directions run on channels of their own (``transport.directions_apart``; the distributed one makes a
process group for each on gloo). Over a transport without them, bucket b - 1 serves right after bucket b
begins, in hooks and after backward alike, so every rank starts its collectives in one order however its
hooks fire (it may wait for b - 1's mean).

The arithmetic is the non-overlapped step's, layer for layer, so an overlapped run gives the same
parameters, state and bit counts bit for bit (``tests/test_distributed.py``).

A NaN or Inf: the step must change nothing, on every rank, but a rank learns of another's NaN only after
its own buckets were sent. So before a bucket's flight begins its part of the state is copied, the update
of x (the flight's finish) waits for the vote on finite gradients, and a step that some rank found
non-finite puts the copies back and raises :class:`~saef.core.flat.NonFiniteStep`. The bits the
algorithm counts are restored too; the ``wire_*`` counters keep the bytes that really moved. A bucket with
a non-finite gradient sends zeros instead (its step is undone anyway). The last bucket (the first
layers) starts only after backward, once the vote is in: backward has ended when its gradients are made,
so waiting for the vote costs it nothing, and its state, never touched by a step that is undone, needs
no copy (the copies are the overlap's cost: with one bucket, none is made).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .algorithm import Algorithm, AlgorithmState, Flight
from .flat import NonFiniteStep, all_finite, check_dense
from .ledger import PER_WORKER
from .perlayer import PerLayer

__all__ = ["OverlappedStep", "make_buckets"]


def make_buckets(sizes: Sequence[int], bucket_bytes: int, element_size: int = 4) -> List[range]:
    """Consecutive layers, from the last one back, gathered while they hold at most ``bucket_bytes`` of
    gradients (a layer larger than that is a bucket of its own). Returned in that order (last layers first);
    each range ascends."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got bucket_bytes={bucket_bytes!r}")
    buckets, stop, held = [], len(sizes), 0
    for i in reversed(range(len(sizes))):
        size = sizes[i] * element_size
        if stop - i > 1 and held + size > bucket_bytes:  # the layers i + 1 .. stop - 1 are full
            buckets.append(range(i + 1, stop))
            stop, held = i + 1, 0
        held += size
    if stop > 0:
        buckets.append(range(0, stop))
    return buckets


class OverlappedStep:
    """Steps of ``algorithm`` on the gradients of ``params`` (W = 1: one rank's model), overlapped with
    their backward pass.

    Args:
        algorithm: the step over all layers, one per parameter of ``params``, in order.
        params: the parameters whose ``.grad`` backward makes (hooked here once).
        bucket_bytes: the most bytes of gradients in a bucket (> 0).
        vote: ``vote(finite) -> bool``, whether every process found its step finite (a collective).

    Example (in a worker's step)::

        overlapped = OverlappedStep(algorithm, params, 1 << 20, transport.all_finite)
        overlapped.run(state, x, lr, lambda: loss.backward(), loss_finite)
    """

    def __init__(self, algorithm: Algorithm, params: Sequence[Tensor], bucket_bytes: int,
                 vote: Callable[[bool], bool]):
        self.algorithm, self.params, self.vote = algorithm, list(params), vote
        if len(self.params) != len(algorithm.shapes):
            raise ValueError(f"{len(self.params)} parameters for an algorithm of {len(algorithm.shapes)} layers")
        element = self.params[0].element_size() if self.params else 4
        self.buckets = make_buckets(algorithm.sizes, bucket_bytes, element)
        self.parts = [algorithm.part(b) for b in self.buckets]
        self.bucket_of = {i: b for b, layers in enumerate(self.buckets) for i in layers}
        # Flights served as their uplinks arrive (never waiting), or at fixed moments (see the module docstring).
        self.as_they_arrive = algorithm.transport.directions_apart
        self._step = None  # the step under way; None: hooks do nothing (a backward outside a step)
        self._copies = {}  # per bucket and state tensor: where its part of the state is copied, reused each step
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda _, i=i: self._made(i))

    def run(self, state: AlgorithmState, x: Tensor, lr, backward: Callable[[], None], finite: bool = True) -> None:
        """One step: ``backward()`` makes the gradients (at the points the caller wrote), the buckets go out
        as they are made; ``finite``: whether what the caller checked before (the loss) is finite."""
        step = _Step(self, state, x, lr, finite)
        self._step = step
        try:
            backward()
        except BaseException:  # the buckets already stepped are put back (the step never happened)
            step.restore()
            raise
        finally:
            self._step = None
        step.finish()

    def copy_state(self, b: int, state: AlgorithmState):
        """Copies of bucket b's part of the state, in buffers kept from step to step."""
        copies = {}
        for name, tensor in state.tensors.items():
            key = (b, name)
            if key not in self._copies or self._copies[key].shape != tensor.shape:
                self._copies[key] = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            copies[name] = self._copies[key].copy_(tensor)
        return copies

    def _made(self, layer: int) -> None:
        if self._step is not None:
            self._step.made(layer)


class _Step:
    """The bookkeeping of one overlapped step."""

    def __init__(self, owner: OverlappedStep, state: AlgorithmState, x: Tensor, lr, finite: bool):
        self.owner, self.state, self.x = owner, state, x
        algorithm = owner.algorithm
        self.lr = lr if isinstance(lr, PerLayer) else algorithm.per_layer(lr, "lr")
        self.finite = bool(finite)
        self.missing = [len(b) for b in owner.buckets]  # gradients each bucket still waits for
        self.flights: List[Flight] = []  # per bucket started: its step in flight
        self.served = 0  # buckets whose flight has served
        self.saved = []  # per bucket started: copies of its part of the state
        ledger = algorithm.transport.ledger
        self.bits = {key: ledger.counts[key] for key in PER_WORKER}

    def made(self, layer: int) -> None:
        b = self.owner.bucket_of[layer]
        self.missing[b] -= 1
        last = len(self.missing) - 1  # (started by finish, after the vote)
        while len(self.flights) < last and self.missing[len(self.flights)] == 0:  # in bucket order
            self._start(len(self.flights))
        while self.owner.as_they_arrive and self.served < len(self.flights) and self.flights[self.served].received():
            self._serve()  # in bucket order, never waiting

    def _gradients(self, b: int) -> List[Tensor]:
        """Bucket b's gradients (zeros where backward made none); a NaN or Inf among them turns
        ``self.finite`` False, and zeros are returned instead (the step will be undone: something
        harmless is sent meanwhile)."""
        params = [self.owner.params[i] for i in self.owner.buckets[b]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        check_dense(grads)
        if all_finite(*grads):
            return grads
        self.finite = False
        return [torch.zeros_like(g) for g in grads]

    @torch.no_grad()
    def _start(self, b: int, grads: Optional[List[Tensor]] = None) -> None:
        """Bucket b's first phase (:meth:`Algorithm.begin`): its direction and payloads, handed to the
        uplink. ``grads``: given once the vote has kept the step on every rank (the state then needs no
        copy)."""
        owner, algorithm = self.owner, self.owner.algorithm
        layers, part = owner.buckets[b], owner.parts[b]
        state = algorithm.part_state(self.state, layers)
        if grads is None:
            grads = self._gradients(b)
            self.saved.append(owner.copy_state(b, state))
        span = algorithm.layout.span(layers)
        lr = self.lr.subset(list(layers), part.layout)
        self.flights.append(part.begin(state, self.x[span], grads, lr))
        if not owner.as_they_arrive and b > 0:  # the fixed moment of bucket b - 1's second phase
            self._serve()

    @torch.no_grad()
    def _serve(self) -> None:
        self.flights[self.served].serve()  # mean received, the server's payloads handed over
        self.served += 1

    @torch.no_grad()
    def finish(self) -> None:
        """After backward: the buckets not yet started but the last (parameters backward did not reach:
        zero gradients), the vote, the last bucket if the step is kept, the flights left to serve, every
        update received, then the updates applied and the step's end, or the state put back."""
        owner = self.owner
        last = len(owner.buckets) - 1
        while len(self.flights) < last:
            self._start(len(self.flights))
        grads = self._gradients(last)
        finite = owner.vote(self.finite)
        if finite:
            self._start(last, grads)
        while self.served < len(self.flights):
            self._serve()
        for flight in self.flights:
            flight.land()  # the update received (every collective of the step done before it may be undone)
        if not finite:
            self.restore()
            raise NonFiniteStep("non-finite loss or gradient on some rank" if self.finite else
                                "non-finite loss or gradient on this rank")
        for flight in self.flights:
            flight.finish()  # every worker applies the update
        owner.algorithm.end_step(self.state)

    def restore(self) -> None:
        """Every bucket started puts its state back, and the bits counted are as before the step."""
        algorithm = self.owner.algorithm
        for layers, saved in zip(self.owner.buckets, self.saved):
            state = algorithm.part_state(self.state, layers)
            for name, tensor in state.tensors.items():
                tensor.copy_(saved[name])
        algorithm.transport.ledger.counts.update(self.bits)
