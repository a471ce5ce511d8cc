"""The configuration of a training run: one typed record, filled from defaults, a TOML file and flags.

Every key of :class:`TrainConfig` can appear in a TOML file (``saef train --config run.toml``) and as a
flag (``--lr 0.05``; underscores become dashes); flags override the file. Unknown keys, wrong types and
values out of range raise :class:`ConfigError` naming the key, which the command line turns into a
one-line message and exit code 2.

Each key is declared once, in :class:`TrainConfig`, with :func:`saef.app.schema.key`: its default, help line,
range or choices, and what changing it on ``--resume`` means. The flags, the per-key validation, the resume
rules and what a checkpoint records of its run are derived from these declarations (:mod:`saef.app.schema`);
:meth:`TrainConfig._check_relations` holds what no single declaration can say (how keys constrain each other).

Example ``run.toml``::

    method = "saef"
    compressor = "sign"
    workers = 4
    average_every = 10
    lr_milestones = [20, 30]
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .. import files
from ..backends.registry import available_backends
from ..core import PRECISIONS, AlgorithmConfig
from ..core.config import check_lr
from ..core.rules import available_rules
from ..compress import make_compressor
from ..zoo.datasets import DATASETS, GENERATED, default_size, file_keys, readers_phrase
from ..zoo.models import MODELS
from . import schema
from .schema import FREE, REFUSED, RESETS_ERRORS, ConfigError, key

__all__ = ["TrainConfig", "ConfigError", "load_config", "train_methods", "resume_config"]

_INT_MAX = (1 << 31) - 1
MAX_TIMEOUT = 7 * 24 * 3600.0  # a week: longer than any wait a run should make


def train_methods():
    """``sgd`` (the full-precision baseline) and every registered feedback rule."""
    return ("sgd",) + available_rules()


def _increasing(milestones) -> None:
    if list(milestones) != sorted(set(milestones)):
        raise ValueError(f"lr_milestones = {milestones!r} is not allowed: must be increasing epochs >= 1")


def _device(device: str) -> None:
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"device = {device!r} is not allowed: choose auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run: each key declared once (:func:`saef.app.schema.key`) with its
    default, help line, range or choices, and what changing it on ``--resume`` means; the flags, the
    validation, the resume rules and the checkpoint identity are derived from these declarations."""

    # --- the algorithm ---
    method: str = key("saef", on_resume=RESETS_ERRORS, choices=train_methods,
                      help="{choices} (sgd: the full-precision momentum SGD baseline; the others are feedback rules: "
                           "ef21 = EF21-SGDM with an EF21-P downlink, direct = compressed SGD without feedback)")
    optimizer: str = key("sgd", on_resume=RESETS_ERRORS,  # (its names are checked by the algorithm's config)
                         help="the local optimizer: sgd (momentum SGD) or adam (compressed-momentum Adam: with ef, 1-bit Adam's "
                              "scheme with the paper's scaled sign; SAEF-Adam with saef; no bias correction, v frozen after --warmup-steps); with --method sgd, the "
                              "optimizer's full-precision baseline")
    compressor: Optional[str] = key(None, on_resume=RESETS_ERRORS,
                                    help="identity, sign, topk:RHO (topk:RHO:chunk=N: per chunk of N entries), dcttopk:RHO[:chunk=N], randk:RHO[:unbiased], "
                                         "qsgd:S, natural or powersgd:R; any that sends floats with :bf16 or :fp16 for 16-bit values, or "
                                         ":int8, :int4, :int2 for b-bit values with a scale per 64 (:int8sr ...: stochastic rounding) "
                                         "(default topk:0.01; identity for sgd)")
    server_compressor: Optional[str] = key(None, on_resume=RESETS_ERRORS,
                                           help="the server's compressor in double-way mode (default: the workers')")
    workers: int = key(4, on_resume=RESETS_ERRORS, range=(1, 1 << 16), help="number of workers K")
    double_way: bool = key(True, on_resume=RESETS_ERRORS, off_flag="--single-way",
                           help="compress what the server sends back (--single-way: send the dense average)")
    average_every: Optional[int] = key(None, on_resume=FREE, range=(1, _INT_MAX), none_word="never",
                                       help="error-averaging period p in steps, or 'never' (the default; ef and saef only)")
    warmup_steps: int = key(0, on_resume=RESETS_ERRORS, range=(0, _INT_MAX),
                            help="the first N steps exchange dense fp32 values both ways (counted), then the compressors take over")
    momentum: float = key(0.9, on_resume=FREE, help="momentum mu in [0, 1) (optimizer sgd, or inner optimizer sgd with "
                                                   "--local-steps; adam and adamw take --betas)")
    betas: Optional[List[float]] = key(None, on_resume=FREE, help="optimizer adam: b1,b2, each in [0, 1) (default 0.9,0.999)")
    eps: Optional[float] = key(None, on_resume=FREE, help="optimizer adam: eps > 0 added to sqrt(v) (default 1e-8)")
    weight_decay: float = key(0.0, on_resume=FREE,
                              help="weight decay (sgd: added to the gradient; adam: decoupled, x <- x - lr wd x)")
    error_decay: float = key(1.0, on_resume=FREE, help="ef, saef: the worker error enters the next uplink as B e_k (SAEF's "
                                                        "point is x - B e_k); 1 is Algorithm 1, SparseLoCo uses 0.95")
    # --- local steps (the DiLoCo family): H inner steps per worker between exchanges ---
    local_steps: Optional[int] = key(None, on_resume=RESETS_ERRORS, range=(1, _INT_MAX),
                                     help="H: each worker takes H steps of --inner-optimizer (with --lr, --momentum, "
                                          "--weight-decay, --betas, --eps), then the workers exchange what the round changed "
                                          "(rules ef, saef, direct; --warmup-steps and --average-every then count rounds); "
                                          "unset: every step exchanges")
    inner_optimizer: str = key("sgd", on_resume=RESETS_ERRORS, choices=("sgd", "adamw"),
                               help="with --local-steps: each worker's optimizer, sgd (torch.optim.SGD) or adamw "
                                    "(torch.optim.AdamW, with bias correction)")
    outer_lr: float = key(1.0, on_resume=FREE, help="with --local-steps: the outer step's learning rate (DiLoCo: 0.7)")
    outer_momentum: float = key(0.0, on_resume=FREE,
                                help="with --local-steps: the outer step's momentum in [0, 1) (DiLoCo: 0.9, with --nesterov)")
    nesterov: bool = key(False, on_resume=FREE, help="with --local-steps: the outer step is Nesterov's (needs --outer-momentum)")
    # --- the schedule ---
    lr: float = key(0.1, on_resume=FREE, check=check_lr, help="learning rate")
    lr_milestones: List[int] = key([20], on_resume=FREE, range=(1, _INT_MAX), check=_increasing,
                                   help="comma-separated epochs after which the lr is multiplied by --lr-decay")
    lr_decay: float = key(0.1, on_resume=FREE, range=(0, 1), low_open=True, help="learning-rate decay factor at each milestone")
    epochs: int = key(30, on_resume=FREE, range=(1, _INT_MAX), help="number of epochs")
    batch_size: int = key(128, on_resume=REFUSED, range=(1, _INT_MAX), help="global batch size (divisible by workers)")
    seed: int = key(0, on_resume=REFUSED, range=(0, (1 << 32) - 1),  # (MNIST-1D seeds numpy's legacy generator)
                    help="random seed (model init, data order, augmentation, random compressors' draws)")
    # --- data and model ---
    dataset: str = key("mnist1d", on_resume=REFUSED, choices=lambda: tuple(DATASETS),
                       help="{choices} (libsvm reads --data-file; text models bytes of Python's standard library .py "
                            "files, with model gpt)")
    dataset_size: Optional[int] = key(None, on_resume=REFUSED, range=(1, _INT_MAX),
                                      help="samples to generate (mnist1d) or keep (others); text: bytes of the corpus (default 2000000)")
    data_file: Optional[str] = key(None, on_resume=REFUSED,
                                   help="libsvm: the LIBSVM/svmlight file to train on (labels -1/+1 or 0/1); text: a text file to "
                                        "model instead of the standard library's .py files")
    test_file: Optional[str] = key(None, on_resume=REFUSED,
                                   help="libsvm: a file to test on (default: the training file, so the metrics are the objective's)")
    holdout: int = key(0, on_resume=REFUSED, range=(0, _INT_MAX),
                       help="the last N training samples are not trained on but evaluated each epoch (val_loss, val_acc), "
                            "to choose hyperparameters without looking at the test set")
    full_batch: bool = key(False, on_resume=REFUSED,
                           help="each worker takes its whole contiguous shard every step (gradient descent; one step an "
                                "epoch); adds ||grad f(x)||^2 on the training set to the metrics")
    data_dir: str = key("~/.cache/saef", on_resume=FREE, help="folder holding the datasets (MNIST-1D is generated and cached there)")
    model: str = key("cnn1d", on_resume=REFUSED, choices=lambda: tuple(MODELS),
                     help="{choices} (logreg: binary, with the non-convex regulariser; gpt: a byte-level transformer, "
                          "with dataset text)")
    gpt_layers: int = key(2, on_resume=REFUSED, range=(1, 1024), help="model gpt: transformer blocks")
    gpt_width: int = key(128, on_resume=REFUSED, range=(1, 1 << 16), help="model gpt: width (a multiple of --gpt-heads)")
    gpt_heads: int = key(4, on_resume=REFUSED, range=(1, 1024), help="model gpt: attention heads")
    context: int = key(64, on_resume=REFUSED, range=(1, 1 << 20),
                       help="dataset text / model gpt: bytes per sample, the model's context")
    # --- where and how it runs ---
    # precision is fixed for a run: every gradient of it is computed at one precision (the saved state is fp32 either way)
    precision: str = key("fp32", on_resume=REFUSED, choices=lambda: tuple(PRECISIONS),
                         help="fp32, or bf16: forward and backward under autocast; parameters, momentum and errors stay fp32")
    device: str = key("auto", on_resume=FREE, check=_device, help="auto (cuda when available), cpu, cuda or cuda:N")
    # backend is fixed: a simulator checkpoint is one file holding the K workers, a dist one is a file per rank
    backend: str = key("sim", on_resume=REFUSED, choices=available_backends,
                       help="sim (K workers in this process) or dist (one worker per torch.distributed rank)")
    server: str = key("sharded", on_resume=RESETS_ERRORS, choices=("sharded", "rank0"),
                      help="dist only: sharded (each rank serves a share of the layers) or rank0")
    timeout: float = key(300.0, on_resume=FREE, range=(0, MAX_TIMEOUT), low_open=True,  # every wait is bounded by it
                         help="dist only: seconds any wait on another rank (the rendezvous included) may take before "
                              "failing; finite")
    overlap: bool = key(False, on_resume=FREE,
                        help="dist only: compress and send each bucket of layers while backward makes the next (same results)")
    bucket_mb: float = key(1.0, on_resume=FREE, range=(0, 1 << 20), low_open=True,
                           help="dist only, with --overlap: the most MB of gradients in one bucket")
    # --- records and checkpoints ---
    output: Optional[str] = key(None, on_resume=FREE, help="run directory (default: runs/<dataset>-<model>-<method>-...-<time>)")
    checkpoint_every: int = key(0, on_resume=FREE, range=(0, _INT_MAX),
                                help="also checkpoint every N steps (0: only at the end of each epoch)")
    keep_checkpoints: int = key(3, on_resume=FREE, range=(1, 1 << 16), help="how many recent checkpoints to keep")
    tensorboard: bool = key(False, on_resume=FREE, help="also write the metrics, and every step's train loss, as TensorBoard "
                                                        "scalars to RUN_DIR/tensorboard (pip install saef[tensorboard])")
    eval_every: int = key(0, on_resume=FREE, range=(0, _INT_MAX),
                          help="also evaluate at every step number divisible by N (but an epoch's last, whose row is the epoch's), "
                               "to RUN_DIR/steps.jsonl and steps.csv (0: at the end of each epoch only; training is the same either way)")
    log_every: int = key(0, on_resume=FREE, range=(0, _INT_MAX),
                         help="where the output is not a terminal (a log file, a job scheduler): a progress line every N "
                              "steps (0: every 30 seconds)")
    max_nonfinite_skips: int = key(5, on_resume=FREE, range=(0, _INT_MAX),
                                   help="steps with a NaN/Inf loss or gradient are skipped; stop after this many in a row (0: at once)")

    def __post_init__(self):
        for f in dataclasses.fields(self):  # each key by its declaration: type, range, choices, check
            schema.check_value(f, getattr(self, f.name))
        self._check_relations()

    def _check_relations(self) -> None:
        """What one key's declaration cannot say: how keys constrain each other."""
        def bad(key, value, allowed):
            raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")

        if self.method == "sgd" and self.compressor not in (None, "identity"):
            bad("compressor", self.compressor, "method sgd is the full-precision baseline; use identity")
        if self.local_steps is not None and self.overlap:
            bad("overlap", self.overlap, "local steps exchange once a round, after it: there is no backward to overlap")
        if self.method == "sgd" and self.average_every is not None:
            bad("average_every", self.average_every, "method sgd has no error to average; leave it unset")
        if self.batch_size % self.workers and not self.full_batch:
            bad("batch_size", self.batch_size, f"must be divisible by workers = {self.workers}")
        if self.dataset == "libsvm" and not self.data_file:
            bad("data_file", self.data_file, "dataset libsvm reads a LIBSVM/svmlight file: give --data-file PATH")
        for name in ("data_file", "test_file"):  # only for the datasets registered as reading that file
            if getattr(self, name) is not None and name not in file_keys(self.dataset):
                bad(name, getattr(self, name), f"is for {readers_phrase(name)}, not {self.dataset}")
        if (self.model == "gpt") != (self.dataset == "text"):
            bad("model", self.model, f"model gpt and dataset text go together (dataset is {self.dataset})")
        if self.gpt_width % self.gpt_heads:
            bad("gpt_width", self.gpt_width, f"must be a multiple of gpt_heads = {self.gpt_heads}")
        if self.dataset_size is not None and self.dataset_size > GENERATED.get(self.dataset, self.dataset_size):
            bad("dataset_size", self.dataset_size, f"{self.dataset} generates at most {GENERATED[self.dataset]} here")
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

    def algorithm(self) -> AlgorithmConfig:
        """The algorithm this run trains with, resolved once: ``sgd`` is EF with the identity compressor,
        single-way and without error averaging (exactly momentum SGD)."""
        sgd = self.method == "sgd"
        adam = self.optimizer == "adam" or (self.local_steps is not None and self.inner_optimizer == "adamw")
        shared = {name: getattr(self, name) for name in AlgorithmConfig.FIELDS if name in _FIELDS}  # same name, same meaning
        return AlgorithmConfig(**{
            **shared,
            "method": "ef" if sgd else self.method,
            "momentum": 0.0 if adam else self.momentum,  # (Adam's momentum is b1)
            "betas": None if self.betas is None else tuple(self.betas),
            "compressor": self.worker_compressor,
            "double_way": self.double_way and not sgd,
        })

    @property
    def description(self) -> str:
        """The method as the summary prints it, e.g. ``saef (topk:0.01, double-way, K=4)``."""
        way = "double" if self.algorithm().double_way else "single"
        optimizer = f"{self.optimizer}, " if self.optimizer != "sgd" else ""
        rounds = f", H={self.local_steps} ({self.inner_optimizer})" if self.local_steps is not None else ""
        return f"{self.method} ({optimizer}{self.worker_compressor}, {way}-way, K={self.workers}{rounds})"

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


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


