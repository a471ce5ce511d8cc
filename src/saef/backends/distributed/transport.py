"""The :class:`~saef.core.Transport` of one rank of a ``torch.distributed`` job: payloads as raw bytes
through ``all_to_all_single``, one exchange per direction, and dense means in the simulator's order.

Bytes are counted from the buffers handed to ``torch.distributed``, in the transport's ledger
(``wire_<direction>_<sent|received>``): the uplink input buffer is exactly this worker's payload, the
downlink output buffer exactly what this worker receives, so the per-worker bit counts equal the
simulator's. The collectives of the read-outs (mismatch terms, x~) are counted apart, as
``wire_diagnostics_sent``.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ...compress import Compressor, Identity, Layout, Payload, mean_of_rows, payload_bits
from ...core import BitLedger, Pending, Transport
from .groups import direction_groups
from .owners import assign_layers

__all__ = ["DistributedTransport", "SERVERS"]

SERVERS = ("sharded", "rank0", "allreduce")  # allreduce: nothing compressed either way (the full-precision baseline)

# all_gather_into_tensor was renamed all_gather_single (torch 2.13 warns on the old name)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

def _as_bytes(t: Tensor) -> Tensor:
    t = t.reshape(-1)
    if t.numel() and t.stride(0) != 1:  # e.g. one scale sliced out of a (W, layers) tensor
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(torch.uint8)


def _from_bytes(buffer: Tensor, like: Tensor) -> Tensor:
    if buffer.storage_offset() % like.element_size():  # packed after an odd-sized part: realign by copying
        buffer = buffer.clone()
    return buffer.view(like.dtype).reshape(like.shape)


class DistributedTransport(Transport):
    """The :class:`~saef.core.Transport` of one rank of a ``torch.distributed`` job (one worker per rank).

    Args:
        sizes: number of elements of each layer (to assign owners).
        server: ``"sharded"`` (balanced share of layers per rank), ``"rank0"`` (rank 0 serves all), or
            ``"allreduce"`` (identity compressor only: one dense all-reduce, the full-precision baseline).
        group: the process group (default: the world).
        dtype, device: of the parameters (payload layouts are derived from them).
        directions_apart: False (the default): both exchanges go through ``group``, so every rank must
            start them in one order. True: the uplink and the downlink each get a process group of their
            own (:func:`direction_groups`), so that a rank may start the downlink of one bucket whenever
            its uplink has arrived, while other uplinks are under way, and the ranks still agree on the
            order of each group's collectives (an overlapped step).
        load: elements each rank serves already elsewhere (another transport's layers: the buckets of a DDP
            hook), so that the sharded owners balance the whole; default none.
    """

    def __init__(self, sizes: Sequence[int], server: str = "sharded", group=None, dtype=torch.float32, device="cpu",
                 directions_apart: bool = False, load: Optional[Sequence[int]] = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call saef.backends.distributed.init_distributed() first")
        if server not in SERVERS:
            raise ValueError(f"server must be one of {SERVERS}, got server={server!r}")
        self.group = group
        self.directions_apart = bool(directions_apart)
        # The group of each direction's all_to_all: the transport's own, or one each (see directions_apart).
        self.channels = dict.fromkeys(("uplink", "downlink"), group)
        if self.directions_apart:
            self.channels = direction_groups(group, device)
        self.rank = dist.get_rank(group)
        self.num_workers = dist.get_world_size(group)
        self.num_local = 1
        self.server = server
        self._sizes = [int(d) for d in sizes]
        self.owner = assign_layers(sizes, self.num_workers, load) if server == "sharded" else [0] * len(sizes)
        self.dtype, self.device = dtype, torch.device(device)  # of the parameters and payloads
        # Bits per worker, and the bytes handed to (sent) and returned by (received) torch.distributed per
        # direction; wire_diagnostics_sent: the read-outs' collectives, apart from the algorithm's traffic.
        self.ledger = BitLedger()
        for key in ("uplink_sent", "uplink_received", "downlink_sent", "downlink_received", "averaging_sent",
                    "averaging_received", "diagnostics_sent"):
            self.ledger.add(f"wire_{key}", 0)

    def owns(self, layer: int, num_layers: int) -> bool:
        return self.server == "allreduce" or self.owner[layer] == self.rank

    def add_layers(self, values):
        with torch.no_grad():
            for value in values:  # every rank starts the new layers from rank 0's values
                dist.broadcast(value, src=0, group=self.group)
        sizes = [v.numel() for v in values]
        if self.server == "sharded":  # each new layer, in order, to the least-loaded rank; existing layers stay
            load = [0] * self.num_workers
            for i, r in enumerate(self.owner):
                load[r] += self._sizes[i]
            self.owner += assign_layers(sizes, self.num_workers, load, largest_first=False)
        else:
            self.owner += [0] * len(sizes)
        self._sizes += sizes
        self._layouts = None  # payload templates and sub-layouts are per layer: rebuilt on the next step
        self.__dict__.pop("_sub_layouts", None)

    def _exchange(self, chunks: List[List[Tensor]], recv_sizes: List[int], direction: str) -> Pending:
        """Start sending ``chunks[r]`` (tensors, as raw bytes) to rank r and receiving ``recv_sizes[r]``
        bytes from rank r; the pending result is the bytes received from each rank. The send buffer is a
        copy: what the chunks view may change once this returns. Payload sizes are a function of the layer
        sizes (true of every built-in compressor), so each rank knows what it will receive without asking."""
        parts = [[_as_bytes(t) for t in chunk] for chunk in chunks]
        send_sizes = [sum(p.numel() for p in part) for part in parts]
        flat = [p for part in parts for p in part]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=self.device)
        recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=self.device)
        work = dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.channels[direction], async_op=True)

        def finish():
            work.wait()
            self.ledger.add(f"wire_{direction}_sent", send.numel())
            self.ledger.add(f"wire_{direction}_received", recv.numel())
            return list(torch.split(recv, recv_sizes))

        return Pending(finish, work.is_completed)

    @staticmethod
    def _unpack(buffer: Tensor, layouts: List[Payload]) -> List[Payload]:
        """Cut ``buffer`` into payloads shaped like ``layouts`` (in order)."""
        out, offset = [], 0
        for layout in layouts:
            parts = []
            for like in layout:
                n = like.numel() * like.element_size()
                parts.append(_from_bytes(buffer[offset : offset + n], like))
                offset += n
            out.append(tuple(parts))
        if offset != buffer.numel():
            raise RuntimeError(f"received {buffer.numel()} bytes, expected {offset}: payload sizes differ between ranks")
        return out

    @property
    def worker_ids(self):
        return [self.rank]

    def part(self, layers):
        part = copy.copy(self)  # the same group and ledger; the layers' owners; caches of its own
        part.owner = [self.owner[i] for i in layers]
        part._sizes = [self._sizes[i] for i in layers]
        part._layouts = None
        part.__dict__.pop("_sub_layouts", None)
        return part

    def begin_uplink(self, payloads, compressor, layout, context=None):
        self.ledger.add("bits_up", sum(payload_bits(p) for p in payloads))
        if self.server == "allreduce":
            return Pending.done(self._allreduce_mean(payloads, compressor, layout))
        chunks: List[List[Tensor]] = [[] for _ in range(self.num_workers)]
        for i, payload in enumerate(payloads):
            chunks[self.owner[i]].extend(payload)
        mine = self._layers_of(self.rank, len(layout))
        # Every sender packs our layers in layer order, shaped like our own payload for them (only the
        # shapes and dtypes of ours are read, so it does not matter that their values may change meanwhile).
        templates = [payloads[i] for i in mine]
        expected = sum(payload_bits(payloads[i]) for i in mine) // 8
        exchange = self._exchange(chunks, [expected] * self.num_workers, "uplink")
        senders = None if context is None else context.with_senders(range(self.num_workers))  # rows in rank order

        def mean():
            received = exchange.wait()
            if not mine:
                return torch.zeros(0, dtype=self.dtype, device=self.device)
            from_each = [self._unpack(buffer, templates) for buffer in received]
            # Layer by layer, the K senders' rows stacked in rank order: (K, ...) payloads, as simulated.
            stacked = [tuple(torch.cat(parts, dim=0) for parts in zip(*layer)) for layer in zip(*from_each)]
            return compressor.decode_mean_layers(stacked, self._owned_layout(layout, self.rank), **compressor.context_args(senders))

        return Pending(mean, exchange.ready)

    def begin_downlink(self, payloads, decoded, compressor, layout, context=None):
        if self.server == "allreduce":  # every rank ran the server's work on the same all-reduced mean
            if not isinstance(compressor, Identity):
                raise ValueError("server='allreduce' sends dense values both ways; with a server compressor use "
                                 "server='sharded' or 'rank0'")
            self.ledger.add("wire_downlink_received", self._allreduce_bytes)
            self.ledger.add("bits_down", self._allreduce_bytes * 8)
            return Pending.done(decoded)
        templates = self._downlink_layouts(compressor, layout)
        own = [t for payload in payloads for t in payload]
        by_owner = [self._layers_of(r, len(layout)) for r in range(self.num_workers)]
        recv_sizes = [sum(payload_bits(templates[i]) for i in layers) // 8 for layers in by_owner]
        exchange = self._exchange([own] * self.num_workers, recv_sizes, "downlink")
        self.ledger.add("bits_down", sum(recv_sizes) * 8)
        return Pending(lambda: self._decode_update(exchange.wait(), by_owner, templates, decoded, compressor, layout, context),
                       exchange.ready)

    def _decode_update(self, received, by_owner, templates, decoded, compressor, layout, context):
        """The dense update (P,) from every owner's server payloads (this rank's own: ``decoded``)."""
        # One buffer for the update, reused every step (a fresh 20 MB tensor costs page faults each time).
        update = layout.memo(("downlink-update", decoded.dtype, decoded.device), lambda: decoded.new_empty(layout.total))
        for source, (buffer, layers) in enumerate(zip(received, by_owner)):
            if not layers:
                continue
            sub = self._owned_layout(layout, source)
            if source == self.rank:
                dense = decoded
            else:
                payloads = self._unpack(buffer, [templates[i] for i in layers])
                span = layout.span(layers)
                if span is not None:  # the owner's layers lie side by side: decode straight into the update
                    compressor.decode_layers_into(payloads, sub, update[span].unsqueeze(0), **compressor.context_args(context))
                    continue
                dense = compressor.decode_layers(payloads, sub, **compressor.context_args(context))[0]
            for i, s in zip(layers, sub.slices):  # one copy per layer: index_copy_ was ~5x slower
                update[layout.slices[i]] = dense[s]
        return update

    def _layers_of(self, rank: int, num_layers: int) -> List[int]:
        return [i for i in range(num_layers) if self.owner[i] == rank]

    def _owned_layout(self, layout: Layout, rank: int) -> Layout:
        """Sub-layout of the layers ``rank`` serves (cached: the same every step)."""
        cache = self.__dict__.setdefault("_sub_layouts", {})
        if rank not in cache:
            cache[rank] = layout.subset(self._layers_of(rank, len(layout)))
        return cache[rank]

    def _allreduce_mean(self, payloads: Sequence[Payload], compressor: Compressor, layout: Layout):
        """Nothing compressed: the mean of the dense values over all ranks (:meth:`exact_mean`), as DDP's
        all-reduce moves them; every rank then does the (trivial) server work itself."""
        if not isinstance(compressor, Identity):
            raise ValueError("server='allreduce' is for the identity compressor only (it sends dense values)")
        dense = compressor.decode_layers(payloads, layout)
        self._allreduce_bytes = dense.numel() * dense.element_size()
        return self.exact_mean(dense, "uplink")

    def exact_mean(self, rows: Tensor, direction: str) -> Tensor:
        """The mean over ranks of this rank's one row ``(1, n)``, added in rank order as the simulator adds
        its rows (:func:`~saef.compress.mean_of_rows`): an ``all_to_all_single`` hands rank r the r-th
        1/K of every rank's columns, rank r adds them in rank order and divides, and an
        ``all_gather_single`` returns the whole. Counted under ``direction``: the row's bytes, as for
        the input of an all-reduce (both move 2 (K - 1) / K of them per rank over the network)."""
        k, n = self.num_workers, rows.shape[1]
        chunk = -(-n // k)
        padded = rows.new_zeros(k * chunk)
        padded[:n] = rows[0]
        received = torch.empty_like(padded)
        dist.all_to_all_single(received, padded, group=self.group)
        mine = mean_of_rows(received.view(k, chunk))
        whole = torch.empty_like(padded)
        _all_gather(whole, mine, group=self.group)
        self.ledger.add(f"wire_{direction}_sent", n * rows.element_size())
        return whole[:n]

    def _downlink_layouts(self, compressor: Compressor, layout: Layout) -> List[Payload]:
        """Shapes and dtypes of every layer's server payload (meta tensors), made once per compressor (a
        warm-up sends identity payloads first)."""
        if getattr(self, "_layouts", None) is None:
            self._layouts = {}
        key = (compressor.name, layout.total)
        if key not in self._layouts:
            self._layouts[key] = compressor.payload_templates(layout, self.dtype)
        return self._layouts[key]

    def mean_over_workers(self, rows, purpose="averaging"):
        mean = self.exact_mean(rows, purpose)
        if purpose == "averaging":  # the row went out and its mean came back: counted both ways
            self.ledger.add("wire_averaging_received", mean.numel() * mean.element_size())
            self.ledger.add("bits_averaging", 2 * rows.shape[1] * rows.element_size() * 8)
        return mean

    def sum_over_processes(self, values):
        values = values.clone()
        dist.all_reduce(values, group=self.group)
        self.ledger.add("wire_diagnostics_sent", values.numel() * values.element_size())
        return values

    def all_agree(self, flags):
        vote = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)  # a rank with a False vetoes
        return [bool(v) for v in vote.tolist()]

    def server_total(self, values):
        if self.server == "allreduce":  # every rank holds the whole server state
            return values
        return self.sum_over_processes(values)
