"""K workers in one process: an exact simulator of Algorithm 1 for ``torch.nn.Module`` and for toy problems.

Both entry points run the same :class:`~saef.core.Algorithm` code as a real distributed run, with the
:class:`~saef.backends.inprocess.InProcessTransport`.

BatchNorm policy. Each worker normalises its own slice of the global batch with that slice's statistics,
as ordinary (non-synchronised) BatchNorm does on a real rank, and keeps its own running statistics. The
model that is evaluated (:meth:`Simulator.load_into`) gets the mean of the K workers' running statistics,
which is what the distributed transport computes with one all-reduce before evaluation.

Example::

    >>> sim = Simulator(model, workers=4, method="saef", compressor="topk:0.01", momentum=0.9)
    >>> for inputs, targets in batches:            # global batches, size divisible by 4
    ...     loss = sim.step(inputs, targets, lr=0.1)
    >>> sim.load_into(model, point="auxiliary")   # evaluate x~ = x - (e_s + mean_k e_k)
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (Algorithm, AlgorithmConfig, NonFiniteStep, TrainerBase, all_finite, check_precision, check_dense, flatten, model_penalty,
                    unflatten, write_flat)
from ..core.config import check_lr
from .base import Backend, resolve_device
from .inprocess import InProcessTransport
from .stacked import stack_model

__all__ = ["Simulator", "simulate", "SimulatorBackend"]


class Simulator(TrainerBase):
    """Train ``model`` with K simulated workers exchanging compressed updates (Algorithm 1).

    Each worker gets its own contiguous slice of every global batch and has its own momentum and error.
    The K gradients are computed together: by running the traced model on stacked parameters when it is
    built from common layers (:mod:`saef.backends.stacked`), else with ``torch.func.vmap``, else in a loop.

    Args:
        model: the module; its trainable parameters are x_0. The simulator owns the parameters from then
            on: call :meth:`load_into` to put x or x~ into a module for evaluation.
        workers: K >= 1.
        config: the algorithm (:class:`~saef.core.AlgorithmConfig`); or give its settings as keywords
            (``method``, ``optimizer``, ``compressor``, ``server_compressor``, ``momentum`` or Adam's
            ``betas`` and ``eps``, ``weight_decay``, ``double_way``, ``average_every``, ``warmup_steps``, ``seed``).
        loss_fn: ``loss_fn(outputs, targets)``, mean over the batch. Default: cross entropy.
        vectorize: ``"auto"`` (stacked layers or vmap, falling back to a loop with a warning; a loop for
            a model whose ``simulate_in_loop`` is true, as the GPT's), ``True``
            (stacked layers or vmap, errors are raised), ``"vmap"`` (vmap only, errors are raised) or
            ``False`` (a loop over workers).
        precision: ``"fp32"``, or ``"bf16"``: the model's forward (and so its backward) under autocast on
            the parameters' device; the loss, the parameters and the algorithm's state stay fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        workers: int,
        config: Optional[AlgorithmConfig] = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        vectorize: Union[str, bool] = "auto",
        precision: str = "fp32",
        **algorithm,
    ):
        config = AlgorithmConfig.build(config, **algorithm)
        self.precision = check_precision(precision)
        if vectorize not in ("auto", True, False, "vmap"):
            raise ValueError(f"vectorize must be 'auto', True, 'vmap' or False, got vectorize={vectorize!r}")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters")
        self.model = model
        self.loss_fn = loss_fn
        self.vectorize = vectorize
        self.names = [n for n, _ in trainable]
        self.shapes = [tuple(p.shape) for _, p in trainable]
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.transport = InProcessTransport(workers)
        self.algorithm = Algorithm(self.shapes, config, self.transport)
        self.num_workers = workers
        self.rank = 0
        self.worker_ids = list(range(workers))  # the workers whose shards this trainer is fed
        self.is_main = True  # writes records (the distributed trainer: rank 0 only)
        self.x = flatten([p.detach() for _, p in trainable]).clone()
        self.state = self.algorithm.init_state(self.x)
        # Per-worker running statistics (BatchNorm): (K, ...) copies of every buffer.
        self.buffers: Dict[str, Tensor] = {
            n: b.detach().unsqueeze(0).repeat(workers, *([1] * b.dim())) for n, b in model.named_buffers()
        }
        if vectorize == "auto" and getattr(model, "simulate_in_loop", False):  # the model measured a loop fastest
            self.vectorize = False
        self.stacked = stack_model(model) if self.vectorize in ("auto", True) else None
        self._stacked_checked = False  # whether one stacked step has succeeded

    # --- training ----------------------------------------------------------------------------------
    def step(self, inputs: Tensor, targets: Tensor, lr: float) -> Tensor:
        """One step on a global batch; returns the mean of the K workers' losses (a 0-d tensor)."""
        k = self.num_workers
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets differ in batch size: {inputs.shape[0]} vs {targets.shape[0]}")
        if inputs.shape[0] % k:
            raise ValueError(f"global batch of {inputs.shape[0]} samples is not divisible by workers={k}")
        inputs = inputs.reshape(k, -1, *inputs.shape[1:])
        targets = targets.reshape(k, -1, *targets.shape[1:])
        points = self.algorithm.gradient_points(self.state, self.x)
        grads, losses = self._gradients(points, inputs, targets)
        listed = [grads] if isinstance(grads, Tensor) else list(grads)
        check_dense(listed)
        if not bool(all_finite(*listed, losses)):
            raise NonFiniteStep(f"non-finite loss or gradient (losses {losses.tolist()})")
        self.algorithm.step(self.state, self.x, grads, lr)
        return losses.mean()

    def _forward(self, params: Sequence[Tensor], buffers: Dict[str, Tensor], inputs: Tensor) -> Tensor:
        """One worker's outputs with the trainable parameters ``params`` (in the model's order)."""
        params = dict(zip(self.names, params))
        params.update(self.frozen)
        return self.run_forward(torch.func.functional_call, self.model, (params, buffers), (inputs,))

    def _gradients(self, points: Tensor, inputs: Tensor, targets: Tensor):
        """The gradients of the K workers' losses at their points -- one ``(K, *shape)`` tensor per layer, or
        one ``(K, P)`` tensor from the loop -- and the (K,) losses.

        Vectorised: one forward of all workers (stacked, or vmap-ed), then one ordinary backward of the sum
        of the workers' losses (each worker's loss depends on its own row of ``points`` only, so the
        gradient of the sum with respect to row k is worker k's gradient). This is cheaper than vmap over
        ``torch.func.grad`` because the backward runs as plain batched kernels."""
        self.model.train()
        if self.stacked is not None:
            try:
                if self._stacked_checked:
                    return self._stacked_gradients(points, inputs, targets, self.buffers)
                # First call: on copies of the running statistics, so that a failure half-way through
                # the layers leaves them as they were for vmap.
                trial = {n: b.clone() for n, b in self.buffers.items()}
                result = self._stacked_gradients(points, inputs, targets, trial)
                for name, value in trial.items():
                    self.buffers[name].copy_(value)
                self._stacked_checked = True
                return result
            except Exception as error:  # noqa: BLE001 -- vmap and the loop remain; say why once
                if self.vectorize is True:
                    raise
                warnings.warn(f"stacked layers failed ({type(error).__name__}: {error}); using vmap")
                self.stacked = None
        if self.vectorize is not False:
            try:
                with torch.enable_grad():
                    leaves = self._leaves(points)
                    outputs = torch.func.vmap(self._forward, randomness="different")(leaves, self.buffers, inputs)
                    losses = self._penalised(torch.func.vmap(self.loss_fn)(outputs, targets), leaves)
                    grads = _gradients_of(losses.sum(), leaves)
                return grads, losses.detach()
            except Exception as error:  # a model vmap cannot batch: fall back to the loop for good
                if self.vectorize in (True, "vmap"):
                    raise
                warnings.warn(f"vmap failed ({type(error).__name__}: {error}); computing worker gradients in a loop")
                self.vectorize = False
        grads, losses = [], []
        for k in range(self.num_workers):
            with torch.enable_grad():
                leaves = self._leaves(points[k : k + 1])
                worker = tuple(leaf[0] for leaf in leaves)
                loss = self.loss_fn(self._forward(worker, {n: b[k] for n, b in self.buffers.items()}, inputs[k]), targets[k])
                loss = self._penalised(loss.unsqueeze(0), leaves)[0]
                grads.append(torch.cat([g.reshape(1, -1) for g in _gradients_of(loss, leaves)], dim=1))
            losses.append(loss.detach())
        return torch.cat(grads), torch.stack(losses)

    def _penalised(self, losses: Tensor, leaves) -> Tensor:
        """The workers' losses (W,) plus the model's own penalty on their parameters, if it has one."""
        penalty = model_penalty(self.model, leaves)
        return losses if penalty is None else losses + penalty

    def _leaves(self, points: Tensor) -> tuple:
        """One leaf per parameter, ``(W, *shape)``, viewing the rows of ``points``.

        Gradients are taken with respect to these rather than the flat ``(W, P)`` points: a slice's
        backward fills a zero ``(W, P)`` tensor, once per layer, which on ResNet-20 with K = 16 cost more
        than the convolutions."""
        return tuple(v.requires_grad_(True) for v in unflatten(points.detach(), self.shapes))

    def _stacked_gradients(self, points: Tensor, inputs: Tensor, targets: Tensor, buffers: Dict[str, Tensor]):
        """As :meth:`_gradients`, with the traced model run on stacked parameters (no vmap); running
        statistics in ``buffers`` are updated in place."""
        k = self.num_workers
        with torch.enable_grad():
            leaves = self._leaves(points)
            params = dict(zip(self.names, leaves))
            params.update({n: p.expand(k, *p.shape) for n, p in self.frozen.items()})
            outputs = self.run_forward(self.stacked, params, buffers, inputs)
            if self.loss_fn is F.cross_entropy:  # one kernel for all workers
                per_sample = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none").view(k, -1)
                if targets.is_floating_point():  # class probabilities: a plain mean
                    losses = per_sample.mean(1)
                else:  # like the default reduction: the mean over targets that are not ignore_index (-100)
                    losses = per_sample.sum(1) / (targets.reshape(k, -1) != -100).sum(1)
            else:
                losses = torch.func.vmap(self.loss_fn)(outputs, targets)
            losses = self._penalised(losses, leaves)
            grads = _gradients_of(losses.sum(), leaves)
        return grads, losses.detach()

    # --- evaluation and diagnostics ---------------------------------------------------------------
    cheap_diagnostics = True  # the mismatch terms cost a few (K, P) operations: fine every step

    def average(self, value: float) -> float:
        """Mean of a number over processes: here there is one."""
        return value

    @torch.no_grad()
    def load_into(self, model: Optional[nn.Module] = None, point: str = "x") -> nn.Module:
        """Write x (or x~) and the workers' mean running statistics into ``model`` (default: the model
        given at construction) and return it."""
        model = self.model if model is None else model
        params = dict(model.named_parameters())
        write_flat([params[name] for name in self.names], self.parameters_at(point), self.shapes)
        buffers = dict(model.named_buffers())
        for name, stacked in self.buffers.items():
            buffers[name].copy_(stacked.mean(0) if stacked.is_floating_point() else stacked[0])
        return model

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {**self._algorithm_state(), "buffers": {n: b.clone() for n, b in self.buffers.items()}, "workers": self.num_workers}

    def load_state_dict(self, state: Dict[str, object], reset_errors: bool = False) -> None:
        """Restore a saved state exactly; with ``reset_errors``, keep only x, the mean running statistics
        and the counters, and start the algorithm's state from x (allows another number of workers)."""
        if not reset_errors and state["workers"] != self.num_workers:
            raise ValueError(f"state was saved with workers={state['workers']}, this simulator has {self.num_workers}")
        self._load_algorithm_state(state, reset_errors)
        for name, value in state["buffers"].items():
            if reset_errors:  # the mean of the saved workers' statistics, for every worker
                value = (value.mean(0) if value.is_floating_point() else value[0]).unsqueeze(0).expand_as(self.buffers[name])
            self.buffers[name].copy_(value)


