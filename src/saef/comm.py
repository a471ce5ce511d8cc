"""The transport interface the algorithm talks to, and the in-process transport of the simulator.

The algorithm (:mod:`saef.algorithm`) never loops over workers and never calls ``torch.distributed``: it
hands payloads to a :class:`Transport` and gets averages back. A transport hosts ``local_workers`` (W) of the
``num_workers`` (K) workers -- all K in the simulator, one per process in a real run -- and runs the
server's work for the layers it :meth:`owns <Transport.owns>`.

What moves, per step and per layer i (a layer is one parameter tensor of ``d_i`` elements):

* uplink: each worker's payload for layer i goes to the owner of layer i, which decodes and averages the
  K dense results (:meth:`Transport.average_uplink`);
* downlink: the owner's (server-compressed) payload for layer i goes to every worker
  (:meth:`Transport.share_downlink`);
* error averaging and diagnostics: a mean of dense ``(W, n)`` rows over all K workers
  (:meth:`Transport.mean_over_workers`), and a sum of values over processes
  (:meth:`Transport.sum_over_processes`).

Each moving method also returns how many bits *one worker* sent (uplink, averaging) or received
(downlink), measured from the payload tensors handed over.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from torch import Tensor

from .compressors import Compressor, Layout, Payload, payload_bits

__all__ = ["Transport", "InProcessTransport"]


class Transport:
    """Interface between Algorithm 1 and the wire. See the module docstring for what each method moves."""

    num_workers: int  # K: workers in the whole job
    local_workers: int  # W: workers whose state lives in this process (rows of the algorithm's tensors)

    def owns(self, layer: int, num_layers: int) -> bool:
        """Whether the server's work for ``layer`` runs in this process."""
        raise NotImplementedError

    def average_uplink(
        self, payloads: Sequence[Payload], compressor: Compressor, layout: Layout,
        meanwhile: Callable[[Optional[Tensor]], None] = None,
    ) -> Tuple[Tensor, int]:
        """Mean over all K workers of the decoded uplink payloads, for the layers owned here.

        Args:
            payloads: per layer, the payload of the W local workers (leading row axis W).
            compressor: the workers' compressor, to decode the payloads.
            layout: where each layer lies on the flat axis.
            meanwhile: local work to run while the payloads travel, called as ``meanwhile(decoded)``:
                the ``(W, P)`` dense decode of the local rows when the transport made one anyway (in one
                process), else ``None``. It may overwrite tensors that ``payloads`` view (the error a
                payload was made from): copy or consume the payloads before calling it.

        Returns:
            ``(mean, bits one worker sent)``; ``mean`` holds the owned layers end to end, in layer order.
            It may live in a buffer the compressor reuses: use it before the next uplink.
        """
        raise NotImplementedError

    def share_downlink(
        self, payloads: Sequence[Payload], decoded: Tensor, compressor: Compressor, layout: Layout,
        meanwhile: Callable[[], None] = None,
    ) -> Tuple[Tensor, int]:
        """Give every worker the server's payload for every layer.

        Args:
            payloads: the one-row server payloads of the layers owned here, in layer order.
            decoded: their dense values end to end (what this process applies for its own layers).
            meanwhile: local work to run while the payloads travel. It may overwrite tensors that
                ``payloads`` view (the server error), but not ``decoded``: copy or consume the payloads
                before calling it.

        Returns:
            ``(update (P,), bits one worker received)``.
        """
        raise NotImplementedError

    def mean_over_workers(self, rows: Tensor, purpose: str = "averaging") -> Tuple[Tensor, int]:
        """Mean of ``(W, n)`` rows over all K workers -> ``((n,), bits one worker sent)``. ``purpose`` is
        ``"averaging"`` (error averaging, Algorithm 1's traffic) or ``"diagnostics"`` (read-outs), so
        that a transport can count the two apart."""
        raise NotImplementedError

    def sum_over_processes(self, values: Tensor) -> Tensor:
        """Element-wise sum of ``values`` over processes (for diagnostics; not Algorithm 1's traffic)."""
        raise NotImplementedError


class InProcessTransport(Transport):
    """All K workers and the server in one process: the simulator's transport.

    Payloads do not travel, but they are still produced, decoded and measured exactly as a real transport
    would, so the bit counts are those of the real wire format.
    """

    def __init__(self, workers: int):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got workers={workers!r}")
        self.num_workers = workers
        self.local_workers = workers
        self._decoded: dict = {}  # (rows, P, dtype, device) -> the dense decode of the uplink, reused every step

    def owns(self, layer: int, num_layers: int) -> bool:
        return True

    def average_uplink(self, payloads, compressor, layout, meanwhile=None):
        bits = sum(payload_bits(p) for p in payloads) // self.num_workers
        # All K rows are here: decode them once, average, and hand the rows to the error update rather than
        # have it decode them again. The first decode's tensor is kept and decoded into from then on.
        values = next((t for p in payloads for t in p if t.is_floating_point()), None)
        key = (len(payloads) and payloads[0][0].shape[0], layout.total, values is not None and values.dtype,
               values is not None and values.device)
        buffer = self._decoded.get(key)
        if buffer is None:  # (a clone: a decode may be a view of the payload)
            decoded = self._decoded[key] = compressor.decode_layers(payloads, layout).clone()
        else:
            decoded = compressor.decode_layers_into(payloads, layout, buffer)
        mean = decoded.mean(dim=0)
        if meanwhile is not None:
            meanwhile(decoded)
        return mean, bits

    def share_downlink(self, payloads, decoded, compressor, layout, meanwhile=None):
        if meanwhile is not None:
            meanwhile()
        return decoded, sum(payload_bits(p) for p in payloads)

    def mean_over_workers(self, rows, purpose="averaging"):
        return rows.mean(dim=0), rows.shape[1] * rows.element_size() * 8

    def sum_over_processes(self, values):
        return values
