"""One rank of a distributed run: the trainer the loop drives, over a :class:`DistributedTransport`."""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...core import (Algorithm, AlgorithmConfig, NonFiniteStep, TrainerBase, all_finite, check_dense,
                     check_precision, flatten, model_penalty, write_flat)
from ...core.overlap import OverlappedStep
from .transport import DistributedTransport

__all__ = ["DistributedTrainer"]


class DistributedTrainer(TrainerBase):
    """One rank of a distributed run: the counterpart of :class:`~saef.backends.simulator.Simulator` for W = 1.

    Rank r is worker r. The model is broadcast from rank 0 at construction; the rank computes the gradient
    of its own shard at its gradient point z_r with ordinary autograd, and :class:`Algorithm` does the
    rest through a :class:`DistributedTransport`. BatchNorm: running statistics are per rank and averaged
    (one all-reduce) when a model is loaded for evaluation, as in the simulator.

    Args:
        model: this rank's copy of the model (on this rank's device).
        config: the algorithm (:class:`~saef.core.AlgorithmConfig`), or its settings as keywords.
        server: ``"sharded"`` or ``"rank0"``. Where nothing is compressed either way, the mean travels as
            in an all-reduce instead (``"allreduce"``), whatever is asked.
        precision: ``"fp32"`` or ``"bf16"`` (the forward under autocast), as for the simulator.
        overlap_bytes: 0 (the default): the step's exchanges start after backward. Else buckets of at most
            this many bytes of gradients are compressed and sent while backward makes the rest
            (:class:`~saef.core.overlap.OverlappedStep`): the same parameters, state and bits.
    """

    cheap_diagnostics = False  # the mismatch terms need a dense all-reduce: computed once per epoch

    def __init__(self, model: nn.Module, *, config: AlgorithmConfig = None, server: str = "sharded", loss_fn=None,
                 precision: str = "fp32", overlap_bytes: int = 0, **algorithm):
        import torch.nn.functional as F

        config = AlgorithmConfig.build(config, **algorithm)
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
        # Flights served as their uplinks arrive need a group per direction: on gloo. On NCCL, collectives of
        # several communicators started in other orders on each rank can hang, so the fixed schedule.
        apart = bool(overlap_bytes) and server != "allreduce" and dist.get_backend() == "gloo"
        self.transport = DistributedTransport([p.numel() for p in self.params], server, dtype=self.x.dtype, device=self.x.device,
                                              directions_apart=apart)
        self.algorithm = Algorithm(self.shapes, config, self.transport)
        self.state = self.algorithm.init_state(self.x)
        self.overlapped = OverlappedStep(self.algorithm, self.params, overlap_bytes, self.transport.all_finite) \
            if overlap_bytes else None
        self.rank, self.num_workers = self.transport.rank, self.transport.num_workers
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
        return t.item() / self.num_workers

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
                target.copy_(mean / self.num_workers)
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
            "workers": self.num_workers,
            "rank": self.rank,
            "server": self.transport.server,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, object], reset_errors: bool = False) -> None:
        """Restore this rank's saved share exactly; with ``reset_errors``, keep only x, the counters and
        the running statistics (from rank 0's file), with the algorithm's state started from x."""
        if not reset_errors and (state["workers"], state["rank"], state["server"]) != (self.num_workers, self.rank, self.transport.server):
            raise ValueError("state was saved by another rank, number of workers or server placement")
        self._load_algorithm_state(state, reset_errors)
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
