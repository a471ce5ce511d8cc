"""Real multi-process training on ``torch.distributed``: one worker per rank.

Launch (one process per worker; gloo on CPU, NCCL on GPU, chosen from the device)::

    torchrun --nproc_per_node 4 -m saef train --backend dist --compressor sign
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m saef train --backend dist ...

One module per concern: :mod:`.transport` (:class:`DistributedTransport`, what crosses the network),
:mod:`.owners` (:func:`assign_layers`, which rank serves each layer), :mod:`.groups` (the per-direction
process groups and their timeout), :mod:`.rendezvous` (:func:`init_distributed`, joining the job within a
timeout), :mod:`.trainer` (:class:`DistributedTrainer`, one rank's trainer) and :mod:`.backend`
(:class:`DistributedBackend`, ``--backend dist``), and :mod:`.hook` (:class:`CommHookState`,
:func:`comm_hook`: saef as a DDP communication hook), :mod:`.fsdp` (:func:`compress_replicas`: the replica
exchange of FSDP2's hybrid sharding, compressed).

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

Every mean is computed with the simulator's arithmetic: the owner of a layer adds the K rows in rank
order (``decode_mean_layers``), and dense means (error averaging, the uncompressed baseline) go through
:meth:`DistributedTransport.exact_mean` -- an ``all_to_all_single`` that gives each rank 1/K of the
columns of every rank, a sum in rank order, and an ``all_gather`` -- which moves as many bytes as a ring
all-reduce but, unlike it, adds in a fixed order. So, given the same gradients, a distributed run and
the simulator produce the same parameters bit for bit.
"""

from .backend import DistributedBackend
from .groups import direction_groups
from .fsdp import ReplicaCompression, compress_replicas
from .hook import CommHookState, comm_hook, local_gradients_hook
from .owners import assign_layers
from .rendezvous import RendezvousTimeout, init_distributed
from .transport import SERVERS, DistributedTransport
from .trainer import DistributedTrainer

__all__ = ["DistributedTransport", "DistributedTrainer", "DistributedBackend", "init_distributed", "RendezvousTimeout",
           "assign_layers", "direction_groups", "SERVERS", "CommHookState", "comm_hook", "local_gradients_hook",
           "compress_replicas", "ReplicaCompression"]
