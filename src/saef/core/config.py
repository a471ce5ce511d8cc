"""The algorithm's configuration: built once, validated once, passed whole to every backend.

:class:`AlgorithmConfig` is what ``saef.simulate``, ``saef.Simulator``, ``saef.SAEF`` and both backends
take (or build from the same keyword arguments, through :meth:`AlgorithmConfig.build`); the run
configuration of ``saef train`` resolves its own settings into one (``TrainConfig.algorithm()``), so the
full-precision baseline there is just ``method="ef"`` with the identity compressor, single-way.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..compress import Compressor, Identity, make_compressor
from .local import available_optimizers
from .rules.registry import available_rules, rule_class

__all__ = ["AlgorithmConfig", "check_betas", "check_eps", "check_lr", "check_momentum", "check_weight_decay"]


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_lr(lr, where: str = "", dtype: Optional[torch.dtype] = None) -> float:
    """lr as a float, if it is a number in [0, float32's largest] (a Python number or a one-element tensor),
    and no larger than ``dtype``'s largest (the parameters' dtype, where known: a float16 model's); else
    ValueError naming it and the range (``where`` is appended to the message, e.g. " in parameter group 2").

    The one check of a learning rate: ``saef train``'s config, ``saef.SAEF``, ``saef.simulate`` and each
    step of the algorithm call it."""
    try:
        value = math.nan if isinstance(lr, (bool, str, bytes)) else float(lr)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # (RuntimeError: a tensor of > 1 element)
        value = math.nan
    if not (value >= 0.0) or math.isinf(value):
        raise ValueError(f"lr must be a finite number >= 0, got lr={lr!r}{where}")
    top = _FLOAT32_MAX if dtype is None or not dtype.is_floating_point else min(_FLOAT32_MAX, torch.finfo(dtype).max)
    if value > top:
        name = "float32" if top == _FLOAT32_MAX else str(dtype).replace("torch.", "")
        raise ValueError(f"lr must be in [0, {top:g}] (the largest {name} number), got lr={lr!r}{where}")
    return value


def check_momentum(mu):
    """mu itself, if it is a number in [0, 1); else ValueError naming it."""
    if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not (0.0 <= mu < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got momentum={mu!r}")
    return mu


def check_weight_decay(wd):
    """wd itself, if it is a finite number >= 0; else ValueError naming it."""
    if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not (wd >= 0.0) or math.isinf(wd):
        raise ValueError(f"weight_decay must be a finite number >= 0, got weight_decay={wd!r}")
    return wd

_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8}


def check_betas(betas):
    """(b1, b2) as floats, if both are numbers in [0, 1); else ValueError naming them."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got betas={betas!r}")
    return (float(betas[0]), float(betas[1]))


