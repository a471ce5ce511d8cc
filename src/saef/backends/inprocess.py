"""The in-process transport: all K workers and the server in one process (the simulator's)."""

from __future__ import annotations

from ..compress import mean_of_rows, payload_bits
from ..core import BitLedger, Pending, Transport

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    """All K workers and the server in one process.

    Payloads do not travel, but they are still produced, decoded and measured exactly as a real transport
    would, so the bit counts are those of the real wire format, and the averages are computed with the
    same arithmetic as the distributed transport's (so the two give the same parameters bit for bit).
    """

    def __init__(self, workers: int):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got workers={workers!r}")
        self.num_workers = workers
        self.num_local = workers
        self.ledger = BitLedger()

    def owns(self, layer: int, num_layers: int) -> bool:
        return True

    def begin_uplink(self, payloads, compressor, layout, context=None):
        # Decoded at once: the payloads view the workers' error, which the step settles next.
        self.ledger.add("bits_up", sum(payload_bits(p) for p in payloads) // self.num_workers)
        return Pending.done(compressor.decode_mean_layers(payloads, layout, **compressor.context_args(context)))

    def begin_downlink(self, payloads, decoded, compressor, layout, context=None):
        self.ledger.add("bits_down", sum(payload_bits(p) for p in payloads))
        return Pending.done(decoded)  # the server is here: what it sends is what every worker applies

    def mean_over_workers(self, rows, purpose="averaging"):
        if purpose == "averaging":  # each worker sends its row and receives the mean: counted both ways
            self.ledger.add("bits_averaging", 2 * rows.shape[1] * rows.element_size() * 8)
        return mean_of_rows(rows)

    def sum_over_processes(self, values):
        return values

    def server_total(self, values):
        return values

