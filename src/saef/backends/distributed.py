"""Real multi-process training on ``torch.distributed``: the transport, and one rank's trainer.

Launch (one process per worker; gloo on CPU, NCCL on GPU, chosen from the device)::

    torchrun --nproc_per_node 4 -m saef train --backend dist --compressor sign
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m saef train --backend dist ...

What crosses the network, per step (all of it payloads of :mod:`saef.compress`):

* uplink, one ``all_to_all_single``: each rank sends each layer's payload (packed signs and scale, or top-k
  values and packed indices) to the layer's owner. With ``server="sharded"`` every rank owns a balanced
  share of whole layers, so the server's compression stays layer-wise and the same as the simulator's;
  with ``server="rank0"`` rank 0 owns every layer (the paper's literal architecture).
* downlink, one ``all_to_all_single``: each owner sends its server-compressed payloads to every rank (the
  dense average in single-way mode).
* every p steps, the mean of the dense worker error (error averaging; :meth:`DistributedTransport.exact_mean`).
* nothing compressed either way (e.g. the full-precision baseline): no server work, the dense mean of the
  gradients' directions by :meth:`DistributedTransport.exact_mean`, as DDP's all-reduce moves it.

With ``overlap_bytes`` (``--overlap``), the two exchanges run once per bucket of layers, each started
during backward as soon as its gradients are made (:mod:`saef.core.overlap`); the bytes are the same.

Bytes are counted from the buffers handed to ``torch.distributed``, in the transport's ledger
(``wire_<direction>_<sent|received>``): the uplink input buffer is exactly this worker's payload, the
downlink output buffer exactly what this worker receives, so the per-worker bit counts equal the
simulator's. The collectives of the read-outs (mismatch terms, x~) are counted apart, as
``wire_diagnostics_sent``.

Every mean is computed with the simulator's arithmetic: the owner of a layer adds the K rows in rank
order (``decode_mean_layers``), and dense means (error averaging, the uncompressed baseline) go through
:meth:`DistributedTransport.exact_mean` -- an ``all_to_all_single`` that gives each rank 1/K of the
columns of every rank, a sum in rank order, and an ``all_gather`` -- which moves as many bytes as a ring
all-reduce but, unlike it, adds in a fixed order. So, given the same gradients, a distributed run and
the simulator produce the same parameters bit for bit.
"""

from __future__ import annotations

import copy
import datetime
import os
import threading
import warnings
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..compress import Compressor, Identity, Layout, Payload, mean_of_rows, payload_bits
from ..core.overlap import OverlappedStep
from ..core import (BitLedger, ErrorFeedback, ErrorFeedbackConfig, NonFiniteStep, Pending, Transport, WorkerBase, all_finite, check_precision, check_dense, flatten,
                    model_penalty, write_flat)
from .base import Backend, PeerFailed, RanksDisagree

__all__ = ["DistributedTransport", "DistributedWorker", "DistributedBackend", "init_distributed", "assign_layers", "direction_groups",
           "SERVERS"]

SERVERS = ("sharded", "rank0", "allreduce")  # allreduce: nothing compressed either way (the full-precision baseline)