def _gradients_of(loss: Tensor, leaves) -> tuple:
    """d loss / d leaves; a parameter the forward does not use gets a zero gradient (as a real rank would
    send zeros for it) instead of an error."""
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def simulate(
    grad_fn: Callable[[int, List[Tensor]], Sequence[Tensor]],
    x0: Sequence[Tensor],
    *,
    workers: int,
    steps: int,
    lr: Union[float, Callable[[int], float]],
    config: Optional[AlgorithmConfig] = None,
    **algorithm,
) -> List[Tensor]:
    """Run the algorithm on a toy problem and return the final parameters x_T (the model iterate).

    ``grad_fn(k, x)`` returns worker k's (stochastic) gradient at the point ``x`` (a list of tensors shaped
    like ``x0``). Computation is in the dtype of ``x0`` (float64 works). ``lr`` is a number or a function of
    the step index t. The algorithm is ``config`` (:class:`~saef.core.AlgorithmConfig`), or its settings
    as keywords: ``method`` ("saef", "ef", "ef21", "direct"), ``compressor``, ``server_compressor``,
    ``optimizer`` ("sgd", "adam"), ``momentum`` (sgd) or ``betas`` and ``eps`` (adam), ``weight_decay``,
    ``double_way``, ``average_every``, ``warmup_steps``, ``seed``.

    Example (two workers, each pulling towards its own target, sign compression)::

        >>> targets = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])]
        >>> x = saef.simulate(lambda k, x: [x[0] - targets[k]], [torch.zeros(2)],
        ...                   workers=2, steps=200, lr=0.1, method="saef")
    """
    config = AlgorithmConfig.build(config, **algorithm)
    x0 = list(x0)
    if not x0 or not all(isinstance(t, Tensor) for t in x0):
        raise ValueError("x0 must be a non-empty list of tensors")
    if any(t.dim() == 0 for t in x0):
        raise ValueError(f"x0 must hold tensors of at least one dimension (a scalar as shape (1,)), got shapes "
                         f"{[tuple(t.shape) for t in x0]}")
    if len({(t.dtype, t.device) for t in x0}) != 1:
        raise ValueError("all tensors of x0 must share one dtype and device")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got steps={steps!r}")
    lr_at = lr if callable(lr) else (lambda t: lr)
    if not callable(lr):
        check_lr(lr, " (or give a function of the step)", x0[0].dtype)
    shapes = [tuple(t.shape) for t in x0]
    algorithm = Algorithm(shapes, config, InProcessTransport(workers))
    x = flatten([t.detach() for t in x0]).clone()
    state = algorithm.init_state(x)
    grads = x.new_empty(workers, x.numel())
    skipped = 0
    for t in range(steps):
        points = algorithm.gradient_points(state, x)
        for k in range(workers):
            grads[k] = flatten(_checked_gradient(grad_fn, k, unflatten(points[k], shapes), shapes))
        if not bool(all_finite(grads)):  # a NaN or Inf never enters the state: the step is skipped
            skipped += 1
            continue
        algorithm.step(state, x, grads, float(lr_at(t)))
    if skipped:
        warnings.warn(f"simulate: {skipped} of {steps} steps skipped (a gradient held a NaN or Inf)", stacklevel=2)
    return [v.clone() for v in unflatten(algorithm.point(state, x, "x"), shapes)]


