"""saef as a DDP communication hook: compressed gradients with error feedback inside a user's DDP model, any
torch optimizer on top.

    >>> state = saef.CommHookState(compressor="topk:0.01", method="ef", module=model)
    >>> ddp = torch.nn.parallel.DistributedDataParallel(model)
    >>> ddp.register_comm_hook(state, saef.comm_hook)
    >>> opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)          # ... and train as usual

What DDP hands the hook is a bucket of gradients; the hook compresses each parameter of it on its own
(layer-wise, as everywhere in saef) and returns, per parameter, with g_k this rank's gradient:

* ``ef``: D_k = g_k + e_k; c_k = C(D_k); e_k = D_k - c_k; the mean compressed again by the server with its own
  error (double-way, the default): gradient C_s(e_s + mean_k c_k), e_s = what C_s left out; single-way:
  mean_k c_k, sent back dense;
* ``direct``: C_s(mean_k C(g_k)) (single-way: mean_k C(g_k));
* ``ef21``: EF21's estimate g = mean_k g_k, each g_k moved by C(g_k' - g_k) (single-way only: EF21-P's
  downlink moves a copy of the model, which a gradient hook has not);
* the identity compressor: DDP's own all-reduce (times 1 / the world size, then summed), bit for bit.

The exchange is saef's (:class:`~saef.backends.distributed.DistributedTransport`: each parameter's payload
to the rank that serves it, only packed payloads on the wire; its bits are counted in :attr:`CommHookState.bits`).
Errors are kept per parameter, not per bucket, so they survive DDP's rebuild of its buckets after the first
iteration (a double-way server error moves to the parameter's new server with one all-reduce then).
``saef`` itself is not offered: its gradient is taken at x - e_k, which a hook cannot choose (use the
``saef.SAEF`` optimizer). The hook runs the exchange when DDP hands it the bucket, and backward waits for it
(``overlap=True``: in a thread of the hook's, while backward computes the next buckets).
A bucket whose gradient holds a NaN or Inf on any rank is all-reduced as DDP would (the NaN reaches the
optimizer, e.g. for a GradScaler to skip), with the errors left as they were and a warning once.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ...core import Algorithm, AlgorithmConfig, all_finite
from .transport import DistributedTransport

__all__ = ["CommHookState", "comm_hook", "local_gradients_hook", "GradientExchange", "vote", "reply_compressed"]


class GradientExchange:
    """The algorithm over a list of gradient tensors exchanged together (the parameters of a DDP bucket, or
    the pieces of an FSDP unit's shard), with momentum 0 and lr 1, stepped on a zero x: what x becomes is
    minus the averaged gradient, which :meth:`average` writes back into the gradients."""

    def __init__(self, shapes, ids, config, server, group, dtype, device, params=(), load=None):
        self.params = params
        self.transport = DistributedTransport([math.prod(s) for s in shapes], server, group, dtype, device, load=load)
        self.algorithm = Algorithm([tuple(s) for s in shapes], config, self.transport, ids=ids)
        self.x = torch.zeros(self.algorithm.num_params, dtype=dtype, device=device)
        self.state = self.algorithm.init_state(self.x)

    def columns(self, name: str, i: int):
        return self.algorithm.layer_columns(name, i)

    def average(self, grads: List[Tensor]) -> None:
        """Each of ``grads`` (this rank's) replaced by its exchanged average, in place."""
        self.x.zero_()
        self.algorithm.step(self.state, self.x, [g.reshape(1, -1) for g in grads], 1.0)  # x = 0 - (the gradient)
        for g, s in zip(grads, self.algorithm.layout.slices):
            torch.neg(self.x[s].view_as(g), out=g)


class CommHookState:
    """The state of :func:`comm_hook` for one DDP model (``ddp.register_comm_hook(state, saef.comm_hook)``).

    Args:
        process_group: the group DDP averages over (default: the world).
        compressor: the workers' compressor spec (``"topk:0.01"``, ``"sign"``, ``"powersgd:2"``, ...).
        method: ``"ef"`` (error feedback), ``"direct"`` (no feedback, for unbiased compressors) or ``"ef21"``.
        server_compressor, double_way: the server's reply compressed too, with its own error (the default for
            ef and direct: a dense reply would move as many bytes as the uplink saves); ef21 is single-way.
        server: ``"sharded"`` (each rank serves a balanced share of the parameters) or ``"rank0"``.
        average_every: ef: every p iterations the workers' errors are replaced by their mean.
        seed: of random compressors' draws. warmup_steps: the first N iterations all-reduce dense gradients.
        module: the model (before or after wrapping): its parameter names key :meth:`state_dict`.
        overlap: run each bucket's exchange in a thread of its own, so that backward goes on computing the next
            buckets meanwhile (DDP waits for every bucket at the end of backward; the results are the same, tested
            on gloo). It makes a process group of the same ranks for the hook, so that DDP's own collectives never
            interleave with it (built by the group's ranks only; :meth:`close` ends the thread and the group).
    """

    def __init__(self, process_group=None, compressor: str = "topk:0.01", method: str = "ef", *, server_compressor=None,
                 double_way: Optional[bool] = None, server: str = "sharded", average_every: Optional[int] = None, seed: int = 0,
                 warmup_steps: int = 0, module: Optional[torch.nn.Module] = None, overlap: bool = False):
        if method == "saef":
            raise ValueError("method 'saef' takes each worker's gradient at x - e_k, which a communication hook cannot "
                             "choose (DDP computes it at the parameters): use the saef.SAEF optimizer for SAEF, or "
                             "method='ef' here")
        double_way = reply_compressed(method, double_way, "in the hook")
        self.config = AlgorithmConfig(method=method, compressor=compressor, server_compressor=server_compressor,
                                      double_way=double_way, average_every=average_every, seed=seed,
                                      warmup_steps=warmup_steps, momentum=0.0)
        self.group, self.server = process_group, server
        self.overlap, self._thread = bool(overlap), None
        if self.overlap:  # (a group of the same ranks: collectives from the hook's thread have it to themselves)
            base = process_group if process_group is not None else dist.group.WORLD
            self.group = dist.new_group(dist.get_process_group_ranks(base), backend=dist.get_backend(base),
                                        use_local_synchronization=True)
        # (names as the plain module has them: a DDP wrapper's "module." prefix is dropped, so a state saved with
        # either loads with the other)
        self.names = {p: n.removeprefix("module.") for n, p in module.named_parameters()} if module is not None else None
        self._ids: Dict[Tensor, int] = {}  # each parameter's layer id (its random draws derive from it)
        self._buckets: Dict[tuple, GradientExchange] = {}
        self._where: Dict[Tensor, tuple] = {}  # each parameter's state: (bucket key, index in it)
        self._loaded: Dict[str, dict] = {}  # a loaded state, per parameter name, until its bucket is made
        self._retired_bits = {"bits_up": 0, "bits_down": 0, "bits_averaging": 0}
        self._warned = self._warned_unused = False
        self.compositions = 0  # bucket compositions seen (more than DDP's buckets once it has rebuilt them)

    # --- the buckets DDP hands over -----------------------------------------------------------------------
    def _bucket(self, params: List[Tensor]) -> GradientExchange:
        key = tuple(id(p) for p in params)
        if key in self._buckets:
            return self._buckets[key]
        ids = [self._ids.setdefault(p, len(self._ids)) for p in params]
        sample = params[0]
        bucket = GradientExchange([tuple(p.shape) for p in params], ids, self.config, self.server, self.group, sample.dtype,
                                  sample.device, params, load=self._served(params))
        self.compositions += 1
        self._carry_over(bucket)
        for i, p in enumerate(params):
            self._where[p] = (key, i)
        self._buckets[key] = bucket
        for old in [k for k, b in self._buckets.items() if k != key and not any(self._where.get(p, (None,))[0] == k for p in b.params)]:
            retired = self._buckets.pop(old)  # no parameter's state lives there any more (DDP rebuilt its buckets)
            for name, bits in retired.transport.ledger.per_worker().items():
                self._retired_bits[name] += bits
        return bucket

    def _carry_over(self, bucket: GradientExchange) -> None:
        """Each parameter's state from where it was (a bucket of before the rebuild, or a loaded state)."""
        steps = []
        moved_server = torch.zeros_like(bucket.x) if "server_error" in bucket.state.tensors else None
        for i, p in enumerate(bucket.params):
            source = self._where.get(p)
            saved = self._loaded.pop(self.names[p], None) if self.names and p in self.names else None
            for name, tensor in bucket.state.tensors.items():
                if source is not None:
                    old = self._buckets[source[0]]
                    value = old.state.tensors[name][..., old.columns(name, source[1])]
                    steps.append(old.state.step)
                elif saved is not None:
                    value = saved[name]
                else:
                    continue
                target = tensor[..., bucket.columns(name, i)]
                if name == "server_error":  # owned by another rank now, perhaps: gathered below
                    moved_server[bucket.columns(name, i)] = value
                else:
                    target.copy_(value.reshape(target.shape))
        if steps or self._loaded_step is not None:
            bucket.state.step = max(steps) if steps else self._loaded_step
        if moved_server is not None and (steps or self._loaded_step is not None):
            dist.all_reduce(moved_server, group=self.group)  # every rank's owned parts, whole
            bucket.state.tensors["server_error"].copy_(bucket.algorithm.plan.only_owned(moved_server))

    _loaded_step: Optional[int] = None

    def _served(self, params: List[Tensor]) -> List[int]:
        """Elements each rank serves in the other buckets (those of parameters not in ``params``), so that a
        new bucket's owners balance the whole model rather than start from rank 0 every time."""
        ranks = dist.get_world_size(self.group)
        load = [0] * ranks
        new = {id(p) for p in params}
        for b in self._buckets.values():
            for p, owner in zip(b.params, b.transport.owner):
                if id(p) not in new:
                    load[owner] += p.numel()
        return load

    def submit(self, bucket, future: torch.futures.Future) -> None:
        """:meth:`exchange` of ``bucket`` in the hook's thread (one thread: buckets are exchanged in the order DDP
        hands them over, the same on every rank); ``future`` gets its result, or its exception."""
        if self._thread is None:
            from concurrent.futures import ThreadPoolExecutor

            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saef-hook")

        def run():
            try:
                future.set_result(self.exchange(bucket))
            except BaseException as error:  # (raised again by DDP at the end of backward)
                future.set_exception(error)

        self._thread.submit(run)

    def close(self) -> None:
        """With ``overlap``: end the hook's thread (after the exchanges under way) and its process group."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self.overlap and self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    def exchange(self, bucket) -> Tensor:
        """The averaged gradient of DDP's ``bucket`` (a ``dist.GradBucket``), written into its buffer."""
        buffer = bucket.buffer()
        if self.config.lossless:  # DDP's all-reduce, as it does it
            return _allreduce(buffer, self.group)
        params, grads = list(bucket.parameters()), list(bucket.gradients())
        finite, unused = vote(buffer, grads, self.group)
        if unused and not self._warned_unused:
            self._warned_unused = True
            warnings.warn("saef.comm_hook: a parameter's gradient is zero on every rank (unused, as DDP's "
                          "find_unused_parameters=True allows): DDP leaves its .grad as it was and drops what the hook "
                          "returns for it, so the part of its error sent in that step is lost (warned once)", stacklevel=2)
        if not finite:
            if not self._warned:
                self._warned = True
                warnings.warn("saef.comm_hook: a gradient holds a NaN or Inf (on some rank); that bucket is all-reduced "
                              "as DDP would, and the errors are left as they were (warned once)", stacklevel=2)
            return _allreduce(buffer, self.group)
        self._bucket(params).average(grads)
        if self._loaded and bucket.is_last():  # every bucket has been handed over once: what is left matched nothing
            names = ", ".join(sorted(self._loaded)[:3]) + (" ..." if len(self._loaded) > 3 else "")
            raise ValueError(f"the loaded hook state names parameters this model does not have ({names}): it was saved "
                             "from another model")
        return buffer

    # --- read-outs and state ------------------------------------------------------------------------------
    @property
    def bits(self) -> Dict[str, int]:
        """Cumulative bits this rank sent (up) and received (down) through the hook, and for error averaging."""
        total = dict(self._retired_bits)
        for b in self._buckets.values():
            for name, bits in b.transport.ledger.per_worker().items():
                total[name] += bits
        return total

    def state_dict(self) -> Dict[str, object]:
        """Every parameter's state by name (needs ``module=``), the iteration count, the bits, and this rank
        (a state is one rank's: its server errors are those of the parameters it serves)."""
        if self.names is None:
            raise ValueError("CommHookState.state_dict needs the parameters' names: build it with module=model")
        tensors, step = {}, 0
        for p, (key, i) in self._where.items():
            b = self._buckets[key]
            step = max(step, b.state.step)
            tensors[self.names[p]] = {name: t[..., b.columns(name, i)].clone() for name, t in b.state.tensors.items()}
        return {"rank": dist.get_rank(self.group), "world": dist.get_world_size(self.group), "step": step,
                "tensors": tensors, "bits": self.bits, "settings": {"method": self.config.method,
                "compressor": self.config.compressor.name, "double_way": self.config.double_way}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` before the first step (each parameter's state goes into its bucket when
        DDP first hands it over). A state of another rank, group size or compressor is refused."""
        if self.names is None:
            raise ValueError("CommHookState.load_state_dict needs the parameters' names: build it with module=model")
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        if not isinstance(state, dict) or {"rank", "world", "step", "tensors", "settings"} - set(state):
            raise ValueError("not a CommHookState state (from CommHookState.state_dict())")
        if (state["rank"], state["world"]) != (rank, world):
            raise ValueError(f"this state is rank {state['rank']}'s of {state['world']}; this is rank {rank} of {world}: "
                             "each rank loads its own (its errors, and the server errors of the parameters it serves)")
        ours = {"method": self.config.method, "compressor": self.config.compressor.name, "double_way": self.config.double_way}
        if state["settings"] != ours:
            raise ValueError(f"the state was saved with {state['settings']}, this hook has {ours}")
        sizes = {name: p.numel() for p, name in self.names.items()}
        for name, tensors in state["tensors"].items():
            error = tensors.get("worker_error") if isinstance(tensors, dict) else None
            if name in sizes and error is not None and error.numel() != sizes[name]:
                raise ValueError(f"the state's {name} has {error.numel()} elements, this model's has {sizes[name]}")
        if self._buckets:
            raise ValueError("load the hook's state before the first step (its parameters' state is in use)")
        self._loaded = {name: dict(tensors) for name, tensors in state["tensors"].items()}
        self._loaded_step = int(state["step"])
        self._retired_bits = dict(state.get("bits", self._retired_bits))


def vote(buffer: Tensor, grads: List[Tensor], group):
    """One all-reduce (min) of this rank's flags: whether the bucket is finite, and which gradients are zero.
    Returns (finite on every rank, whether some gradient is zero on every rank)."""
    flags = torch.tensor([1.0 if bool(all_finite(buffer)) else 0.0] + [0.0 if bool(g.any()) else 1.0 for g in grads],
                         device=buffer.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    return bool(flags[0].item()), bool(flags[1:].any().item())


def reply_compressed(method: str, double_way: Optional[bool], where: str) -> bool:
    """Whether the server's reply is compressed: by default for ef and direct, never for ef21 (EF21-P's
    downlink moves a copy of the model, not a gradient)."""
    if method == "ef21":
        if double_way:
            raise ValueError(f"ef21 {where} is single-way: EF21-P's downlink moves a copy of the model, not a gradient")
        return False
    return True if double_way is None else bool(double_way)


def comm_hook(state, bucket):
    """The DDP communication hook (``ddp.register_comm_hook(state, saef.comm_hook)``): the bucket's gradient,
    compressed and averaged as ``state`` (a :class:`CommHookState`) says (with ``overlap=True`` in the hook's
    thread, while backward goes on)."""
    future = torch.futures.Future()
    if state.overlap:
        state.submit(bucket, future)
    else:
        future.set_result(state.exchange(bucket))
    return future


def local_gradients_hook(state, bucket):
    """The DDP communication hook that exchanges nothing: each rank keeps its own gradient, for the
    ``saef.SAEF`` optimizer to compress and exchange (``ddp.register_comm_hook(None, saef.local_gradients_hook)``).
    The way to use ``saef.SAEF`` where a stack wraps the model in DDP itself (HF Trainer, Lightning)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


# (DDP checks a hook's annotations as objects; this module's are strings, so they are set here)
comm_hook.__annotations__ = {"state": CommHookState, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
local_gradients_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def _allreduce(buffer: Tensor, group) -> Tensor:
    """DDP's own averaging, as its reducer does it without a hook: multiply by 1 / (the group's size), then
    all-reduce the sum."""
    buffer.mul_(1.0 / dist.get_world_size(group))
    dist.all_reduce(buffer, group=group)
    return buffer
