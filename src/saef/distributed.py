"""Real multi-process training on ``torch.distributed``: the transport, and one rank's trainer.

Launch (one process per worker; gloo on CPU, NCCL on GPU, chosen from the device)::

    torchrun --nproc_per_node 4 -m saef train --backend dist --compressor sign
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m saef train --backend dist ...

What crosses the network, per step (all of it payloads of :mod:`saef.compressors`):

* uplink, one ``all_to_all_single``: each rank sends each layer's payload (packed signs and scale, or top-k
  values and packed indices) to the layer's owner. With ``server="sharded"`` every rank owns a balanced
  share of whole layers, so the server's compression stays layer-wise and the same as the simulator's;
  with ``server="rank0"`` rank 0 owns every layer (the paper's literal architecture).
* downlink, one ``all_to_all_single``: each owner sends its server-compressed payloads to every rank (the
  dense average in single-way mode).
* every p steps, one ``all_reduce`` of the dense worker error (error averaging).

Bytes are counted from the buffers handed to ``torch.distributed`` (:attr:`DistributedTransport.wire`):
the uplink input buffer is exactly this worker's payload, the downlink output buffer exactly what this
worker receives, so the counts equal the simulator's. The all-reduces of the read-outs (mismatch terms,
x~) are counted apart, as ``diagnostics_sent``.
"""

from __future__ import annotations

import datetime
import os
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .algorithm import ErrorFeedback, ErrorFeedbackConfig
from .comm import Transport
from .compressors import Compressor, Identity, Layout, Payload, payload_bits
from .simulator import NonFiniteStep, TrainerBase, all_finite, flatten, write_flat

__all__ = ["DistributedTransport", "DistributedWorker", "init_distributed", "assign_layers", "SERVERS"]

