"""The training loop behind ``saef train``: data, model, trainer, evaluation and the run record.

No algorithm math here, and no question of which backend or rule runs: the backend comes from the
registry (:mod:`saef.backends.registry`) and builds a :class:`~saef.core.Trainer`, which takes global
batches and does the algorithm; this module feeds it, evaluates x (and x~ where the rule defines it)
after every epoch, writes the records and checkpoints. In a distributed run every rank runs this loop;
rank 0 writes the records, every rank its checkpoint shard.

Example::

    >>> from saef.app.config import TrainConfig
    >>> summary = train(TrainConfig(dataset="synthetic", epochs=2, output="runs/try"))
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..backends.registry import make_backend
from ..core import NonFiniteStep, Trainer
from ..zoo.datasets import Data, DatasetSplit, content_digest, epoch_batches, hold_out, load_dataset
from ..zoo.models import build_model
from . import checkpoint, hooks, rows, rundir, schema
from .config import TrainConfig
from .feed import local_batch
from .progress import progress_lines
from .records import RunRecord, environment, format_summary

__all__ = ["train", "LoopState", "TrainingFailed", "WriteFailed"]


class TrainingFailed(RuntimeError):
    """The backend failed under the run (a peer died or hung, the network broke); the message says how."""


class WriteFailed(OSError):
    """The run's files could not be written (a full or read-only disk); the message says what a resume has."""


def _what_is_left(run: "Run", error: OSError) -> str:
    if run.last_checkpoint is None:
        return f"could not write the run's files: {error}; no checkpoint was written yet (start the run again once there is room)"
    return (f"could not write the run's files: {error}; the newest complete checkpoint (step {run.last_checkpoint}) is "
            f"intact (resume with --resume {run.output} once there is room)")


@dataclass
class LoopState:
    """Where the loop is; all of it goes into checkpoints, so a resumed run continues exactly."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps taken (skipped ones included)
    step_in_epoch: int = 0  # steps taken in the current epoch
    epoch_order: Optional[torch.Tensor] = None  # the data-order generator's state when this epoch began
    losses: List[float] = field(default_factory=list)  # this epoch's step losses
    mismatch_ef: float = 0.0  # this epoch's running mean of the mismatch terms (every-step diagnostics)
    mismatch_saef: float = 0.0
    skipped: int = 0  # steps skipped for a NaN or Inf, cumulative
    consecutive_skips: int = 0
    elapsed: float = 0.0  # seconds of the run before this process started (resume)
    epoch_elapsed: float = 0.0  # seconds of the current epoch before this process started

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Dict[str, Any]) -> "LoopState":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(saved, dict) or set(saved) != names:
            raise checkpoint.CheckpointError(f"the checkpoint's loop state holds {sorted(saved) if isinstance(saved, dict) else saved!r}, "
                                             f"expected {sorted(names)}")
        return cls(**saved)


@dataclass
class Run:
    """One training run in this process: what the loop's parts share."""

    config: TrainConfig
    backend: Any
    trainer: Trainer
    data: Data
    device: torch.device
    eval_model: nn.Module
    output: Path
    loop: LoopState
    order: torch.Generator  # the data order, one permutation per epoch
    record: Optional[RunRecord]  # rank 0 only
    rows: List[Dict[str, Any]]
    log: Callable[[str], None]
    progress: bool
    started: float = 0.0  # perf_counter at the run's start, minus the time of earlier processes
    epoch_started: float = 0.0  # the same for the current epoch
    last_checkpoint: Optional[int] = None  # the step of the newest checkpoint on disk (None: none yet)
    launches: List[Optional[str]] = field(default_factory=list)  # every process's launcher (Backend.launches)

    @property
    def folder(self) -> Path:
        return self.output / "checkpoints"

    def environment(self) -> Dict[str, Any]:
        return environment(str(self.device), self.launches)