_CONFIG_MAX_BYTES = 1 << 20  # a config file is a few lines; read no more than this of one


# A model's own defaults for the keys a run does not give (measured: ``saef reproduce adam`` -- the GPT with
# momentum SGD at lr 0.1, the global default, ended at 3.96 bits per byte; SAEF-Adam at lr 3e-4 with 200
# full-precision steps at 2.27). Not applied with local steps (whose workers' optimizer is inner_optimizer).
MODEL_DEFAULTS: Dict[str, Dict[str, Any]] = {"gpt": {"optimizer": "adam", "lr": 3e-4, "warmup_steps": 200}}


def _model_defaults(values: Dict[str, Any]) -> Dict[str, Any]:
    """Put the model's own defaults (:data:`MODEL_DEFAULTS`) into ``values`` where a key is not given; returns
    what was put."""
    model = values.get("model", schema.default_of(next(f for f in dataclasses.fields(TrainConfig) if f.name == "model")))
    if values.get("local_steps") is not None or not isinstance(model, str):
        return {}
    applied = {k: v for k, v in MODEL_DEFAULTS.get(model, {}).items() if k not in values}
    values.update(applied)
    return applied


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                model_defaults: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (keys with value None are skipped); the
    model's own defaults (:data:`MODEL_DEFAULTS`) for keys given by neither, recorded in ``model_defaults``."""
    values: Dict[str, Any] = {}
    if path is not None:
        try:
            with os.fdopen(files.open_regular(path), "rb") as handle:  # (a FIFO or a device is refused, not read)
                text = handle.read(_CONFIG_MAX_BYTES + 1)
            if len(text) > _CONFIG_MAX_BYTES:
                raise ConfigError(f"config file {path} is larger than {_CONFIG_MAX_BYTES} bytes: not a config file")
            values = tomllib.loads(text.decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        except ConfigError:
            raise
        except files.NotRegularFile as error:
            raise ConfigError(f"config file {path} cannot be read: it is {error.kind}, not a regular file") from None
        except (ValueError, RecursionError) as error:  # an integer of thousands of digits, arrays nested too deep
            what = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
            raise ConfigError(f"config file {path} is not a usable TOML file: {what}") from None
        except OSError as error:  # a directory, no permission, ...
            raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values = schema.none_words(TrainConfig, values)
    applied = _model_defaults(values)
    if model_defaults is not None:
        model_defaults.update(applied)
    _workers_of_the_job(values)
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    try:
        return TrainConfig(**values)
    except TypeError as error:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(error)) from None


