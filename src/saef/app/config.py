"""The configuration of a training run: one typed record, filled from defaults, a TOML file and flags.

Every key of :class:`TrainConfig` can appear in a TOML file (``saef train --config run.toml``) and as a
flag (``--lr 0.05``; underscores become dashes); flags override the file. Unknown keys, wrong types and
values out of range raise :class:`ConfigError` naming the key, which the command line turns into a
one-line message and exit code 2.

Example ``run.toml``::

    method = "saef"
    compressor = "sign"
    workers = 4
    average_every = 10
    lr_milestones = [20, 30]
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..backends.registry import available_backends
from ..core import PRECISIONS, ErrorFeedbackConfig
from ..core.rules import available_rules
from ..zoo.datasets import DATASETS, GENERATED
from ..zoo.models import MODELS

__all__ = ["TrainConfig", "ConfigError", "load_config", "train_methods", "resume_config"]

# On resume: keys whose change would make the saved worker errors meaningless (refused unless the user
# asks to reset the errors), and keys that define another run altogether (always refused).
ERROR_STATE_KEYS = ("workers", "method", "optimizer", "compressor", "server_compressor", "double_way", "warmup_steps")
FIXED_KEYS = ("dataset", "dataset_size", "data_file", "test_file", "holdout", "full_batch", "model", "batch_size", "seed", "backend",
              "context", "gpt_layers", "gpt_width", "gpt_heads", "precision")



def train_methods():
    """``sgd`` (the full-precision baseline) and every registered feedback rule."""
    return ("sgd",) + available_rules()


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (see ``saef train --help`` for each key)."""

    method: str = "saef"  # sgd (full-precision baseline), or a feedback rule: ef, saef, ef21, direct
    optimizer: str = "sgd"  # the local optimizer: sgd (momentum SGD) or adam (compressed-momentum Adam)
    compressor: Optional[str] = None  # identity | sign | topk:RHO | randk:RHO[:unbiased] | qsgd:S | natural | powersgd:R, [:bf16|:fp16]; default topk:0.01 (identity for sgd)
    server_compressor: Optional[str] = None  # the server's compressor; default: the workers'
    workers: int = 4
    double_way: bool = True
    average_every: Optional[int] = None  # error-averaging period p; None = never
    warmup_steps: int = 0  # the first N steps exchange dense fp32 values, then the compressors take over
    momentum: float = 0.9  # optimizer sgd only
    betas: Optional[List[float]] = None  # optimizer adam: b1, b2 (default 0.9, 0.999)
    eps: Optional[float] = None  # optimizer adam (default 1e-8)
    weight_decay: float = 0.0
    lr: float = 0.1
    lr_milestones: List[int] = field(default_factory=lambda: [20])  # epochs after which lr is multiplied by lr_decay
    lr_decay: float = 0.1
    epochs: int = 30
    batch_size: int = 128  # global batch, split evenly over the workers
    seed: int = 0
    dataset: str = "mnist1d"
    dataset_size: Optional[int] = None  # dataset-specific: samples generated (mnist1d) or kept
    data_file: Optional[str] = None  # libsvm: the LIBSVM/svmlight file to train on; text: a text file (default: Python's stdlib)
    test_file: Optional[str] = None  # libsvm: a file to test on (default: the training file: the objective's metrics)
    holdout: int = 0  # the last N training samples are not trained on but evaluated as a validation split
    full_batch: bool = False  # every step, each worker takes its whole contiguous shard (gradient descent; one step an epoch)
    data_dir: str = "~/.cache/saef"
    model: str = "cnn1d"
    gpt_layers: int = 2  # model gpt: transformer blocks
    gpt_width: int = 128  # model gpt: width (a multiple of gpt_heads)
    gpt_heads: int = 4  # model gpt: attention heads
    context: int = 64  # dataset text / model gpt: bytes per sample (the model's context)
    precision: str = "fp32"  # fp32, or bf16: forward and backward under autocast (parameters, momentum and errors stay fp32)
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    backend: str = "sim"  # sim: K workers in this process; dist: one worker per torch.distributed rank
    server: str = "sharded"  # dist only: sharded (each rank serves a share of layers) or rank0
    timeout: float = 300.0  # dist only: seconds a collective may wait for a dead or hung rank
    overlap: bool = False  # dist only: each bucket of layers is compressed and sent while backward makes the rest
    bucket_mb: float = 1.0  # dist only, with overlap: the most MB of gradients in one bucket
    output: Optional[str] = None  # run directory; default runs/<dataset>-<model>-<method>-...-<time>
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at the end of each epoch)
    keep_checkpoints: int = 3  # how many recent checkpoints to keep
    max_nonfinite_skips: int = 5  # steps with NaN/Inf are skipped; stop after this many in a row (0: stop at once)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        self._check_values()

    def _check_values(self) -> None:
        def bad(key, value, allowed):
            raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")

        for key, (low, high) in _INTEGER_RANGES.items():  # every integer key has a range, named when broken
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value]
            if any(v is not None and not low <= v <= high for v in values):
                bad(key, value, f"must be {'integers' if isinstance(value, list) else 'an integer'} from {low} to {high}")

        if self.method not in train_methods():
            bad("method", self.method, f"choose one of {', '.join(train_methods())}")
        if self.method == "sgd" and self.compressor not in (None, "identity"):
            bad("compressor", self.compressor, "method sgd is the full-precision baseline; use identity")
        if self.method == "sgd" and self.average_every is not None:
            bad("average_every", self.average_every, "method sgd has no error to average; leave it unset")
        if not (self.lr >= 0) or math.isinf(self.lr):
            bad("lr", self.lr, "must be a finite number >= 0")
        if not 0 < self.lr_decay <= 1:
            bad("lr_decay", self.lr_decay, "must be in (0, 1]")
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            bad("lr_milestones", self.lr_milestones, "must be increasing epochs >= 1")
        if self.batch_size % self.workers and not self.full_batch:
            bad("batch_size", self.batch_size, f"must be divisible by workers = {self.workers}")
        if self.dataset == "libsvm" and not self.data_file:
            bad("data_file", self.data_file, "dataset libsvm reads a LIBSVM/svmlight file: give --data-file PATH")
        if self.data_file is not None and self.dataset not in ("libsvm", "text"):
            bad("data_file", self.data_file, f"is for datasets libsvm and text, not {self.dataset}")
        if self.test_file is not None and self.dataset != "libsvm":
            bad("test_file", self.test_file, f"is for dataset libsvm, not {self.dataset}")
        if (self.model == "gpt") != (self.dataset == "text"):
            bad("model", self.model, f"model gpt and dataset text go together (dataset is {self.dataset})")
        if self.gpt_width % self.gpt_heads:
            bad("gpt_width", self.gpt_width, f"must be a multiple of gpt_heads = {self.gpt_heads}")
        if self.precision not in PRECISIONS:
            bad("precision", self.precision, f"choose one of {', '.join(PRECISIONS)}")
        if self.dataset not in DATASETS:
            bad("dataset", self.dataset, f"choose one of {', '.join(DATASETS)}")
        if self.dataset_size is not None and self.dataset_size > GENERATED.get(self.dataset, self.dataset_size):
            bad("dataset_size", self.dataset_size, f"{self.dataset} generates at most {GENERATED[self.dataset]} here")
        if self.model not in MODELS:
            bad("model", self.model, f"choose one of {', '.join(MODELS)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", self.device, "choose auto, cpu, cuda or cuda:N")
        if self.backend not in available_backends():
            bad("backend", self.backend, f"choose one of {', '.join(available_backends())}")
        if not 0 < self.timeout <= MAX_TIMEOUT:  # every wait is bounded by it, so it must be finite
            bad("timeout", self.timeout, f"must be a finite number of seconds, > 0 and <= {MAX_TIMEOUT:g}")
        if not 0 < self.bucket_mb <= 1 << 20:
            bad("bucket_mb", self.bucket_mb, "must be a number of MB > 0 and <= 1048576")
        if self.server not in ("sharded", "rank0"):
            bad("server", self.server, "choose sharded or rank0")
        try:  # the algorithm's own settings are validated where they are defined, once
            self.algorithm()
        except ValueError as error:
            raise ConfigError(str(error)) from None

    # --- derived values ---------------------------------------------------------------------------
    @property
    def worker_compressor(self) -> str:
        if self.compressor is not None:
            return self.compressor
        return "identity" if self.method == "sgd" else "topk:0.01"

    def algorithm(self) -> ErrorFeedbackConfig:
        """The algorithm this run trains with, resolved once: ``sgd`` is EF with the identity compressor,
        single-way and without error averaging (exactly momentum SGD)."""
        sgd = self.method == "sgd"
        adam = self.optimizer == "adam"
        return ErrorFeedbackConfig(
            method="ef" if sgd else self.method,
            optimizer=self.optimizer,
            momentum=0.0 if adam else self.momentum,  # (Adam's momentum is b1)
            betas=None if self.betas is None else tuple(self.betas),
            eps=self.eps,
            weight_decay=self.weight_decay,
            compressor=self.worker_compressor,
            server_compressor=self.server_compressor,
            double_way=self.double_way and not sgd,
            average_every=self.average_every,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
        )

    @property
    def description(self) -> str:
        """The method as the summary prints it, e.g. ``saef (topk:0.01, double-way, K=4)``."""
        way = "double" if self.algorithm().double_way else "single"
        optimizer = f"{self.optimizer}, " if self.optimizer != "sgd" else ""
        return f"{self.method} ({optimizer}{self.worker_compressor}, {way}-way, K={self.workers})"

    def model_options(self) -> Dict[str, Any]:
        """The model's size options (used by gpt; the other models take their defaults)."""
        if self.model != "gpt":
            return {}
        return {"width": self.gpt_width, "layers": self.gpt_layers, "heads": self.gpt_heads}

    def lr_at_epoch(self, epoch: int) -> float:
        """Learning rate during 0-based ``epoch``: lr * lr_decay^(milestones passed)."""
        return self.lr * self.lr_decay ** sum(1 for m in self.lr_milestones if epoch >= m)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["compressor"] = self.worker_compressor
        return out

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}

