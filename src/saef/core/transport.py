"""The transport interface the algorithm talks to.

The algorithm (:mod:`saef.core.algorithm`) never loops over workers and never calls ``torch.distributed``:
it hands payloads to a :class:`Transport` and gets averages back. A transport hosts ``num_local`` (W) of the
``num_workers`` (K) workers -- all K in the simulator, one per process in a real run -- and runs the
server's work for the layers it :meth:`owns <Transport.owns>`. Implementations live in
:mod:`saef.backends` (in-process, torch.distributed); they do not know which feedback rule runs.

What moves, per step and per layer i (a layer is one parameter tensor of ``d_i`` elements):

* uplink: each worker's payload for layer i goes to the owner of layer i, which averages the K decoded
  rows (:meth:`Transport.begin_uplink`);
* downlink: the owner's (server-compressed) payload for layer i goes to every worker
  (:meth:`Transport.begin_downlink`);
* error averaging and diagnostics: a mean of dense ``(W, n)`` rows over all K workers
  (:meth:`Transport.mean_over_workers`), a sum of values over processes (:meth:`Transport.sum_over_processes`),
  and the whole of a server-side tensor each owner holds a part of (:meth:`Transport.server_total`).

The two directions are asynchronous: ``begin_*`` hands the payloads over and returns a :class:`Pending`,
which the step (:class:`~saef.core.algorithm.Flight`) waits for in a later phase, so that payloads travel
while the process works. A transport that moves nothing returns :meth:`Pending.done`.

Every transport records what moves in its :class:`~saef.core.ledger.BitLedger`, measured from the payload
tensors handed over. Averages use one arithmetic everywhere (rows added in worker order, then divided; see
:func:`saef.compress.mean_of_rows`), so that, given the same gradients, every transport produces the same
parameters bit for bit.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from torch import Tensor

from ..compress import Compressor, Context, Layout, Payload
from .ledger import BitLedger

__all__ = ["Transport", "Pending"]


class Pending:
    """Payloads under way: :meth:`wait` blocks until they have arrived and returns what they make (a mean,
    an update); :meth:`ready` tells, without blocking, whether :meth:`wait` would return without waiting
    for the network. Made by :meth:`Transport.begin_uplink` and :meth:`Transport.begin_downlink`."""

    def __init__(self, finish: Callable[[], Tensor], ready: Callable[[], bool] = lambda: True):
        self._finish, self._ready = finish, ready

    @classmethod
    def done(cls, value: Tensor) -> "Pending":
        """Payloads that had arrived when they were handed over (a transport that moves nothing)."""
        return cls(lambda: value)

    def ready(self) -> bool:
        return bool(self._ready())

    def wait(self) -> Tensor:
        return self._finish()


class Transport:
    """Interface between the algorithm and the wire. See the module docstring for what each method moves.

    The step's phases (:class:`saef.core.algorithm.Flight`) hand payloads over with :meth:`begin_uplink`
    (in ``begin``) and :meth:`begin_downlink` (in ``serve``), and wait for what they return in the next
    phase. Every process must start them in one order, unless :attr:`directions_apart`.
    """

    num_workers: int  # K: workers in the whole job
    num_local: int  # W: workers whose state lives in this process (rows of the algorithm's tensors)
    ledger: BitLedger  # the bits this process's workers sent and received
    # Whether the uplink and the downlink run on channels of their own, so that a process may start one
    # bucket's downlink while other uplinks are under way, at moments that differ between processes
    # (an overlapped step then serves buckets as their uplinks arrive; see saef.core.overlap).
    directions_apart: bool = False

    def owns(self, layer: int, num_layers: int) -> bool:
        """Whether the server's work for ``layer`` runs in this process."""
        raise NotImplementedError

    def add_layers(self, values: Sequence[Tensor]) -> None:
        """New layers join the model after the existing ones (``values``: their starting values, e.g. the
        parameters of a new parameter group): give them owners without moving any existing layer, and make
        every process start them from the same values. Nothing to do for one process (this default)."""

    @property
    def worker_ids(self) -> List[int]:
        """The ids (0 .. K-1) of the workers hosted here, in row order (default: all of them)."""
        return list(range(self.num_local))

    def begin_uplink(self, payloads: Sequence[Payload], compressor: Compressor, layout: Layout,
                     context: Optional[Context] = None) -> Pending:
        """Hand the workers' uplink payloads over. :meth:`Pending.wait` returns the mean over all K workers
        of the decoded payloads, for the layers owned here, computed by ``compressor.decode_mean_layers``
        (the same arithmetic in every transport). Once this returns, the tensors the payloads view may be
        overwritten (the transport has copied or consumed them: the worker's state is settled meanwhile).

        Args:
            payloads: per layer, the payload of the W local workers (leading row axis W).
            compressor: the workers' compressor, to decode the payloads.
            layout: where each layer lies on the flat axis.
            context: the senders' :class:`~saef.compress.Context` (a random compressor's decoder redraws
                from it; the owner decodes rows of all K workers).

        Returns:
            the mean under way: the owned layers end to end in layer order. It may live in a buffer the
            compressor reuses: use it before the next uplink.
        """
        raise NotImplementedError

    def begin_downlink(self, payloads: Sequence[Payload], decoded: Tensor, compressor: Compressor, layout: Layout,
                       context: Optional[Context] = None) -> Pending:
        """Hand the server's payloads over, for every worker. :meth:`Pending.wait` returns the dense update
        ``(P,)``. Once this returns, the tensors the payloads view may be overwritten (the server error),
        but not ``decoded``.

        Args:
            payloads: the one-row server payloads of the layers owned here, in layer order.
            decoded: their dense values end to end (what this process applies for its own layers).
            compressor: the server's compressor, to decode the other owners' payloads.
            layout: where each layer lies on the flat axis.
            context: the server's :class:`~saef.compress.Context` (to decode the other owners' payloads).
        """
        raise NotImplementedError

    def part(self, layers: Sequence[int]) -> "Transport":
        """The transport of the consecutive ``layers`` alone (a bucket of an overlapped step): their owners,
        this process's workers, and this transport's ledger, so that the parts' traffic adds up to the
        whole's. This default is right for a transport that keeps nothing per layer."""
        return self

    def mean_over_workers(self, rows: Tensor, purpose: str = "averaging") -> Tensor:
        """Mean of ``(W, n)`` rows over all K workers, ``(n,)``, rows added in worker order. ``purpose`` is
        ``"averaging"`` (error averaging, the algorithm's traffic, counted both ways as ``bits_averaging``) or
        ``"diagnostics"`` (read-outs), so that the two are counted apart."""
        raise NotImplementedError

    def sum_over_processes(self, values: Tensor) -> Tensor:
        """Element-wise sum of ``values`` over processes (for diagnostics; not the algorithm's traffic)."""
        raise NotImplementedError

    def all_agree(self, flags: Sequence[bool]) -> List[bool]:
        """Element-wise AND of ``flags`` over processes (a vote: e.g. one NaN anywhere and every process
        skips the step together). This default is right for one process; a transport over several
        processes must override it."""
        return [bool(f) for f in flags]

    def all_finite(self, finite: bool) -> bool:
        """Whether every process found its gradients finite."""
        return self.all_agree([finite])[0]

    def server_total(self, values: Tensor) -> Tensor:
        """The whole of a server-side tensor ``(P,)`` (e.g. the server error) of which this process holds
        the owned layers (zero elsewhere): a sum over the owners where the server is sharded."""
        raise NotImplementedError