def train(config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] = print, resume: bool = False,
          reset_errors: bool = False, changed: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run ``config`` to the end and return the summary (also written to ``summary.json``; ``{}`` on
    processes other than the main one).

    ``resume`` continues the run in ``config.output`` from its newest complete checkpoint (exactly: same
    batches, same random numbers, same records); ``reset_errors`` starts the algorithm's state (momentum,
    errors, estimates) afresh from the saved model iterate instead (required when the number of workers, method or
    compressor changed).
    """
    backend = make_backend(config.backend, device=config.device, timeout=config.timeout, server=config.server,
                           overlap_bytes=int(config.bucket_mb * (1 << 20)) if config.overlap else 0)
    run = None
    try:
        run = _start(config, backend, log, progress, resume, reset_errors, changed)
        while run.loop.epoch < run.config.epochs:
            _run_epoch(run)
            _end_epoch(run)
        summary = _finish(run)
    except (ValueError, FloatingPointError, OSError, checkpoint.CheckpointError) as error:
        backend.close()  # bad input, files or a diverged run: the job itself is healthy, leave it cleanly
        if isinstance(error, OSError) and run is not None:  # the run's files (a full disk): say what is left
            raise WriteFailed(_what_is_left(run, error)) from error
        raise
    except RuntimeError as error:
        message = backend.failure_message(error)
        if message is None:
            raise
        raise TrainingFailed(message) from error
    finally:
        if run is not None and run.record is not None:
            run.record.close()  # no longer this directory's writer
    run = None  # (the trainer lets go of its process groups, so that destroying them frees them now)
    backend.close()
    return summary


def _start(config, backend, log, progress, resume, reset_errors, changed) -> Run:
    """Join the job, load the data, build model and trainer, and open (or reopen) the run directory."""
    device, workers = backend.start(config.workers)
    if workers != config.workers:  # one worker per process (a resumed run's K changes with the job's size)
        changed = {**(changed or {}), "workers": (config.workers, workers)} if resume else changed
        config = config.replace(workers=workers)  # (re-validates the batch's divisibility)
    data = backend.main_first(lambda: load_dataset(config.dataset, config.data_dir, size=config.dataset_size, seed=config.seed,
                                                   data_file=config.data_file, test_file=config.test_file, context=config.context))
    if config.holdout:
        data = hold_out(data, config.holdout)
    if config.full_batch and len(data.train) < config.workers:
        raise ValueError(f"full_batch: the training set ({len(data.train)} samples) has fewer samples than workers ({config.workers})")
    if len(data.train) < config.batch_size and not config.full_batch:
        raise ValueError(f"batch_size = {config.batch_size} is larger than the training set ({len(data.train)} samples)")
    if isinstance(data.train, DatasetSplit) and data.augment is None:
        same = data.test is data.train
        data.train, data.val = data.train.to(device), None if data.val is None else data.val.to(device)
        data.test = data.train if same else data.test.to(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data, **config.model_options()).to(device)
    backend.agree(_identity(config, model, data, backend.processes))  # ranks that disagree stop here, before any training collective
    trainer = backend.make_trainer(model, config.algorithm(), config.precision)
    output, resume, launches = rundir.choose(config, backend, resume)
    order = torch.Generator().manual_seed(config.seed)
    run = Run(config, backend, trainer, data, device, copy.deepcopy(model), output, LoopState(epoch_order=order.get_state()),
              order, None, [], log if trainer.is_main else (lambda message: None), progress, launches=launches)
    error = None
    try:  # the record claims the run directory for this process (refused if another process holds it)
        if resume:
            _resume(run, reset_errors, changed)
        elif trainer.is_main:
            run.record = RunRecord(output, config.to_dict(), run.environment())
        run.rows = run.record.rows() if run.record is not None else []
    except (ValueError, OSError, checkpoint.CheckpointError) as failure:  # on some processes only, maybe
        error = failure
    except BaseException:
        if run.record is not None:
            run.record.close()
        raise
    if error is not None and run.record is not None:
        run.record.close()
    backend.settle(error)  # every process stops together if one failed here
    run.started = time.perf_counter() - run.loop.elapsed
    run.log(f"saef: training {config.model} on {config.dataset} ({len(data.train)} train / {len(data.test)} test) "
            f"with {config.method} {config.worker_compressor}, K={config.workers} ({config.backend}), on {device}; "
            f"records in {output}")
    if backend.ignored():
        run.log(f"saef: note: the {config.backend} backend does not use {', '.join(backend.ignored())} "
                f"(settings of a multi-process job); they change nothing here")
    return run


def _identity(config: TrainConfig, model: nn.Module, data: Data, processes: int) -> Dict[str, Any]:
    """What every process of a run must agree on: the resolved settings (all but the device and the data
    folder, which are the host's own), the data files' contents (where read from files), the data as
    loaded (where there are other processes to compare with) and the model's tensors."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "data_dir")}
    tensors = [(name, tuple(t.shape), str(t.dtype)) for name, t in (*model.named_parameters(), *model.named_buffers())]
    loaded = content_digest(data) if processes > 1 else None
    return {**settings, "data sha256": data.digest, "data loaded (sha256)": loaded, "model tensors": tensors}


def _resume(run: Run, reset_errors: bool, changed: Optional[Dict[str, Any]]) -> None:
    """Load the newest complete checkpoint into the trainer, the loop, the RNGs and the records."""
    rank, processes = run.backend.rank, run.backend.processes
    saved = checkpoint.load_latest(run.folder, rank=0 if reset_errors else rank, world=None if reset_errors else processes,
                                   agree=run.backend.gather())  # every rank loads the same step
    if saved is None:  # stopped before its first checkpoint: the one way forward is to start it again
        _restart_from_scratch(run, changed)
        return
    if not isinstance(saved, dict):
        raise checkpoint.CheckpointError(f"the newest checkpoint in {run.folder} does not hold a saef run's state")
    differences = schema.identity_differences(TrainConfig, saved.get("config"), _state_config(run.config, run.data), reset_errors)
    if differences:  # config.json no longer says what the checkpoint was written with
        raise checkpoint.CheckpointError(f"the checkpoint in {run.output} was written with another run's settings: "
                                         f"{'; '.join(differences)}; resume it with the settings it was written with")
    try:  # every part is checked as it is applied; a checkpoint of the wrong structure is refused whole
        run.trainer.load_state_dict(saved["trainer"], reset_errors=reset_errors)
        run.loop = LoopState.from_dict(saved["loop"])
        checkpoint.restore_rng(saved["rng"])
        run.order.set_state(run.loop.epoch_order)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        raise checkpoint.CheckpointError(f"the newest checkpoint in {run.folder} does not hold this run's state "
                                         f"({type(error).__name__}: {error})") from None
    run.last_checkpoint = run.loop.step
    if run.config.epochs < run.loop.epoch:  # a summary would contradict the rows already written
        raise ValueError(f"{run.output} has already trained {run.loop.epoch} epochs; --epochs must be at least that")
    event = {"step": run.loop.step, "changed": {k: list(v) for k, v in (changed or {}).items()}, "reset_errors": reset_errors}
    if run.trainer.is_main:
        run.record = RunRecord(run.output, run.config.to_dict(), run.environment(), resume_rows=run.loop.epoch, event=event)
    run.log(f"saef: resuming {run.output} at epoch {run.loop.epoch + 1}, step {run.loop.step}"
            + (" with errors reset" if reset_errors else ""))


def _restart_from_scratch(run: Run, changed: Optional[Dict[str, Any]]) -> None:
    """--resume of a run directory that has no checkpoint yet: the run starts again from its beginning, in
    the same directory (the trainer and the loop are as a new run's), and says so."""
    if not (run.output / "config.json").is_file():
        raise checkpoint.CheckpointError(f"{run.output} has no checkpoint to resume from, and no config.json: "
                                         "it is not a run directory saef train made")
    steps = {path.name.split(".")[0] for path in run.folder.glob("step-*.pt")}
    if len(steps) > 1 or os.path.lexists(run.folder / checkpoint.MANIFEST):
        # checkpoints written but none listed: the manifest was lost, and starting again would lose the records.
        # (The files of one step are a first checkpoint cut short before it was listed: it is written again.)
        raise checkpoint.CheckpointError(f"{run.folder} holds checkpoint files but no usable manifest; "
                                         "nothing was changed (move them away to start the run again)")
    event = {"step": 0, "changed": {k: list(v) for k, v in (changed or {}).items()}, "from_scratch": True}
    if run.trainer.is_main:
        run.record = RunRecord(run.output, run.config.to_dict(), run.environment(), resume_rows=0, event=event)
    run.log(f"saef: {run.output} stopped before its first checkpoint; starting it again from the beginning")


def _state_config(config: TrainConfig, data: Data) -> Dict[str, Any]:
    """What a checkpoint records of its run, to be checked when it is resumed: every key whose change on resume
    is not free (by its declaration, :func:`saef.app.schema.identity`) and the data files' contents."""
    return {**schema.identity(config), "data sha256": data.digest}


def _save_checkpoint(run: Run) -> None:
    """Checkpoint the run -- unless it is skipping non-finite steps: then nothing may replace (or, through
    the retention policy, evict) the healthy checkpoints from before the trouble. A run that reaches its
    end is always checkpointed (its state is as healthy as the skipped steps left it: they changed nothing)."""
    if run.loop.consecutive_skips and run.loop.epoch < run.config.epochs:
        return
    now = time.perf_counter()
    run.loop.elapsed = now - run.started
    state = {"config": _state_config(run.config, run.data), "trainer": run.trainer.state_dict(), "loop": run.loop.to_dict(),
             "rng": checkpoint.capture_rng()}
    checkpoint.save(run.folder, run.loop.step, state, rank=run.backend.rank, world=run.backend.processes,
                    keep=run.config.keep_checkpoints, barrier=run.backend.gather())
    run.last_checkpoint = run.loop.step


def _run_epoch(run: Run) -> None:
    """The remaining steps of the current epoch (all of them, unless resumed mid-epoch)."""
    from tqdm.auto import tqdm

    config, loop = run.config, run.loop
    run.epoch_started = time.perf_counter() - loop.epoch_elapsed
    lr = config.lr_at_epoch(loop.epoch)
    run.order.set_state(loop.epoch_order)  # the order generator as it was when this epoch began
    batches = _epoch_batches(run)
    show = run.progress and run.trainer.is_main
    bar = tqdm(total=len(batches), initial=loop.step_in_epoch, desc=f"epoch {loop.epoch + 1}/{config.epochs}", leave=False,
               disable=None if show else True)  # None: bars on a terminal only
    lines = progress_lines(show, run.log, len(batches), loop.epoch + 1, config.epochs, config.log_every)  # elsewhere: lines
    for indices in batches[loop.step_in_epoch:]:
        _take_step(run, indices, lr, len(batches))
        bar.update()
        if lines is not None:
            lines.update(loop.step_in_epoch, loop.losses)
        if config.eval_every and loop.step % config.eval_every == 0 and loop.step_in_epoch < len(batches):
            rows.record_step_row(run, len(batches))  # (before a checkpoint of this step, which then covers it)
        if config.checkpoint_every and loop.step % config.checkpoint_every == 0 and loop.step_in_epoch < len(batches):
            loop.epoch_elapsed = time.perf_counter() - run.epoch_started
            _save_checkpoint(run)
    bar.close()


def _epoch_batches(run: Run) -> List[torch.Tensor]:
    """The epoch's global batches: shuffled batches of --batch-size, or with --full-batch one batch of the
    whole training set in file order (cut to a multiple of K), so worker k's shard is its contiguous part."""
    n = len(run.data.train)
    if run.config.full_batch:
        return [torch.arange(n - n % run.config.workers)]
    return list(epoch_batches(n, run.config.batch_size, run.order))


def _take_step(run: Run, indices: torch.Tensor, lr: float, steps_per_epoch: int) -> None:
    """One step of the trainer; a step with a NaN or Inf is skipped (and too many in a row stop the run)."""
    config, loop, trainer = run.config, run.loop, run.trainer
    inputs, targets = local_batch(run.data, indices, config.workers, trainer.worker_ids, config.seed, loop.step, run.device)
    try:
        loop.losses.append(float(trainer.step(inputs, targets, lr)))
        loop.consecutive_skips = 0
        if run.record is not None:
            run.record.scalar("train_loss_step", loop.losses[-1], loop.step + 1)
    except NonFiniteStep as error:
        loop.skipped += 1
        loop.consecutive_skips += 1
        if loop.consecutive_skips > config.max_nonfinite_skips:
            where = ("no checkpoint was written before them: start again with a lower --lr" if run.last_checkpoint is None else
                     f"the newest checkpoint (step {run.last_checkpoint}) is from before them: "
                     f"saef train --resume {run.output} --lr LOWER")
            raise FloatingPointError(
                f"{loop.consecutive_skips} step(s) in a row had a NaN or Inf loss or gradient (last at step {loop.step}: "
                f"{error}); stopped. Lower --lr or check the data; {where}") from None
        run.log(f"saef: step {loop.step} skipped: {error}")
    loop.step += 1
    loop.step_in_epoch += 1
    hooks.call(hooks.after_step, loop.step, run.backend.rank)
    if trainer.has_diagnostics and trainer.cheap_diagnostics and loop.consecutive_skips == 0:
        for key, value in trainer.mismatch().items():
            setattr(loop, key, getattr(loop, key) + value / steps_per_epoch)


def _end_epoch(run: Run) -> None:
    """Evaluate, append the epoch's row to the records, log it, and checkpoint."""
    loop, trainer = run.loop, run.trainer
    if not loop.losses:
        raise FloatingPointError(f"every step of epoch {loop.epoch + 1} had a NaN or Inf loss or gradient")
    if trainer.has_diagnostics and not trainer.cheap_diagnostics:  # one dense all-reduce per epoch, at its end
        for key, value in trainer.mismatch().items():
            setattr(loop, key, value)
    row = rows.epoch_row(run)
    run.rows.append(row)
    if run.record is not None:
        run.record.append(row)
    aux = "" if row["test_acc_aux"] is None else f"  test acc at x~ {100 * row['test_acc_aux']:.2f}%"
    run.log(f"epoch {row['epoch']:3d}/{run.config.epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f}  "
            f"test loss {row['test_loss']:.4f}  test acc {100 * row['test_acc']:.2f}%{aux}  ({row['epoch_time']:.1f} s)")
    loop.epoch, loop.step_in_epoch, loop.losses = loop.epoch + 1, 0, []
    loop.mismatch_ef = loop.mismatch_saef = 0.0
    loop.epoch_order, loop.epoch_elapsed = run.order.get_state(), 0.0
    _save_checkpoint(run)


def _finish(run: Run) -> Dict[str, Any]:
    """The summary, the figure and ``summary.json`` (main process only), and the final table."""
    if run.record is None:  # the main process writes the records and the summary
        return {}
    rows, last = run.rows, run.rows[-1]
    summary = {
        "run_dir": str(run.output),
        "epochs": run.config.epochs,
        "steps": run.loop.step,
        "final_test_acc": last["test_acc"],
        "final_test_acc_aux": last["test_acc_aux"],
        "best_test_acc": max(r["test_acc"] for r in rows),
        "final_train_loss": last["train_loss"],
        "final_test_bpb": last["test_bpb"],  # dataset text: validation bits per byte at x (else None)
        "final_test_bpb_aux": last["test_bpb_aux"],
        **{key: last[key] for key in ("bits_up", "bits_down", "bits_averaging", "skipped_steps", "wall_time")},
    }
    from .plots import plot_run

    plot_run(run.output)
    run.record.finish(summary)
    run.log(format_summary(run.config, summary))
    return summary
