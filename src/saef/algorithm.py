"""Algorithm 1 of the paper -- local error feedback (EF) and step-ahead error feedback (SAEF) -- written once.

This is the only place where the order of the update lives. It works on flat tensors: the parameters
``x`` of shape ``(P,)`` (all layers concatenated) and per-worker state of shape ``(W, P)``, where W is the
number of workers whose state lives in this process (all K in the simulator, one on a real rank).
Compression is layer-wise: each layer is a slice ``[offset, offset + d)`` of the flat axis. Communication
goes through a :class:`~saef.comm.Transport`.

Update rule for step t, worker k, learning rate lr_t (per layer)::

    z_k   = x - e_k  (SAEF)      |   z_k = x  (EF)          point where worker k takes its gradient
    m_k  <- mu m_k + grad f(z_k; batch_k) + wd z_k
    D_k   = e_k + lr_t m_k
    e_k  <- D_k - C(D_k);         worker k sends C(D_k)
    D     = e_s + mean_k C(D_k);  e_s <- D - C_s(D);   x <- x - C_s(D)
    if (t + 2) % p == 0:  e_k <- mean_j e_j               (error averaging for step t + 1)

Single-way compression is the case C_s = identity (then e_s stays exactly 0 and the dense average goes
back). Error averaging "at the start of step t when (t + 1) % p == 0" is done at the end of step t - 1, so
the state is always ready for the next gradient; at t = 0 the errors are zero and averaging is a no-op.
With C = identity both methods reduce exactly to distributed momentum SGD.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from .comm import Transport
from .compressors import Compressor, Identity, Layout, make_compressor

__all__ = ["ErrorFeedbackConfig", "ErrorFeedbackState", "ErrorFeedback", "METHODS"]

METHODS = ("ef", "saef")


@dataclass(frozen=True)
class ErrorFeedbackConfig:
    """Hyper-parameters of Algorithm 1, validated at construction.

    Args:
        method: ``"saef"`` (gradient at x - e_k) or ``"ef"`` (gradient at x).
        momentum: mu in [0, 1); 0 is plain SGD.
        weight_decay: >= 0, added to the gradient as ``wd * z_k``.
        compressor: the workers' compressor or its spec (``"identity"``, ``"sign"``, ``"topk:RHO"``).
        server_compressor: the server's compressor in double-way mode; ``None`` = same as the workers'.
        double_way: the server compresses what it sends back (with its own error feedback); otherwise it
            sends the dense average.
        average_every: error-averaging period p >= 1, or ``None`` for never.
    """

    method: str = "saef"
    momentum: float = 0.0
    weight_decay: float = 0.0
    compressor: Union[str, Compressor] = "sign"
    server_compressor: Union[str, Compressor, None] = None
    double_way: bool = True
    average_every: Optional[int] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got method={self.method!r}")
        mu = self.momentum
        if not isinstance(mu, (int, float)) or not (0.0 <= mu < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got momentum={mu!r}")
        wd = self.weight_decay
        if not isinstance(wd, (int, float)) or not (wd >= 0.0) or math.isinf(wd):
            raise ValueError(f"weight_decay must be a finite number >= 0, got weight_decay={wd!r}")
        p = self.average_every
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
            raise ValueError(f"average_every must be an integer >= 1 or None (never), got average_every={p!r}")
        if not isinstance(self.double_way, bool):
            raise ValueError(f"double_way must be True or False, got double_way={self.double_way!r}")
        # Building the compressors here validates their specs (unknown names, rho out of range).
        object.__setattr__(self, "compressor", make_compressor(self.compressor))
        if self.server_compressor is not None:
            object.__setattr__(self, "server_compressor", make_compressor(self.server_compressor))

    @property
    def downlink_compressor(self) -> Compressor:
        """What the server applies: identity in single-way mode."""
        if not self.double_way:
            return Identity()
        return self.server_compressor if self.server_compressor is not None else self.compressor


@dataclass
class ErrorFeedbackState:
    """Everything Algorithm 1 remembers between steps (all of it goes into checkpoints)."""

    step: int  # t: steps taken so far; decides when errors are averaged
    worker_momentum: Tensor  # m_k, (W, P): each worker's momentum buffer
    worker_error: Tensor  # e_k, (W, P): what each worker's compression left out, fed back next step
    server_error: Tensor  # e_s, (P,): what the server's compression left out (layers owned here; else 0)
    bits_up: int = 0  # bits one worker has sent to the server, cumulative
    bits_down: int = 0  # bits one worker has received from the server, cumulative
    bits_averaging: int = 0  # bits one worker has sent for error averaging, cumulative

    def counters(self) -> Dict[str, int]:
        """Cumulative bits per worker: up (to the server), down (from it), averaging (error all-reduce)."""
        return {"bits_up": self.bits_up, "bits_down": self.bits_down, "bits_averaging": self.bits_averaging}

    def state_dict(self) -> Dict[str, object]:
        """Copies of every field (safe to keep while training goes on)."""
        return {
            "step": self.step,
            "worker_momentum": self.worker_momentum.clone(),
            "worker_error": self.worker_error.clone(),
            "server_error": self.server_error.clone(),
            **self.counters(),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for name in ("worker_momentum", "worker_error", "server_error"):
            own, new = getattr(self, name), state[name]
            if tuple(new.shape) != tuple(own.shape):
                raise ValueError(
                    f"{name} in the state has shape {tuple(new.shape)}, expected {tuple(own.shape)} "
                    "(different model or number of workers?)"
                )
            own.copy_(new)
        self.step = int(state["step"])
        self.bits_up = int(state["bits_up"])
        self.bits_down = int(state["bits_down"])
        self.bits_averaging = int(state["bits_averaging"])


class ErrorFeedback:
    """Algorithm 1 over a fixed list of layer shapes and a transport.

    Example (one simulated step of 2 workers on a 3-element parameter)::

        >>> ef = ErrorFeedback([(3,)], ErrorFeedbackConfig(method="saef", compressor="sign"),
        ...                    InProcessTransport(2))
        >>> x = torch.zeros(3); state = ef.init_state(x)
        >>> z = ef.gradient_points(state, x)            # (2, 3): where each worker takes its gradient
        >>> ef.step(state, x, grads=torch.ones(2, 3), lr=0.1)
    """

    def __init__(self, shapes: Sequence[Sequence[int]], config: ErrorFeedbackConfig, transport: Transport):
        self.config = config
        self.transport = transport
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        self.layout = Layout([math.prod(s) for s in self.shapes])
        self.sizes, self.offsets, self.num_params = self.layout.sizes, self.layout.offsets, self.layout.total
        self.owned = [i for i in range(len(self.sizes)) if transport.owns(i, len(self.sizes))]
        self.owns_all = len(self.owned) == len(self.sizes)
        self.owned_layout = self.layout if self.owns_all else self.layout.subset(self.owned)
        # When the owned layers lie side by side on the flat axis, e_s of them is one view (no gather).
        self.owned_range = self.layout.span(self.owned)
        self.uplink = config.compressor
        self.downlink = config.downlink_compressor
        if config.average_every == 1 and transport.num_workers == 1:
            warnings.warn("average_every=1 with a single worker does nothing", stacklevel=2)

    def layer(self, i: int) -> slice:
        return self.layout.slices[i]

    def init_state(self, x: Tensor) -> ErrorFeedbackState:
        """Zero momentum and errors shaped for ``x`` (P,) and this process's W workers."""
        self._check_flat(x, "x")
        w = self.transport.local_workers
        return ErrorFeedbackState(
            step=0,
            worker_momentum=x.new_zeros(w, self.num_params),
            worker_error=x.new_zeros(w, self.num_params),
            server_error=x.new_zeros(self.num_params),
        )

    def _check_flat(self, x: Tensor, name: str) -> None:
        if x.dim() != 1 or x.shape[0] != self.num_params:
            raise ValueError(f"{name} must be a flat tensor of {self.num_params} elements, got shape {tuple(x.shape)}")

    # --- the two halves of a step ------------------------------------------------------------------
    def gradient_points(self, state: ErrorFeedbackState, x: Tensor) -> Tensor:
        """z_k, (W, P): x - e_k for SAEF, x (an expanded view, no copy) for EF."""
        return self._points(x, state.worker_error)

    def _points(self, x: Tensor, error: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """The rule for z_k on any stretch of the flat axis (x: (n,), error: (W, n)), into ``out`` if given."""
        if self.config.method == "saef":
            return torch.sub(x.unsqueeze(0), error, out=out)
        points = x.unsqueeze(0).expand(self.transport.local_workers, -1)
        return points if out is None else out.copy_(points)

    @torch.no_grad()
    def write_gradient_points(self, state: ErrorFeedbackState, x: Tensor, targets: Sequence[Tensor]) -> None:
        """Write z_k of layer i into ``targets[i]`` (W d_i elements each, e.g. a model's parameters when
        W = 1): the same values as :meth:`gradient_points`, in one pass and without a (W, P) temporary."""
        w = self.transport.local_workers
        for target, s in zip(self._check_layers(targets, "targets"), self.layout.slices):
            if target.is_contiguous():
                self._points(x[s], state.worker_error[:, s], out=target.view(w, -1))
            else:  # (e.g. a channels-last parameter) no flat view to write into
                target.copy_(self._points(x[s], state.worker_error[:, s]).reshape(target.shape))

    def _check_layers(self, tensors: Sequence[Tensor], name: str) -> Sequence[Tensor]:
        w = self.transport.local_workers
        if len(tensors) != len(self.sizes) or any(t.numel() != w * d for t, d in zip(tensors, self.sizes)):
            got = [tuple(t.shape) for t in tensors]
            raise ValueError(f"{name} must be one tensor per layer with {w} x (layer size) elements, "
                             f"layer sizes {self.sizes}, got shapes {got}")
        return tensors

    def _buffer(self, name: str, like: Tensor) -> Tensor:
        """A tensor shaped like ``like``, allocated once (kept by the layout) and reused every step."""
        key = ("step-buffer", name, tuple(like.shape), like.dtype, like.device)
        return self.layout.memo(key, lambda: torch.empty_like(like))

    def step(self, state: ErrorFeedbackState, x: Tensor, grads: Union[Tensor, Sequence[Tensor]], lr: float) -> None:
        """Apply one step of Algorithm 1 in place to ``x`` and ``state``.

        Args:
            x: the parameters, (P,), updated in place.
            grads: grad f(z_k; batch_k) for the W local workers, taken at :meth:`gradient_points` of the
                current state: one (W, P) tensor, or one tensor per layer with W d_i elements (e.g. the
                ``.grad`` of a model's parameters when W = 1; no flat copy is made then).
            lr: the learning rate of this step (>= 0).
        """
        cfg = self.config
        w = self.transport.local_workers
        m, e = state.worker_momentum, state.worker_error
        if isinstance(grads, Tensor):
            if tuple(grads.shape) != (w, self.num_params):
                raise ValueError(f"grads must have shape {(w, self.num_params)} (workers, parameters), got {tuple(grads.shape)}")
            pairs = [(grads, m)]
        else:
            pairs = [(g.reshape(w, -1), m[:, s]) for g, s in zip(self._check_layers(grads, "grads"), self.layout.slices)]
        if not (lr >= 0) or math.isinf(lr):
            raise ValueError(f"lr must be a finite number >= 0, got lr={lr!r}")

        for g, m_part in pairs:
            if cfg.momentum:  # m <- g + mu m, one pass
                torch.add(g, m_part, alpha=cfg.momentum, out=m_part)
            else:  # mu = 0: the momentum buffer is just this step's gradient
                m_part.copy_(g)
        if cfg.weight_decay:
            m.add_(self.gradient_points(state, x), alpha=cfg.weight_decay)
        # e_k is overwritten in place: first with D_k, then with D_k - C(D_k) (no new (W, P) buffers).
        delta = e.add_(m, alpha=lr)  # D_k = e_k + lr m_k

        payloads = self.uplink.encode_layers(delta, self.layout)  # what each worker sends
        # e_k <- D_k - C(D_k), while the payloads travel (a payload may be a view of D_k: the transport
        # has taken what it sends, or averaged it, before it runs this).
        def settle_worker_error(decoded=None):
            if decoded is not None:  # the transport decoded the rows already
                e.sub_(decoded)
            else:
                self.uplink.subtract_decoded(payloads, self.layout, e)

        mean_sent, bits_up = self.transport.average_uplink(payloads, self.uplink, self.layout, meanwhile=settle_worker_error)

        # The server's work, for the layers owned here (all of them in one process; maybe none on a rank).
        server_payloads, applied = [], mean_sent.new_zeros(0)
        if self.owned:
            owned = self.owned_layout
            if self.owned_range is not None:  # e_s is overwritten in place: first with D, then with D - C_s(D)
                server_delta = state.server_error[self.owned_range].add_(mean_sent)  # D = e_s + mean_k C(D_k)
            else:
                server_delta = torch.cat([state.server_error[self.layer(i)] for i in self.owned]).add_(mean_sent)
            server_payloads = self.downlink.encode_layers(server_delta.unsqueeze(0), owned)
            applied = self.downlink.decode_layers_into(server_payloads, owned, self._buffer("applied", server_delta.unsqueeze(0)))[0]  # C_s(D)

        def settle_server_error():  # e_s <- D - C_s(D), while the server's payloads travel
            if self.owned:
                server_delta.sub_(applied)
                if self.owned_range is None:
                    for i, s in zip(self.owned, owned.slices):
                        state.server_error[self.layer(i)] = server_delta[s]

        update, bits_down = self.transport.share_downlink(server_payloads, applied, self.downlink, self.layout,
                                                          meanwhile=settle_server_error)
        x -= update  # x <- x - C_s(D)

        state.step += 1
        state.bits_up += bits_up
        state.bits_down += bits_down
        p = cfg.average_every
        if p is not None and (state.step + 1) % p == 0:
            mean_error, bits = self.transport.mean_over_workers(e)
            e.copy_(mean_error.unsqueeze(0).expand_as(e))
            state.bits_averaging += bits

    # --- diagnostics -------------------------------------------------------------------------------
    def compression_error(self, state: ErrorFeedbackState) -> Tensor:
        """e_s + mean_k e_k, (P,): the gap between x and the auxiliary iterate x~."""
        mean_error, _ = self.transport.mean_over_workers(state.worker_error, purpose="diagnostics")
        return self.transport.sum_over_processes(state.server_error) + mean_error

    def auxiliary_iterate(self, state: ErrorFeedbackState, x: Tensor) -> Tensor:
        """x~ = x - (e_s + mean_k e_k), the point whose update is plain momentum SGD (eq. 3)."""
        return x - self.compression_error(state)

    def point(self, state: ErrorFeedbackState, x: Tensor, which: str = "x") -> Tensor:
        """The parameters to evaluate: ``"x"`` (what the workers hold) or ``"auxiliary"`` (x~)."""
        if which == "x":
            return x
        if which == "auxiliary":
            return self.auxiliary_iterate(state, x)
        raise ValueError(f"point must be 'x' or 'auxiliary', got point={which!r}")

    def mismatch(self, state: ErrorFeedbackState) -> Dict[str, float]:
        """The gradient-mismatch terms of the paper, without the L^2 factor:

        * ``mismatch_ef``   = ||e_s + mean_k e_k||^2           (bounds EF's mismatch, eq. 9)
        * ``mismatch_saef`` = mean_k ||e_s + mean_j e_j - e_k||^2  (bounds SAEF's mismatch, eq. 10)
        """
        total = self.compression_error(state)
        local = (total.unsqueeze(0) - state.worker_error).square().sum()
        spread = self.transport.sum_over_processes(local.reshape(1))[0] / self.transport.num_workers
        return {"mismatch_ef": float(total.square().sum()), "mismatch_saef": float(spread)}