MAX_TIMEOUT = 7 * 24 * 3600.0  # a week: longer than any wait a run should make
_INT_MAX = (1 << 31) - 1
# The range of every integer key, checked before anything uses it (MNIST-1D seeds numpy's legacy generator,
# which takes 0 .. 2^32 - 1).
_INTEGER_RANGES = {
    "workers": (1, 1 << 16), "average_every": (1, _INT_MAX), "lr_milestones": (1, _INT_MAX), "epochs": (1, _INT_MAX),
    "batch_size": (1, _INT_MAX), "seed": (0, (1 << 32) - 1), "dataset_size": (1, _INT_MAX),
    "gpt_layers": (1, 1024), "gpt_width": (1, 1 << 16), "gpt_heads": (1, 1024), "context": (1, 1 << 20),
    "checkpoint_every": (0, _INT_MAX), "warmup_steps": (0, _INT_MAX), "holdout": (0, _INT_MAX), "keep_checkpoints": (1, 1 << 16), "max_nonfinite_skips": (0, _INT_MAX),
}


def _check_type(key: str, value: Any, annotation: str) -> None:
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional[") : -1] if optional else annotation
    if value is None:
        if optional:
            return
        raise ConfigError(f"{key} must be set (a {base})")
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "List[int]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
        "List[float]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in v),
    }[base](value)
    if not ok:
        raise ConfigError(f"{key} must be {_describe(base)}, got {value!r} ({type(value).__name__})")


