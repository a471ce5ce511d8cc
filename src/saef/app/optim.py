"""A torch.optim-style facade over Algorithm 1 for users' own training loops.

Example (one process = one worker; with ``torch.distributed`` initialised and a distributed transport, each
rank is one of K workers)::

    >>> opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor="topk:0.01")
    >>> sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 150], gamma=0.1)
    >>> for inputs, targets in batches:
    ...     opt.zero_grad()
    ...     F.cross_entropy(model(inputs), targets).backward()
    ...     opt.step()
    ...     sched.step()
    >>> with opt.evaluation_point("auxiliary"):    # evaluate x~ (or "x")
    ...     evaluate(model)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ..backends.registry import hooks_without_exchange, optimizer_transport
from ..core import Algorithm, AlgorithmConfig, Transport, all_finite, check_dense, flatten, write_flat
from ..core.config import check_betas, check_eps, check_lr, check_momentum, check_weight_decay
from ..core.local import optimizer_class
from ..core.rounds import INNER_OPTIMIZERS

__all__ = ["SAEF"]


def _float(check):
    return lambda value: float(check(value))


# How each per-group setting is checked (and made hashable, to see whether the groups agree).
_CHECKS = {"momentum": _float(check_momentum), "weight_decay": _float(check_weight_decay), "betas": check_betas,
           "eps": _float(check_eps)}


def _differs(value: Tensor, written: Tensor) -> Union[bool, Tensor]:
    """Whether a parameter no longer holds what was written into it (a NaN where a NaN was written counts as
    the same). On the CPU a bool, from one pass that stops at the first difference; on an accelerator a 0-dim
    tensor, so that all parameters are read together (one synchronisation a step, not one a parameter)."""
    if value.device.type == "cpu" and torch.equal(value, written):
        return False
    return ~((value == written) | (value.isnan() & written.isnan())).all()


def _in_ddp(params) -> bool:
    """Whether a DistributedDataParallel module that averages gradients holds any of ``params`` (looked up once,
    among live objects): one without a hook that exchanges nothing (saef.local_gradients_hook, or torch's
    noop_hook)."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    quiet = hooks_without_exchange()
    ours = {id(p) for p in params}
    for obj in gc.get_objects():  # (type() rather than isinstance: some live objects warn when asked their class)
        if issubclass(type(obj), DistributedDataParallel) and any(id(p) in ours for p in obj.module.parameters()):
            hooks = [hook for hook, _ in getattr(obj, "_comm_hooks", [])]
            if not hooks or not any(hooks[-1] is hook for hook in quiet):
                return True
    return False


def _warn(message: str) -> None:
    """``warnings.warn`` attributed to the user's line: the first caller outside saef and torch (whose
    decorators stand between the user's ``opt.step()`` and the step)."""
    import os
    import sys

    inside = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)