SERVERS = ("sharded", "rank0", "allreduce")  # allreduce: the full-precision baseline (identity only)


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
    """The :class:`~saef.comm.Transport` of one rank of a ``torch.distributed`` job (one worker per rank).

    Args:
        sizes: number of elements of each layer (to assign owners).
        server: ``"sharded"`` (balanced share of layers per rank), ``"rank0"`` (rank 0 serves all), or
            ``"allreduce"`` (identity compressor only: one dense all-reduce, the full-precision baseline).
        group: the process group (default: the world).
        dtype, device: of the parameters (payload layouts are derived from them).
    """

    def __init__(self, sizes: Sequence[int], server: str = "sharded", group=None, dtype=torch.float32, device="cpu"):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call saef.distributed.init_distributed() first")
        if server not in SERVERS:
            raise ValueError(f"server must be one of {SERVERS}, got server={server!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_workers = dist.get_world_size(group)
        self.local_workers = 1
        self.server = server
        self.owner = assign_layers(sizes, self.num_workers) if server == "sharded" else [0] * len(sizes)
        self.dtype, self.device = dtype, torch.device(device)  # of the parameters and payloads
        # Bytes handed to (sent) and returned by (received) torch.distributed, cumulative, per direction.
        # diagnostics_sent: the read-outs' all-reduces (mismatch terms, x~), apart from Algorithm 1's traffic.
        self.wire = {"uplink_sent": 0, "uplink_received": 0, "downlink_sent": 0, "downlink_received": 0,
                     "averaging_sent": 0, "diagnostics_sent": 0}

    def owns(self, layer: int, num_layers: int) -> bool:
        return self.server == "allreduce" or self.owner[layer] == self.rank

    def _exchange(self, chunks: List[List[Tensor]], recv_sizes: List[int], direction: str, meanwhile=None) -> List[Tensor]:
        """Send ``chunks[r]`` (tensors, as raw bytes) to rank r and receive ``recv_sizes[r]`` bytes from
        rank r, running ``meanwhile()`` while the bytes travel. Payload sizes are a function of the layer
        sizes (true of every built-in compressor), so each rank knows what it will receive without asking."""
        parts = [[_as_bytes(t) for t in chunk] for chunk in chunks]
        send_sizes = [sum(p.numel() for p in part) for part in parts]
        flat = [p for part in parts for p in part]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=self.device)
        recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=self.device)
        work = dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group, async_op=True)
        if meanwhile is not None:  # the send buffer is a copy: meanwhile may change what it was made from
            meanwhile()
        work.wait()
        self.wire[f"{direction}_sent"] += send.numel()
        self.wire[f"{direction}_received"] += recv.numel()
        return list(torch.split(recv, recv_sizes))

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

    def average_uplink(self, payloads, compressor, layout, meanwhile=None):
        if self.server == "allreduce":
            mean = self._allreduce_mean(payloads, compressor, layout)
            if meanwhile is not None:
                meanwhile(None)
            return mean
        chunks: List[List[Tensor]] = [[] for _ in range(self.num_workers)]
        for i, payload in enumerate(payloads):
            chunks[self.owner[i]].extend(payload)
        mine = self._layers_of(self.rank, len(layout))
        # Every sender packs our layers in layer order, shaped like our own payload for them.
        expected = sum(payload_bits(payloads[i]) for i in mine) // 8
        received = self._exchange(chunks, [expected] * self.num_workers, "uplink", meanwhile and (lambda: meanwhile(None)))
        if not mine:
            return torch.zeros(0, dtype=self.dtype, device=self.device), sum(payload_bits(p) for p in payloads)
        from_each = [self._unpack(buffer, [payloads[i] for i in mine]) for buffer in received]
        # Layer by layer, the K senders' rows stacked in rank order: (K, ...) payloads, as simulated.
        stacked = [tuple(torch.cat(parts, dim=0) for parts in zip(*layer)) for layer in zip(*from_each)]
        mean = compressor.decode_mean_layers(stacked, self._owned_layout(layout, self.rank))
        return mean, sum(payload_bits(p) for p in payloads)

    def share_downlink(self, payloads, decoded, compressor, layout, meanwhile=None):
        if self.server == "allreduce":  # every rank ran the server's work on the same all-reduced mean
            self.wire["downlink_received"] += self._allreduce_bytes
            if meanwhile is not None:
                meanwhile()
            return decoded, self._allreduce_bytes * 8
        templates = self._downlink_layouts(compressor, layout)
        own = [t for payload in payloads for t in payload]
        by_owner = [self._layers_of(r, len(layout)) for r in range(self.num_workers)]
        recv_sizes = [sum(payload_bits(templates[i]) for i in layers) // 8 for layers in by_owner]
        received = self._exchange([own] * self.num_workers, recv_sizes, "downlink", meanwhile)
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
                    compressor.decode_layers_into(payloads, sub, update[span].unsqueeze(0))
                    continue
                dense = compressor.decode_layers(payloads, sub)[0]
            for i, s in zip(layers, sub.slices):  # one copy per layer: index_copy_ was ~5x slower
                update[layout.slices[i]] = dense[s]
        return update, sum(recv_sizes) * 8

    def _layers_of(self, rank: int, num_layers: int) -> List[int]:
        return [i for i in range(num_layers) if self.owner[i] == rank]

    def _owned_layout(self, layout: Layout, rank: int) -> Layout:
        """Sub-layout of the layers ``rank`` serves (cached: the same every step)."""
        cache = self.__dict__.setdefault("_sub_layouts", {})
        if rank not in cache:
            cache[rank] = layout.subset(self._layers_of(rank, len(layout)))
        return cache[rank]

    def _allreduce_mean(self, payloads: Sequence[Payload], compressor: Compressor, layout: Layout):
        """Full-precision baseline: one all-reduce of the dense values, as DDP does."""
        if not isinstance(compressor, Identity):
            raise ValueError("server='allreduce' is for the identity compressor only (it sends dense values)")
        total = compressor.decode_layers(payloads, layout).sum(dim=0)
        dist.all_reduce(total, group=self.group)
        self._allreduce_bytes = total.numel() * total.element_size()
        self.wire["uplink_sent"] += self._allreduce_bytes
        return total / self.num_workers, self._allreduce_bytes * 8

    def _downlink_layouts(self, compressor: Compressor, layout: Layout) -> List[Payload]:
        """Shapes and dtypes of every layer's server payload, from encoding a zero row once (meta tensors
        stand in, since only shape and dtype matter)."""
        if getattr(self, "_layouts", None) is None:
            self._layouts = [
                tuple(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in compressor.encode_rows(torch.zeros(1, d, dtype=self.dtype)))
                for d in layout.sizes
            ]
        return self._layouts

    def mean_over_workers(self, rows, purpose="averaging"):
        total = rows.sum(dim=0)
        dist.all_reduce(total, group=self.group)
        self.wire[f"{purpose}_sent"] += total.numel() * total.element_size()
        return total / self.num_workers, rows.shape[1] * rows.element_size() * 8

    def sum_over_processes(self, values):
        values = values.clone()
        dist.all_reduce(values, group=self.group)
        self.wire["diagnostics_sent"] += values.numel() * values.element_size()
        return values


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> torch.device:
    """Join the job torchrun (or the caller's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    describes; NCCL when this rank gets a GPU, gloo otherwise. Returns this rank's device.

    ``timeout_s`` bounds every collective: a rank that dies or hangs makes the others fail after at most
    that long instead of waiting for ever.
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
        backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart == "0":
            dist.init_process_group(backend, timeout=timeout)
        else:
            # After a torchrun restart the rendezvous store still holds the dead round's addresses under
            # the same keys, and a rank may connect to a peer that no longer exists. A per-round prefix
            # keeps each round's keys apart.
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                 is_master=rank == 0 and not hosted, timeout=timeout)
            store = dist.PrefixStore(f"saef/restart-{restart}/", base)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return this


class DistributedWorker(TrainerBase):
    """One rank of a distributed run: the counterpart of :class:`~saef.simulator.Simulator` for W = 1.

    Rank r is worker r. The model is broadcast from rank 0 at construction; the rank computes the gradient
    of its own shard at its gradient point z_r with ordinary autograd, and :class:`ErrorFeedback` does the
    rest through a :class:`DistributedTransport`. BatchNorm: running statistics are per rank and averaged
    (one all-reduce) when a model is loaded for evaluation, as in the simulator.

    Args:
        model: this rank's copy of the model (on this rank's device).
        server: ``"sharded"`` or ``"rank0"``.
        Others: see :class:`~saef.algorithm.ErrorFeedbackConfig`.
    """

    cheap_diagnostics = False  # the mismatch terms need a dense all-reduce: computed once per epoch

    def __init__(self, model: nn.Module, *, method="saef", compressor="sign", server_compressor=None, momentum=0.0,
                 weight_decay=0.0, double_way=True, average_every=None, server="sharded", loss_fn=None):
        import torch.nn.functional as F

        config = ErrorFeedbackConfig(method=method, momentum=momentum, weight_decay=weight_decay, compressor=compressor,
                                     server_compressor=server_compressor, double_way=double_way, average_every=average_every)
        self.model = model
        self.loss_fn = loss_fn or F.cross_entropy
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor, src=0)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.x = flatten([p.detach() for p in self.params]).clone()
        self.transport = DistributedTransport([p.numel() for p in self.params], server, dtype=self.x.dtype, device=self.x.device)
        self.algorithm = ErrorFeedback(self.shapes, config, self.transport)
        self.state = self.algorithm.init_state(self.x)
        self.rank, self.workers = self.transport.rank, self.transport.num_workers
        self.local_workers = [self.rank]
        self.is_main = self.rank == 0

    def step(self, inputs: Tensor, targets: Tensor, lr: float) -> Tensor:
        """One step on this rank's shard of the global batch; returns this rank's loss."""
        self.model.train()
        self.algorithm.write_gradient_points(self.state, self.x, [p.data for p in self.params])
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.model(inputs), targets)
            loss.backward()
        # Per layer, straight from .grad: a flat copy of 5M gradients cost more than the optimizer's arithmetic.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # Every rank must skip together: one int, min-reduced (a rank with a NaN vetoes the step).
        finite = all_finite(*grads, loss.detach()).to(torch.int32).reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise NonFiniteStep(f"non-finite loss or gradient on some rank (this rank's loss {loss.item()})")
        self.algorithm.step(self.state, self.x, grads, lr)
        return loss.detach()

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
        """This rank's share: x, its momentum and error, its layers' server error, its BatchNorm buffers."""
        return {
            "x": self.x.clone(),
            "algorithm": self.state.state_dict(),
            "buffers": {n: b.detach().clone() for n, b in self.model.named_buffers()},
            "wire": dict(self.transport.wire),
            "workers": self.workers,
            "rank": self.rank,
            "server": self.transport.server,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, object], reset_errors: bool = False) -> None:
        """Restore this rank's saved share exactly; with ``reset_errors``, keep only x, the counters and
        the running statistics (from rank 0's file), with momentum and errors from zero."""
        if state["x"].shape != self.x.shape:
            raise ValueError(f"state has {state['x'].numel()} parameters, the model has {self.x.numel()}")
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
        self.x.copy_(state["x"])
        if reset_errors:
            for key in ("step", "bits_up", "bits_down", "bits_averaging"):
                setattr(self.state, key, int(state["algorithm"][key]))
            return
        if (state["workers"], state["rank"], state["server"]) != (self.workers, self.rank, self.transport.server):
            raise ValueError("state was saved by another rank, number of workers or server placement")
        self.state.load_state_dict(state["algorithm"])
        self.transport.wire.update(state["wire"])