def default_output(config: TrainConfig, stamp: str) -> Path:
    name = f"{config.dataset}-{config.model}-{config.method}-{config.worker_compressor.replace(':', '')}-K{config.workers}"
    if config.optimizer != "sgd":
        name += f"-{config.optimizer}"
    if config.local_steps is not None:
        name += f"-H{config.local_steps}{'' if config.inner_optimizer == 'sgd' else '-' + config.inner_optimizer}"
    if config.method != "sgd":
        name += "-DC" if config.double_way else "-SC"
    if config.average_every is not None:
        name += f"-p{config.average_every}"
    return Path("runs") / f"{name}-seed{config.seed}-{stamp}"


def _workers_of_the_job(values: Dict[str, Any]) -> None:
    """``backend = "dist"`` under a launcher runs one worker per process: K is the job's size (WORLD_SIZE),
    filled in here so that what depends on K (the batch's divisibility) is checked against it, and a
    ``workers`` that says otherwise is refused."""
    world = os.environ.get("WORLD_SIZE", "")
    if values.get("backend") != "dist" or not world.isdigit() or int(world) < 1:
        return
    if values.get("workers", int(world)) != int(world):
        raise ConfigError(f"workers = {values['workers']!r}, but this torch.distributed job has {world} processes and "
                          "--backend dist runs one worker per process: leave --workers out")
    values["workers"] = int(world)