def _checked_gradient(grad_fn, k: int, point: List[Tensor], shapes) -> List[Tensor]:
    returned = grad_fn(k, point)
    try:
        g = None if isinstance(returned, Tensor) else list(returned)
    except TypeError:  # None, a number, ...
        g = None
    if g is None or not all(isinstance(gi, Tensor) for gi in g):
        got = type(returned).__name__ + (f" of {[type(gi).__name__ for gi in g]}" if g is not None else "")
        raise ValueError(f"grad_fn({k}, x) must return worker {k}'s gradients as a list of tensors shaped "
                         f"{shapes}, got {got}")
    if len(g) != len(shapes) or any(tuple(gi.shape) != s for gi, s in zip(g, shapes)):
        got = [tuple(gi.shape) for gi in g]
        raise ValueError(f"grad_fn({k}, x) returned gradients of shapes {got} for worker {k}, expected {shapes}")
    return g


class SimulatorBackend(Backend):
    """``--backend sim``: K workers in this process (:class:`Simulator`)."""

    name = "sim"

    def start(self, workers: int):
        self.workers = workers
        return resolve_device(self.device_name), workers

    def ignored(self) -> List[str]:
        """One process has no peer to wait for, no server to place and no exchange to overlap."""
        default = Backend()
        given = {"server": self.server != default.server, "timeout": self.timeout != default.timeout,
                 "overlap": self.overlap_bytes != default.overlap_bytes}
        return [name for name, changed in given.items() if changed]

    def make_trainer(self, model: nn.Module, config: AlgorithmConfig, precision: str = "fp32") -> Simulator:
        return Simulator(model, workers=self.workers, config=config, precision=precision)