def assign_layers(sizes: Sequence[int], ranks: int) -> List[int]:
    """Owner rank of each layer: largest layers first, each to the least-loaded rank (ties: lowest rank),
    so every rank serves a balanced share of whole layers. Deterministic, so all ranks agree."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


# all_gather_into_tensor was renamed all_gather_single (torch 2.13 warns on the old name)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_DIRECTION_GROUPS: Dict[object, Dict[str, object]] = {}  # per base group: its uplink and downlink groups


def direction_groups(group=None, device="cpu") -> Dict[str, object]:
    """A process group for the uplink and one for the downlink, of ``group``'s ranks (None: the world),
    made the first time a rank asks (every rank of ``group`` must, at the same point) and kept for the
    process group's life, so that workers made again (resumed, or one per test) do not add groups. Their
    timeout is ``group``'s. Each has run one collective before this returns: a backend that connects a
    group at its first collective (NCCL) must not do so inside a hook while another rank waits in a
    collective of another group."""
    base = group or dist.group.WORLD
    if base not in _DIRECTION_GROUPS:
        ranks = dist.get_process_group_ranks(base)
        timeout = _timeout_of(base, device)
        made = {direction: dist.new_group(ranks, timeout=timeout, use_local_synchronization=True)
                for direction in ("uplink", "downlink")}
        for made_group in made.values():
            dist.all_reduce(torch.zeros(1, device=device), group=made_group)
        _DIRECTION_GROUPS[base] = made
    return _DIRECTION_GROUPS[base]


def _timeout_of(group, device) -> "datetime.timedelta | None":
    """The timeout ``group`` bounds its collectives with, so that groups made beside it bound theirs
    alike; None (torch's default, with a warning) where this version of torch does not tell."""
    try:
        return group._get_backend(torch.device(device)).options._timeout
    except (AttributeError, RuntimeError):
        warnings.warn("this torch does not tell a process group's timeout: the overlapped step's groups get "
                      "torch's default timeout, not --timeout", stacklevel=3)
        return None


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
    """

    def __init__(self, sizes: Sequence[int], server: str = "sharded", group=None, dtype=torch.float32, device="cpu",
                 directions_apart: bool = False):
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
        self.owner = assign_layers(sizes, self.num_workers) if server == "sharded" else [0] * len(sizes)
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
        if self.server == "sharded":  # each new layer to the least-loaded rank; existing layers stay where they are
            load = [0] * self.num_workers
            for i, r in enumerate(self.owner):
                load[r] += self._sizes[i]
            for d in sizes:
                r = min(range(self.num_workers), key=lambda r: (load[r], r))
                self.owner.append(r)
                load[r] += d
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


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> torch.device:
    """Join the job torchrun (or the caller's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    describes; NCCL when this rank gets a GPU, gloo otherwise. Returns this rank's device.

    ``timeout_s`` bounds every wait: the rendezvous (also when whatever answers on MASTER_PORT is not a
    peer, or no peer comes) and every collective after it. A rank that dies or hangs makes the others fail
    after at most that long instead of waiting for ever.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"--backend dist needs a torch.distributed launcher (environment lacks {', '.join(missing)}); "
            "run it as: torchrun --nproc_per_node K -m saef train --backend dist ..."
        )
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        this = torch.device(device if ":" in device else f"cuda:{local}")
        torch.cuda.set_device(this)
    else:
        this = torch.device("cpu")
    if not dist.is_initialized():
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        _within(timeout_s, lambda: _rendezvous("nccl" if use_cuda else "gloo", datetime.timedelta(seconds=timeout_s)),
                f"the rendezvous at {where} did not complete within --timeout {timeout_s:g} s (a rank missing, or "
                "something other than a saef rank on that port)")
    return this


class RendezvousTimeout(RuntimeError):
    """The ranks did not all meet within the timeout."""


def _within(seconds: float, work, message: str):
    """``work()``, or :class:`RendezvousTimeout` with ``message`` once ``seconds`` have passed. torch's own
    timeouts do not bound every wait of the rendezvous (a peer that accepts the connection and never
    answers holds it for ever), so the work runs in a daemon thread that is left behind if it hangs."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="saef-rendezvous", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RendezvousTimeout(message)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _rendezvous(backend: str, timeout: datetime.timedelta) -> None:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0":
        dist.init_process_group(backend, timeout=timeout)
        return
    # After a torchrun restart the rendezvous store still holds the dead round's addresses under the same
    # keys, and a rank may connect to a peer that no longer exists. A per-round prefix keeps each round's
    # keys apart.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not hosted, timeout=timeout)
    store = dist.PrefixStore(f"saef/restart-{restart}/", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class DistributedWorker(WorkerBase):
    """One rank of a distributed run: the counterpart of :class:`~saef.backends.simulator.Simulator` for W = 1.

    Rank r is worker r. The model is broadcast from rank 0 at construction; the rank computes the gradient
    of its own shard at its gradient point z_r with ordinary autograd, and :class:`ErrorFeedback` does the
    rest through a :class:`DistributedTransport`. BatchNorm: running statistics are per rank and averaged
    (one all-reduce) when a model is loaded for evaluation, as in the simulator.

    Args:
        model: this rank's copy of the model (on this rank's device).
        config: the algorithm (:class:`~saef.core.ErrorFeedbackConfig`), or its settings as keywords.
        server: ``"sharded"`` or ``"rank0"``. Where nothing is compressed either way, the mean travels as
            in an all-reduce instead (``"allreduce"``), whatever is asked.
        precision: ``"fp32"`` or ``"bf16"`` (the forward under autocast), as for the simulator.
        overlap_bytes: 0 (the default): the step's exchanges start after backward. Else buckets of at most
            this many bytes of gradients are compressed and sent while backward makes the rest
            (:class:`~saef.core.overlap.OverlappedStep`): the same parameters, state and bits.
    """

    cheap_diagnostics = False  # the mismatch terms need a dense all-reduce: computed once per epoch

    def __init__(self, model: nn.Module, *, config: ErrorFeedbackConfig = None, server: str = "sharded", loss_fn=None,
                 precision: str = "fp32", overlap_bytes: int = 0, **algorithm):
        import torch.nn.functional as F

        config = ErrorFeedbackConfig.build(config, **algorithm)
        self.precision = check_precision(precision)
        if config.lossless:  # nothing to serve: a dense mean, as DDP moves it
            server = "allreduce"
        self.model = model
        self.loss_fn = loss_fn or F.cross_entropy
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor, src=0)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.x = flatten([p.detach() for p in self.params]).clone()
        # Second stages as uplinks arrive need a group per direction: on gloo. On NCCL, collectives of
        # several communicators started in other orders on each rank can hang, so the fixed schedule.
        apart = bool(overlap_bytes) and server != "allreduce" and dist.get_backend() == "gloo"
        self.transport = DistributedTransport([p.numel() for p in self.params], server, dtype=self.x.dtype, device=self.x.device,
                                              directions_apart=apart)
        self.algorithm = ErrorFeedback(self.shapes, config, self.transport)
        self.state = self.algorithm.init_state(self.x)
        self.overlapped = OverlappedStep(self.algorithm, self.params, overlap_bytes, self.transport.all_finite) \
            if overlap_bytes else None
        self.rank, self.workers = self.transport.rank, self.transport.num_workers
        self.num_workers = self.workers
        self.worker_ids = [self.rank]
        self.is_main = self.rank == 0

    def step(self, inputs: Tensor, targets: Tensor, lr: float) -> Tensor:
        """One step on this rank's shard of the global batch; returns this rank's loss."""
        self.model.train()
        self.algorithm.write_gradient_points(self.state, self.x, [p.data for p in self.params])
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.run_forward(self.model, inputs), targets)
            penalty = model_penalty(self.model, [p.unsqueeze(0) for p in self.params])
            if penalty is not None:
                loss = loss + penalty[0]
            try:
                (self._exchange_after if self.overlapped is None else self._exchange_during)(loss, lr)
            except NonFiniteStep as error:
                raise NonFiniteStep(f"{error} (this rank's loss {loss.item()})") from None
        return loss.detach()

    def _exchange_after(self, loss: Tensor, lr) -> None:
        """Backward, then the step."""
        loss.backward()
        # Per layer, straight from .grad: a flat copy of 5M gradients cost more than the optimizer's arithmetic.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        check_dense(grads)
        # Every rank must skip together: a vote (a rank with a NaN vetoes the step).
        if not self.transport.all_finite(bool(all_finite(*grads, loss.detach()))):
            raise NonFiniteStep("non-finite loss or gradient on some rank")
        self.algorithm.step(self.state, self.x, grads, lr)

    def _exchange_during(self, loss: Tensor, lr) -> None:
        """The step's buckets go out while backward runs (:class:`~saef.core.overlap.OverlappedStep`)."""
        self.overlapped.run(self.state, self.x, lr, loss.backward, bool(all_finite(loss.detach())))

    def average(self, value: float) -> float:
        """Mean of a per-rank number over all ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.x.device)
        dist.all_reduce(t)
        return t.item() / self.workers

    @torch.no_grad()
    def load_into(self, model: nn.Module, point: str = "x") -> nn.Module:
        """Write x (or x~) and the ranks' mean running statistics into ``model`` (collective: every rank
        must call it)."""
        if model is None or model is self.model:
            raise ValueError("load_into needs a separate copy of the model (the training copy keeps its own statistics)")
        flat = self.parameters_at(point)
        write_flat([p for p in model.parameters() if p.requires_grad], flat, self.shapes)
        for (name, target), source in zip(model.named_buffers(), self.model.buffers()):
            if source.is_floating_point():
                mean = source.clone()
                dist.all_reduce(mean)
                target.copy_(mean / self.workers)
            else:
                target.copy_(source)
        return model

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """This rank's share: x, its momentum and error, its layers' server state, its BatchNorm buffers,
        its ledger."""
        return {
            **self._algorithm_state(),
            "buffers": {n: b.detach().clone() for n, b in self.model.named_buffers()},
            "workers": self.workers,
            "rank": self.rank,
            "server": self.transport.server,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, object], reset_errors: bool = False) -> None:
        """Restore this rank's saved share exactly; with ``reset_errors``, keep only x, the counters and
        the running statistics (from rank 0's file), with the algorithm's state started from x."""
        if not reset_errors and (state["workers"], state["rank"], state["server"]) != (self.workers, self.rank, self.transport.server):
            raise ValueError("state was saved by another rank, number of workers or server placement")
        self._load_algorithm_state(state, reset_errors)
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)


class DistributedBackend(Backend):
    """``--backend dist``: this process is one rank, one worker, of a torch.distributed job (torchrun)."""

    name = "dist"

    def start(self, workers: int):
        device = init_distributed(self.device_name, self.timeout)
        self.rank, self.processes = dist.get_rank(), dist.get_world_size()
        return device, self.processes  # one worker per rank, whatever was asked

    def main_first(self, work):
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except (ValueError, OSError) as failure:  # bad data: every rank stops with it, none waits
                error = failure
        self.settle(error)
        return result if self.rank == 0 else work()

    def settle(self, error):
        outcomes = [None] * self.processes
        dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, message) for r, message in enumerate(outcomes) if message is not None]
        if failed:
            rank, message = failed[0]
            raise PeerFailed(f"rank {rank} failed: {message}")

    def gather(self):
        def every_rank(value):
            values = [None] * self.processes
            dist.all_gather_object(values, value)
            return values

        return every_rank

    def agree(self, values):
        everyone = [None] * self.processes
        dist.all_gather_object(everyone, values)
        keys = list(values) + [k for other in everyone for k in other if k not in values]
        for key in keys:
            differing = [r for r, other in enumerate(everyone) if other.get(key) != everyone[0].get(key)]
            if differing:
                first = differing[0]
                raise RanksDisagree(f"the ranks disagree on {key}: rank 0 has {everyone[0].get(key)!r}, rank {first} has "
                                    f"{everyone[first].get(key)!r}" + (f" (and {len(differing) - 1} more ranks differ)" if len(differing) > 1 else "")
                                    + "; start every rank with the same settings")

    def restarted(self) -> bool:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0

    def make_worker(self, model: nn.Module, config: ErrorFeedbackConfig, precision: str = "fp32") -> DistributedWorker:
        return DistributedWorker(model, config=config, server=self.server, precision=precision, overlap_bytes=self.overlap_bytes)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def failure_message(self, error: BaseException):
        if not isinstance(error, RuntimeError):
            return None
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        if isinstance(error, RendezvousTimeout):
            return f"rank {rank}: {error}"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"rank {rank}: distributed training failed, another rank may have died or hung "
                f"({type(error).__name__}: {first})")