def _checked_state(state_dict, shapes) -> Dict[str, object]:
    """The ``"state"`` of a saved ``saef.SAEF`` state, if it has every entry loading reads and its layers'
    shapes are ``shapes`` (a state saved before the shapes were recorded: its total size); else ValueError."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("not a saef.SAEF state: it needs 'state' and 'param_groups' (from SAEF.state_dict())")
    state = state_dict.get("state")
    missing = [k for k in ("x", "algorithm", "ledger") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"not a saef.SAEF state: its 'state' lacks {', '.join(map(repr, missing))} (a "
                         "torch.optim state cannot be loaded: SAEF keeps momentum and errors of its own)")
    for i, (saved, ours) in enumerate(zip(state.get("shapes", shapes), shapes)):
        if tuple(saved) != tuple(ours):
            raise ValueError(f"the state's layer {i} has shape {tuple(saved)}, the optimizer's has {tuple(ours)}")
    return state


def _settings_of(config: AlgorithmConfig):
    """The per-group settings of the config's local optimizer (with local steps: the inner optimizer's), in
    the order its ``set`` takes them."""
    if config.local_steps:
        return INNER_OPTIMIZERS[config.inner_optimizer].settings
    return optimizer_class(config.optimizer).settings


class SAEF(torch.optim.Optimizer):
    r"""Momentum SGD (or Adam) with compressed communication and a feedback rule (SAEF by default: Algorithm 1).

    Update rule of SAEF/EF at step t for this worker k (per parameter tensor; C = compressor, C_s =
    server's); ``method="ef21"`` and ``"direct"`` are stated in :mod:`saef.core.rules`::

        m_k <- mu m_k + grad f(z_k) + wd z_k          z_k = x - e_k (SAEF) or x (EF)
        D_k  = e_k + lr m_k;   e_k <- D_k - C(D_k);   send C(D_k)
        D    = e_s + mean_k C(D_k);   e_s <- D - C_s(D);   x <- x - C_s(D)
        every p steps: e_k <- mean_j e_j

    Between steps the module's parameters hold the gradient point z_k, so ``loss.backward()`` computes
    exactly the gradient the rule asks for. The model iterate x (and x~, where the rule defines it) is
    available through :meth:`evaluation_point`. With ``compressor="identity"`` every rule is exactly
    ``torch.optim.SGD``.

    ``optimizer="adam"`` compresses Adam's momentum instead (1-bit Adam's scheme with ``method="ef"``,
    SAEF-Adam with ``"saef"``; the rule is stated in :class:`saef.core.local.Adam`): no bias correction,
    decoupled weight decay, v frozen once the compressors take over (give ``warmup_steps``); with the
    identity compressor it is plain Adam without bias correction::

        >>> opt = saef.SAEF(model.parameters(), lr=1e-3, optimizer="adam", betas=(0.9, 0.999),
        ...                 compressor="sign", warmup_steps=100, average_every=10)

    Args:
        params: the parameters, or parameter groups (dicts with ``params`` and any of ``lr``, ``momentum``,
            ``weight_decay``; for Adam ``betas`` and ``eps`` instead of ``momentum``), as for ``torch.optim.SGD``;
            :meth:`add_param_group` adds one later.
        lr: learning rate >= 0. The groups' settings are read every step, so schedulers work (and
            OneCycleLR's momentum cycling).
        momentum: mu in [0, 1) (sgd). weight_decay: >= 0.
        optimizer: ``"sgd"`` (momentum SGD) or ``"adam"``. betas, eps: Adam's (default (0.9, 0.999), 1e-8).
        method: ``"saef"``, ``"ef"``, ``"ef21"`` or ``"direct"``. compressor / server_compressor: specs.
        double_way: compress the server's reply too. average_every: error-averaging period p or None.
        warmup_steps: full-precision steps before the compressors take over. seed: of random compressors' draws.
        config: instead of the settings above, a whole :class:`~saef.core.AlgorithmConfig` (then its
            momentum and weight decay are the optimizer's).
        transport: where the other workers are. Default: when ``torch.distributed`` is initialised, a
            :class:`~saef.backends.distributed.DistributedTransport` (each rank is one worker; the
            parameters are broadcast from rank 0 here); otherwise a single in-process worker.
        server: with the default distributed transport, ``"sharded"`` or ``"rank0"``.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: Optional[float] = None,
        weight_decay: Optional[float] = None,
        *,
        optimizer: str = "sgd",
        betas: Optional[Tuple[float, float]] = None,
        eps: Optional[float] = None,
        config: Optional[AlgorithmConfig] = None,
        transport: Optional[Transport] = None,
        server: str = "sharded",
        **algorithm,
    ):
        check_lr(lr)
        given = {k: v for k, v in (("momentum", momentum), ("weight_decay", weight_decay), ("betas", betas), ("eps", eps))
                 if v is not None}
        if optimizer != "sgd":
            given["optimizer"] = optimizer
        config = AlgorithmConfig.build(config, **given, **algorithm)
        if server == "allreduce" and not config.lossless:
            raise ValueError("server='allreduce' moves dense values both ways, so it cannot carry a compressed uplink or "
                             "downlink; use server='sharded' or 'rank0' (or the identity compressor, single-way)")
        self.algorithm = None  # built below, once torch.optim has made the groups
        super().__init__(params, dict(lr=lr, **{key: getattr(config, key) for key in _settings_of(config)}))
        params = self._params()
        self.transport = transport if transport is not None else optimizer_transport(params, server)
        if self.transport.num_local != 1:
            raise ValueError("the SAEF optimizer is one worker per process; use saef.Simulator for K in one process")
        self.config = config
        self.shapes = [tuple(p.shape) for p in params]
        self.algorithm = Algorithm(self.shapes, config, self.transport)
        with torch.no_grad():
            self.x = flatten([p.detach() for p in params]).clone()
        self.ef_state = self.algorithm.init_state(self.x)
        self._written = self.x  # what the optimizer last wrote into the parameters (flat)
        self.skipped_steps = 0  # steps skipped for a NaN or Inf gradient
        c = config
        # what a saved state must have been made with to be loaded as it is
        self._settings = {"method": c.method, "compressor": c.compressor.name, "double_way": c.double_way,
                          "server_compressor": c.downlink_compressor.name}
        if c.optimizer != "sgd":  # (named only then: states saved before there was a choice still load)
            self._settings["optimizer"] = c.optimizer
        if c.local_steps:
            self._settings.update(local_steps=c.local_steps, inner_optimizer=c.inner_optimizer)

    def add_param_group(self, param_group: Dict[str, object]) -> None:
        """Add a group, with its own ``lr`` and local-optimizer settings (``momentum`` and ``weight_decay``;
        Adam's ``betas``, ``eps``, ``weight_decay``; the optimizer's where left out). Its parameters join the
        model as new layers from their current values, with zero momentum and errors; every other layer's
        state is kept. Distributed: every rank adds the same group (the new parameters start from rank 0's
        values). Adam refuses a group once its warm-up is over: the new layers' v would stay 0."""
        if self.algorithm is not None:
            self.algorithm.optimizer.check_new_layers(self.ef_state)
            if self.config.local_steps and self.config.inner_optimizer == "adamw" and self.ef_state.inner_steps:
                raise ValueError("inner AdamW keeps one step count for its bias correction, which new layers would take "
                                 "over at its current value: add parameter groups before the first step")
        super().add_param_group(param_group)
        if self.algorithm is None:  # still in __init__
            return
        new = list(self.param_groups[-1]["params"])
        self.transport.add_layers([p.detach() for p in new])
        old_x, old_state = self.x, self.ef_state
        self.shapes += [tuple(p.shape) for p in new]
        self.algorithm = Algorithm(self.shapes, self.config, self.transport)
        with torch.no_grad():
            self.x = torch.cat([old_x, flatten([p.detach() for p in new])])
        self.ef_state = self.algorithm.init_state(self.x)  # the new layers' state as at a start
        for name, tensor in self.ef_state.tensors.items():  # the new layers come last on every flat axis
            old = old_state.tensors[name]
            tensor[..., : old.shape[-1]] = old
        self.ef_state.step, self.ef_state.round_position = old_state.step, old_state.round_position
        self.ef_state.inner_steps = old_state.inner_steps
        self._written = torch.cat([self._written, self.x[old_x.numel():]])

    def _hyperparameters(self):
        """This step's lr and the local optimizer's settings (momentum and weight decay; Adam's betas, eps and
        weight decay), read from the groups (schedulers may change any of them, e.g. OneCycleLR cycles the
        momentum) and checked: one value each when every group agrees, else one per layer. The settings go
        into the local optimizer; returns the lr."""
        names = _settings_of(self.config)
        per_group = []
        for i, group in enumerate(self.param_groups):
            lr = group["lr"]
            value = check_lr(lr, f" in parameter group {i}", self.x.dtype)
            per_group.append((value, *(_CHECKS[name](group[name]) for name in names)))
        if len(set(per_group)) == 1:  # the common case: one value each
            lr, *settings = per_group[0]
        else:
            layers = [values for values, group in zip(per_group, self.param_groups) for _ in group["params"]]
            lr, *settings = (list(column) for column in zip(*layers))
        self.algorithm.optimizer.set(*settings)
        return lr

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _write(self, flat: Tensor) -> None:
        write_flat(self._params(), flat, self.shapes)
        self._written = flat  # (kept to compare with: a write through .data leaves the versions alone)

    @torch.no_grad()
    def _adopt_written_weights(self) -> None:
        """Parameters written since the optimizer last wrote them (pretrained weights loaded, an EMA swapped
        in, :meth:`write_x`) are taken as the new x of their layers instead of being overwritten. Momentum and
        errors are kept. In a distributed run, write the same weights on every rank.

        A write is seen by comparing the values with what the optimizer wrote (one comparison per parameter,
        read together once a step), however it was made (``p.copy_(t)`` under ``torch.no_grad()``, ``p.data = t``,
        ``p.data.copy_(t)``); writing back what the optimizer wrote (a model state saved beside the optimizer's,
        loaded before or after it) changes nothing. A tensor of another shape or device is refused.
        With local steps, weights written in the middle of a round are taken as this worker's iterate y_k (the
        shared x moves at the exchange only); at a round's start, as x, and the round starts from there."""
        params, slices, differs = self._params(), self.algorithm.layout.slices, []
        for i, (p, s) in enumerate(zip(params, slices)):
            written = self._written[s]
            if (tuple(p.shape), p.device) != (self.shapes[i], written.device):
                raise ValueError(f"parameter {i} now holds a tensor of shape {tuple(p.shape)} on {p.device}; the "
                                 f"optimizer's layer {i} is {self.shapes[i]} on {written.device} (write weights of "
                                 "the same shape and device, or build a new optimizer)")
            differs.append(_differs(p.detach(), written.view(p.shape).to(p.dtype)))
        pending = [d for d in differs if isinstance(d, Tensor)]
        read = iter(torch.stack([d.to(pending[0].device) for d in pending]).tolist() if pending else [])  # one read
        changed = [next(read) if isinstance(d, Tensor) else d for d in differs]
        state = self.ef_state
        mid_round = bool(self.config.local_steps) and state.round_position > 0
        adopted = False
        for p, s, by_value in zip(params, slices, changed):
            if by_value:  # (a write of what the optimizer wrote -- a model state saved with it -- changes nothing)
                (state.local_iterate[0, s] if mid_round else self.x[s]).copy_(p.detach().reshape(-1))
                adopted = True
        if adopted and self.config.local_steps and not mid_round:  # the round starts again from the new x
            self.algorithm.start_round(state, self.x)

    @torch.no_grad()
    def write_x(self) -> None:
        """Put the model iterate x (not the gradient point x - e_k that the parameters hold between steps)
        into the parameters, to save or export the model; collective where distributed. Training may go on
        after it: the next step takes the parameters as they are as x."""
        write_flat(self._params(), self.algorithm.point(self.ef_state, self.x, "x"), self.shapes)

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step from the parameters' ``.grad``. A step whose gradients hold a NaN or an Inf (on any
        process) is skipped before it touches any state, counted in :attr:`skipped_steps`, with a warning
        (once per place it is called from).

        ``torch.compile(opt.step)`` runs it as it is (``torch.compiler.disable``): the step keeps its own
        records of what the parameters hold, which a traced graph would freeze; compile the model instead."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        self._check_setup()
        self._adopt_written_weights()
        check_dense([p.grad for p in params])
        grads = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).unsqueeze(0)
        # One vote of all processes: are the gradients finite everywhere, and which layers have none anywhere
        finite, *idle = self.transport.all_agree([bool(all_finite(grads))] + [p.grad is None for p in params])
        if not finite:
            self.skipped_steps += 1
            _warn("SAEF: a step was skipped, a gradient holds a NaN or Inf (on some process); opt.skipped_steps counts them")
            return loss
        lr = self._hyperparameters()  # read every step, as torch.optim.SGD does
        kept = self._idle_layers([i for i, none in enumerate(idle) if none])
        self.algorithm.step(self.ef_state, self.x, grads, lr)
        for target, saved in kept:  # a parameter without a gradient is left as it was, as torch.optim.SGD does
            target.copy_(saved)
        self._write(self.algorithm.gradient_points(self.ef_state, self.x)[0])
        return loss

    def _check_setup(self) -> None:
        """Once: warn where the optimizer cannot do what the job needs -- built before torch.distributed was
        initialised (it then runs alone here), or its parameters also in a DistributedDataParallel module
        (DDP all-reduces the full gradients, and saef exchanges them again)."""
        if getattr(self, "_setup_checked", False):
            return
        self._setup_checked = True
        import torch.distributed as dist

        if self.transport.num_workers == 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _warn(f"saef.SAEF was built before torch.distributed was initialised, so it trains alone in this process "
                  f"(no exchange with the other {dist.get_world_size() - 1} ranks): build it after init_process_group")
        if dist.is_available() and dist.is_initialized() and _in_ddp(self._params()):
            _warn("these parameters belong to a DistributedDataParallel module: DDP all-reduces their full "
                  "gradients, and saef.SAEF then exchanges them again -- no saving. Use saef.SAEF on the plain module "
                  "(each rank is one worker); where a stack wraps the model in DDP itself (HF Trainer, Lightning), "
                  "register saef.local_gradients_hook on the DDP module so that it sends nothing; or keep DDP with "
                  "saef.comm_hook and any torch optimizer")

    def _idle_layers(self, layers):
        """Copies of x and of every state tensor on ``layers`` (no gradient on any process this step), to put
        back after the step: no momentum, no weight decay, no error change for them."""
        kept = []
        for i in layers:
            for name, tensor in (("x", self.x), *self.ef_state.tensors.items()):
                part = self.algorithm.layer_columns(name, i)  # (a compressor's state has an axis of its own)
                kept.append((tensor[..., part], tensor[..., part].clone()))
        return kept

    @contextlib.contextmanager
    def evaluation_point(self, point: str = "x") -> Iterator[None]:
        """Temporarily put x (``"x"``) or the auxiliary iterate x~ (``"auxiliary"``) into the parameters."""
        self._write(self.algorithm.point(self.ef_state, self.x, point))  # collective where distributed
        try:
            yield
        finally:
            self._write(self.algorithm.gradient_points(self.ef_state, self.x)[0])

    @property
    def bits(self) -> Dict[str, int]:
        """Cumulative bits this worker sent (up), received (down), and sent plus received for error averaging."""
        return self.transport.ledger.per_worker()

    @property
    def rounds(self) -> int:
        """Exchanges with the other workers so far: one per step, or with ``local_steps`` H one per H steps."""
        return self.ef_state.step

    def mismatch(self) -> Dict[str, float]:
        """The two gradient-mismatch terms (see :meth:`saef.core.Algorithm.mismatch`; EF and SAEF)."""
        return self.algorithm.mismatch(self.ef_state)

    def state_dict(self) -> Dict[str, object]:
        state = {"x": self.x.clone(), "algorithm": self.ef_state.state_dict(), "ledger": self.transport.ledger.state_dict(),
                 "settings": dict(self._settings), "skipped_steps": self.skipped_steps, "shapes": list(self.shapes),
                 "rank": self.transport.worker_ids[0], "workers": self.transport.num_workers}
        groups, first = [], 0
        for g in self.param_groups:  # as torch.optim saves them: the hyperparameters and the parameters' indices
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(first, first + len(g["params"])))})
            first += len(g["params"])
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, object], reset_errors: bool = False) -> None:
        """Restore a saved state exactly. A state saved with another method or compressor is refused (its
        errors mean something else); ``reset_errors=True`` then keeps the parameters, the step and the bit
        counts only, with momentum and errors from zero."""
        state = _checked_state(state_dict, self.shapes)
        sizes = [len(g["params"]) if "params" in g else None for g in state_dict["param_groups"]]
        ours = [len(g["params"]) for g in self.param_groups]
        if len(sizes) != len(ours) or any(n is not None and n != m for n, m in zip(sizes, ours)):
            raise ValueError(f"the state has parameter groups of {sizes} tensors, the optimizer has "
                             f"{ours} (add_param_group as when it was saved)")
        if tuple(state["x"].shape) != tuple(self.x.shape):
            raise ValueError(f"state has {state['x'].numel()} parameters, the optimizer has {self.x.numel()}")
        saved = state.get("settings", {})
        if saved != self._settings and not reset_errors:
            key = next((k for k in self._settings if saved.get(k) != self._settings[k]), "settings")
            raise ValueError(f"the state was saved with {key} = {saved.get(key)!r}, this optimizer has {self._settings[key]!r}: "
                             "its errors cannot be carried over; pass reset_errors=True to keep only the parameters")
        rank, workers = self.transport.worker_ids[0], self.transport.num_workers
        saved_at = (state.get("rank", rank), state.get("workers", workers))
        if saved_at != (rank, workers) and not reset_errors:
            raise ValueError(f"this state is worker {saved_at[0]}'s of {saved_at[1]}; this optimizer is worker {rank} of "
                             f"{workers}: its errors (and the server's, of the layers it serves) are another worker's. Each "
                             "rank saves and loads its own state; from one rank's state (a rank-0-only checkpoint) load "
                             "with reset_errors=True, which keeps the parameters and the step")
        self.x.copy_(state["x"])
        if reset_errors:
            self.ef_state = self.algorithm.fresh_state(self.x, state["algorithm"])
            self.transport.ledger.load_per_worker(state["ledger"])
        else:
            self.ef_state.load_state_dict(state["algorithm"])
            self.transport.ledger.load_state_dict(state["ledger"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._write(self.algorithm.gradient_points(self.ef_state, self.x)[0])