def _describe(base: str) -> str:
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "List[int]": "a list of integers",
            "List[float]": "a list of numbers"}[base]


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (keys with value None are skipped)."""
    values: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        except OSError as error:  # a directory, no permission, ...
            raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values = _never_as_none(values)
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    try:
        return TrainConfig(**values)
    except TypeError as error:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(error)) from None


def _never_as_none(values: Dict[str, Any]) -> Dict[str, Any]:
    """``average_every = "never"`` (a flag or a TOML value) is None, which no flag can say."""
    return {key: (None if key == "average_every" and value == "never" else value) for key, value in values.items()}


def default_output(config: TrainConfig, stamp: str) -> Path:
    name = f"{config.dataset}-{config.model}-{config.method}-{config.worker_compressor.replace(':', '')}-K{config.workers}"
    if config.optimizer != "sgd":
        name += f"-{config.optimizer}"
    if config.method != "sgd":
        name += "-DC" if config.double_way else "-SC"
    if config.average_every is not None:
        name += f"-p{config.average_every}"
    return Path("runs") / f"{name}-seed{config.seed}-{stamp}"


def resume_config(saved: Dict[str, Any], overrides: Dict[str, Any], reset_errors: bool) -> "tuple[TrainConfig, Dict[str, Any]]":
    """The config of a resumed run: the saved one with ``overrides`` (flags the user gave) applied.

    Returns ``(config, changed)``. Raises :class:`ConfigError` when an override changes what the saved state
    depends on: worker count, method or compressors (unless ``reset_errors``), or the data and model.
    """
    known = {k: v for k, v in saved.items() if k in _FIELD_TYPES}
    given = _never_as_none({k: v for k, v in overrides.items() if v is not None and k in _FIELD_TYPES})
    base = TrainConfig(**known)
    changed = {k: (getattr(base, k) if k != "compressor" else base.worker_compressor, v) for k, v in given.items()
               if (getattr(base, k) if k != "compressor" else base.worker_compressor) != v}
    changed.pop("output", None)
    for key in FIXED_KEYS:
        if key in changed:
            raise ConfigError(f"{key} cannot change on resume ({changed[key][0]!r} -> {changed[key][1]!r}); start a new run")
    for key in ERROR_STATE_KEYS:
        if key in changed and not reset_errors:
            raise ConfigError(
                f"{key} changed on resume ({changed[key][0]!r} -> {changed[key][1]!r}): the saved worker errors cannot be "
                "carried over; pass --reset-errors to start them from zero (this is logged in the records)"
            )
    try:
        return TrainConfig(**{**known, **given}), changed
    except TypeError as error:  # pragma: no cover
        raise ConfigError(str(error)) from None
