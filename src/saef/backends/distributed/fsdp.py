"""saef over the replica dimension of FSDP2: hybrid sharding whose replica exchange is compressed.

FSDP2 (``torch.distributed.fsdp.fully_shard``) on a 2-D mesh ``(replicate, shard)`` reduce-scatters the
gradients within each shard group and then all-reduces the shards across replicas (HSDP). Across replicas is
where the slow links usually are (hosts, sites), so that is what saef compresses: shard the model over the
``shard`` dimension only, and let :func:`compress_replicas` take the replica exchange::

    >>> mesh = init_device_mesh("cuda", (replicas, shards), mesh_dim_names=("replicate", "shard"))
    >>> for block in model.blocks:
    ...     fully_shard(block, mesh=mesh["shard"])
    >>> fully_shard(model, mesh=mesh["shard"])
    >>> state = saef.compress_replicas(model, mesh.get_group("replicate"), compressor="topk:0.01", method="ef")
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

Every FSDP unit (each module given to ``fully_shard``) hands its reduce-scatter output -- this rank's flat
shard of the unit's gradients, averaged over the shard group -- to FSDP2's public all-reduce hook
(``FSDPModule.set_all_reduce_hook``); saef exchanges it over the replica group as the DDP hook exchanges a
bucket (:class:`~saef.backends.distributed.hook.GradientExchange`: EF, direct or EF21, errors kept per unit
and rank), cut into one piece per replica so that the sharded server spreads the work. The identity
compressor averages with one all-reduce, as HSDP does. A shard with a NaN or Inf on any replica is averaged
as it is, its errors untouched.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ...core import AlgorithmConfig
from .hook import GradientExchange, reply_compressed, vote

__all__ = ["ReplicaCompression", "compress_replicas"]


class ReplicaCompression:
    """The compressed replica exchange of every FSDP unit of a model (:func:`compress_replicas` makes it).

    ``bits`` counts this rank's traffic over the replica group; ``state_dict`` / ``load_state_dict`` hold its
    errors per unit (units in the order FSDP2 lists them; a state of another rank is refused)."""

    def __init__(self, units: List[torch.nn.Module], group, config: AlgorithmConfig, server: str):
        self.group, self.config, self.server = group, config, server
        self.units = units
        self.replicas = dist.get_world_size(group)
        self._exchanges: Dict[int, GradientExchange] = {}
        self._loaded: Dict[int, dict] = {}
        self._warned = False
        for index, unit in enumerate(units):
            unit.set_all_reduce_hook(lambda output, index=index: self._average(index, output))

    def _pieces(self, output: Tensor) -> List[Tensor]:
        """The flat shard cut into one piece per replica (the last ones shorter where it does not divide)."""
        size = -(-output.numel() // self.replicas)
        return [piece for piece in torch.split(output.view(-1), size) if piece.numel()]

    def _average(self, index: int, output: Tensor) -> None:
        finite = self.config.lossless or vote(output, [], self.group)[0]
        if not finite and not self._warned:
            self._warned = True
            warnings.warn("saef.compress_replicas: a gradient holds a NaN or Inf (on some replica); that shard is "
                          "averaged as it is, and its errors are left as they were (warned once)", stacklevel=2)
        if self.config.lossless or not finite:  # HSDP's all-reduce of the shards
            output.div_(self.replicas)
            dist.all_reduce(output, group=self.group)
            return
        pieces = self._pieces(output)
        exchange = self._exchanges.get(index)
        if exchange is None:
            ids = [index * self.replicas + i for i in range(len(pieces))]  # (each piece's random draws its own)
            exchange = GradientExchange([(p.numel(),) for p in pieces], ids, self.config, self.server, self.group,
                                        output.dtype, output.device)
            saved = self._loaded.pop(index, None)
            if saved is not None:
                exchange.state.load_state_dict(saved)
            self._exchanges[index] = exchange
        exchange.average(pieces)

    @property
    def bits(self) -> Dict[str, int]:
        total = {"bits_up": 0, "bits_down": 0, "bits_averaging": 0}
        for exchange in self._exchanges.values():
            for name, bits in exchange.transport.ledger.per_worker().items():
                total[name] += bits
        return total

    def state_dict(self) -> Dict[str, object]:
        return {"rank": dist.get_rank(), "units": {i: e.state.state_dict() for i, e in self._exchanges.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` before the first backward (each unit's state goes in when it first
        hands over its shard). Another rank's state is refused: its errors are that rank's shard's."""
        if not isinstance(state, dict) or {"rank", "units"} - set(state):
            raise ValueError("not a saef.compress_replicas state (from its state_dict())")
        if state["rank"] != dist.get_rank():
            raise ValueError(f"this state is rank {state['rank']}'s; this is rank {dist.get_rank()}: each rank loads its own")
        if self._exchanges:
            raise ValueError("load the state before the first backward (the exchanges are in use)")
        self._loaded = {int(i): s for i, s in state["units"].items()}


def _native_hsdp(unit) -> bool:
    """Whether FSDP2 all-reduces this unit across replicas itself (a 2-D mesh). (FSDP2's state is not public:
    read defensively, and taken as not HSDP where it cannot be read.)"""
    try:
        group = unit._get_fsdp_state()._fsdp_param_group
        return bool(group is not None and group._is_hsdp)
    except AttributeError:
        return False


def compress_replicas(module: torch.nn.Module, replicate_group, compressor: str = "topk:0.01", method: str = "ef", *,
                      server_compressor=None, double_way: Optional[bool] = None, server: str = "sharded",
                      average_every: Optional[int] = None, seed: int = 0) -> ReplicaCompression:
    """Compress the replica exchange of every FSDP unit in ``module`` (modules given to ``fully_shard`` on
    the shard dimension of the mesh) over ``replicate_group``; returns the :class:`ReplicaCompression`
    (bits, state). ``method``: ``"ef"``, ``"direct"`` or ``"ef21"`` (single-way), as for
    :class:`~saef.backends.distributed.hook.CommHookState`."""
    from torch.distributed.fsdp import FSDPModule

    if method == "saef":
        raise ValueError("method 'saef' takes each worker's gradient at x - e_k, which a gradient hook cannot choose; "
                         "use method='ef' (or the saef.SAEF optimizer without FSDP)")
    double_way = reply_compressed(method, double_way, "over replicas")
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError("no module of this model is sharded with fully_shard: shard it on the mesh's shard dimension first")
    if any(_native_hsdp(unit) for unit in units):
        raise ValueError("this model is sharded on a 2-D mesh, so FSDP2 already all-reduces the replicas (HSDP) before "
                         "any hook: shard it with fully_shard(..., mesh=mesh['shard']) and give the replica group here")
    config = AlgorithmConfig(method=method, compressor=compressor, server_compressor=server_compressor, double_way=double_way,
                             average_every=average_every, seed=seed, momentum=0.0)
    return ReplicaCompression(units, replicate_group, config, server)