def check_eps(eps):
    """eps itself, if it is a finite number > 0; else ValueError naming it."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps > 0.0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number > 0, got eps={eps!r}")
    return eps


def _check_count(name: str, value, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value < 2**63):
        raise ValueError(f"{name} must be an integer in [{low}, 2^63), got {name}={value!r}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Hyper-parameters of the algorithm, validated at construction.

    Args:
        method: the feedback rule (:mod:`saef.core.rules`): ``"saef"`` (gradient at x - e_k), ``"ef"``
            (gradient at x), ``"ef21"`` (EF21 / EF21-SGDM, EF21-P downlink) or ``"direct"`` (no feedback).
        optimizer: the local optimizer (:mod:`saef.core.local`): ``"sgd"`` (momentum SGD) or ``"adam"``
            (compressed-momentum Adam without bias correction, v frozen after the warm-up; rules ef, saef
            and direct).
        momentum: mu in [0, 1) (sgd); 0 is plain SGD.
        betas: Adam's (b1, b2), each in [0, 1); default (0.9, 0.999). eps: Adam's, > 0; default 1e-8.
        weight_decay: >= 0; sgd adds ``wd * z_k`` to the gradient, adam decays x by ``lr * wd * x``.
        compressor: the workers' compressor or its spec (``"identity"``, ``"sign"``, ``"topk:RHO"``).
        server_compressor: the server's compressor in double-way mode; ``None`` = same as the workers'.
        double_way: the server compresses what it sends back; otherwise it sends the dense average.
        average_every: error-averaging period p >= 1, or ``None`` for never (rules with a worker error
            only: ef and saef).
        warmup_steps: the first N steps exchange dense fp32 values both ways (counted); then the
            compressors take over, with the errors at zero (PowerSGD's start_powerSGD_iter).
        seed: where random compressors' draws come from (with the step, the layer and the sender), so that
            a run is reproducible and every party makes the same draws.
        error_decay: b in (0, 1]: the worker error enters the next uplink as b e_k (and SAEF's point is
            x - b e_k); 1 is Algorithm 1, SparseLoCo uses 0.95 (rules ef and saef).
        local_steps: H >= 1 inner steps per exchange (:mod:`saef.core.rounds`: DiLoCo and its family), or
            None: every step exchanges (Algorithm 1). With it ``momentum``, ``weight_decay``, ``betas`` and
            ``eps`` are the inner optimizer's, the lr of each step is the inner lr, and the algorithm's steps
            (error averaging, the warm-up, random draws) count rounds. Rules ef, saef and direct.
        inner_optimizer: with local steps, each worker's own optimizer: ``"sgd"`` (torch.optim.SGD) or
            ``"adamw"`` (torch.optim.AdamW).
        outer_lr: with local steps, the outer step's learning rate (> 0; DiLoCo: 0.7).
        outer_momentum: with local steps, the outer step's momentum mu in [0, 1) (DiLoCo: 0.9, Nesterov).
        nesterov: with local steps, the outer step is Nesterov's (d = g + mu u); needs outer_momentum > 0.
    """

    method: str = "saef"
    optimizer: str = "sgd"
    momentum: float = 0.0
    betas: Optional[Tuple[float, float]] = None
    eps: Optional[float] = None
    weight_decay: float = 0.0
    compressor: Union[str, Compressor] = "sign"
    server_compressor: Union[str, Compressor, None] = None
    double_way: bool = True
    average_every: Optional[int] = None
    warmup_steps: int = 0
    seed: int = 0
    error_decay: float = 1.0
    local_steps: Optional[int] = None
    inner_optimizer: str = "sgd"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        _check_count("warmup_steps", self.warmup_steps)
        _check_count("seed", self.seed)
        if self.method not in available_rules():
            raise ValueError(f"method must be one of {available_rules()}, got method={self.method!r}")
        check_momentum(self.momentum)
        check_weight_decay(self.weight_decay)
        p = self.average_every
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
            raise ValueError(f"average_every must be an integer >= 1 or None (never), got average_every={p!r}")
        if p is not None and not rule_class(self.method).averages_errors:
            raise ValueError(f"average_every applies to the rules that keep a worker error (ef, saef), "
                             f"not to method={self.method!r}; leave it unset")
        if not isinstance(self.double_way, bool):
            raise ValueError(f"double_way must be True or False, got double_way={self.double_way!r}")
        # Building the compressors here validates their specs (unknown names, rho out of range).
        for key in ("compressor", "server_compressor"):
            spec = getattr(self, key)
            if spec is not None:
                try:
                    object.__setattr__(self, key, make_compressor(spec))
                except ValueError as error:
                    raise ValueError(f"{key} = {spec!r}: {error}") from None
        self._check_rounds()
        self._check_optimizer()  # (after the compressors: whether anything is compressed decides a warning)

    def _check_rounds(self) -> None:
        """error_decay, and the local steps' settings: given only with local_steps, and with a rule defined
        with them."""
        b = self.error_decay
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (0.0 < b <= 1.0):
            raise ValueError(f"error_decay must be in (0, 1], got error_decay={b!r}")
        if b != 1.0 and not rule_class(self.method).averages_errors:
            raise ValueError(f"error_decay applies to the rules that keep a worker error (ef, saef), not to method={self.method!r}")
        h = self.local_steps
        if h is None:
            for key, default in (("inner_optimizer", "sgd"), ("outer_lr", 1.0), ("outer_momentum", 0.0), ("nesterov", False)):
                if getattr(self, key) != default:
                    raise ValueError(f"{key}={getattr(self, key)!r} applies with local steps; give local_steps (1 for an "
                                     "exchange after every step)")
            return
        _check_count("local_steps", h, low=1)
        if not rule_class(self.method).local_steps:
            raise ValueError(f"local steps are defined for the rules ef, saef and direct, not method={self.method!r}")
        if self.optimizer != "sgd":
            raise ValueError(f"optimizer={self.optimizer!r} is a per-step rule; with local steps the workers' optimizer is "
                             "inner_optimizer ('sgd' or 'adamw')")
        if self.inner_optimizer not in ("sgd", "adamw"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adamw', got inner_optimizer={self.inner_optimizer!r}")
        check_lr(self.outer_lr)
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got outer_lr={self.outer_lr!r}")
        if not isinstance(self.outer_momentum, (int, float)) or isinstance(self.outer_momentum, bool) or not (
                0.0 <= self.outer_momentum < 1.0):
            raise ValueError(f"outer_momentum must be in [0, 1), got outer_momentum={self.outer_momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got nesterov={self.nesterov!r}")
        if self.nesterov and not self.outer_momentum:
            raise ValueError("nesterov=True needs outer_momentum > 0 (Nesterov's step looks ahead along the momentum)")

    def _check_optimizer(self) -> None:
        """The optimizer's name and settings; Adam's defaults filled in, other optimizers' settings refused."""
        if self.optimizer not in available_optimizers():
            raise ValueError(f"optimizer must be one of {', '.join(available_optimizers())}, got optimizer={self.optimizer!r}")
        allowed = rule_class(self.method).optimizers
        if allowed is not None and self.optimizer not in allowed:
            raise ValueError(f"method {self.method!r} is defined with the optimizers {', '.join(allowed)}, "
                             f"not optimizer={self.optimizer!r}")
        adam = self.optimizer == "adam" or (self.local_steps is not None and self.inner_optimizer == "adamw")
        name = "inner_optimizer 'adamw'" if self.local_steps is not None else "optimizer 'adam'"
        if adam and self.momentum:
            raise ValueError(f"momentum={self.momentum!r} is momentum SGD's; {name} takes betas=(b1, b2)")
        for key, check in (("betas", check_betas), ("eps", check_eps)):
            value = getattr(self, key)
            if value is not None and not adam:
                raise ValueError(f"{key}={value!r} is Adam's; it needs optimizer='adam' or inner_optimizer='adamw' "
                                 f"(this is {self.optimizer!r})")
            if adam:
                object.__setattr__(self, key, check(_ADAM_DEFAULTS[key] if value is None else value))
        if self.optimizer == "adam" and not self.warmup_steps and not self.lossless:
            warnings.warn("optimizer 'adam' with a compressor and warmup_steps=0 never updates v (it freezes when the "
                          "compressors take over), so every step is lr * m / eps: give warmup_steps", stacklevel=4)

    @classmethod
    def build(cls, config: Optional["AlgorithmConfig"] = None, **settings) -> "AlgorithmConfig":
        """``config`` itself, or one made from keyword ``settings`` (the fields above); not both."""
        unknown = sorted(set(settings) - set(cls.FIELDS))
        if unknown:
            raise TypeError(f"unexpected argument {unknown[0]!r}; the algorithm's settings are {', '.join(cls.FIELDS)}")
        if config is None:
            return cls(**settings)
        if not isinstance(config, cls):
            raise ValueError(f"config must be an AlgorithmConfig, got {type(config).__name__}")
        if settings:
            raise ValueError(f"give either config or the settings ({', '.join(sorted(settings))}), not both")
        return config

    @property
    def downlink_compressor(self) -> Compressor:
        """What the server applies: identity in single-way mode."""
        if not self.double_way:
            return Identity()
        return self.server_compressor if self.server_compressor is not None else self.compressor

    @property
    def lossless(self) -> bool:
        """Nothing is compressed either way (then every rule is exactly its local optimizer -- momentum SGD,
        or Adam with v updated every step -- and there is no compression error to diagnose)."""
        # exactly the built-in Identity: a subclass may send less than its input
        return type(self.compressor) is Identity and type(self.downlink_compressor) is Identity


AlgorithmConfig.FIELDS = tuple(f.name for f in dataclasses.fields(AlgorithmConfig))  # the settings, in order