def resume_config(saved: Dict[str, Any], overrides: Dict[str, Any], reset_errors: bool) -> "tuple[TrainConfig, Dict[str, Any]]":
    """The config of a resumed run: the saved one with ``overrides`` (flags the user gave) applied.

    Returns ``(config, changed)``. Raises :class:`ConfigError` when an override changes a key whose
    declaration says a change is refused, or resets the errors (unless ``reset_errors``): worker count,
    method or compressors; the data, the model, the seed, the precision or the backend.
    """
    known = {k: v for k, v in saved.items() if k in _FIELDS}
    given = schema.none_words(TrainConfig, {k: v for k, v in overrides.items() if v is not None and k in _FIELDS})
    here = {"output": given.pop("output")} if "output" in given else {}  # the run directory, wherever it now is
    before = _meaning(TrainConfig(**known))
    after = _meaning(TrainConfig(**{**known, **given}))  # (a value out of range is refused here, by its key)
    changed = {k: (before[k], after[k]) for k in given if before[k] != after[k]}  # what means the same is no change
    schema.refuse_resume_changes(TrainConfig, changed, reset_errors)
    return TrainConfig(**{**known, **here, **{k: given[k] for k in changed}}), changed


def _meaning(config: TrainConfig) -> Dict[str, Any]:
    """``config.to_dict()`` with values that mean the same written the same way: compressors by their
    registered name (``topk:0.010`` is ``topk:0.01``), a generated dataset's default size by its number."""
    values = config.to_dict()
    for name in ("compressor", "server_compressor"):
        if values[name] is not None:
            values[name] = make_compressor(values[name]).name
    if values["dataset_size"] is None:
        values["dataset_size"] = default_size(config.dataset)
    return values
