"""The rows of a run's records: what the loop measures at the end of each epoch and, with ``--eval-every N``,
every N steps within an epoch (the columns of :data:`saef.app.records.METRIC_COLUMNS`).

An evaluation reads the trainer's iterates into a model of its own (``run.eval_model``) and draws no random
numbers, so a run with ``--eval-every`` trains exactly as one without it. Every process evaluates (the train
loss is averaged over them); the main one writes the row.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import torch

from ..zoo.datasets import Data
from .feed import evaluate, gradient_norm_sq

Run = Any  # saef.app.loop.Run (the loop imports this module)

__all__ = ["epoch_row", "step_row", "record_step_row"]


def _phase(first: int, end: int, warmup: int) -> str:
    """The phase of the steps first .. end - 1: warmup, compressed, or warmup+compressed."""
    if end <= warmup:
        return "warmup"
    return "compressed" if first >= warmup else "warmup+compressed"


def _bits_per_token(data: Data, metrics: Optional[Dict[str, float]]) -> Optional[float]:
    """The loss in bits per token (byte) for token data (text), else None."""
    return metrics["loss"] / math.log(2) if data.tokens and metrics is not None else None


def _row(run: Run, epoch: float, mismatch_scale: Optional[float]) -> Dict[str, Any]:
    """The metrics now: the train loss is the mean over this epoch's steps so far; the mismatch terms are the
    epoch's running sums times ``mismatch_scale`` (None: not measured in this row)."""
    loop, trainer, config = run.loop, run.trainer, run.config
    train_loss = trainer.average(torch.tensor(loop.losses, dtype=torch.float64).mean().item()) if loop.losses else None
    at_x = evaluate(trainer.load_into(run.eval_model, point="x"), run.data.test, run.device)
    grad_norm_sq = gradient_norm_sq(run.eval_model, run.data.train, run.device) if config.full_batch else None
    at_val = evaluate(run.eval_model, run.data.val, run.device) if run.data.val is not None else None
    diagnostics = trainer.has_diagnostics
    at_aux = evaluate(trainer.load_into(run.eval_model, point="auxiliary"), run.data.test, run.device) if diagnostics else None
    measured = diagnostics and mismatch_scale is not None
    return {
        "epoch": epoch,
        "step": loop.step,
        "rounds": trainer.rounds,
        "lr": config.lr_at_epoch(loop.epoch),
        "phase": _phase(loop.step - loop.step_in_epoch, loop.step, config.warmup_steps),
        "train_loss": train_loss,
        "test_loss": at_x["loss"],
        "test_acc": at_x["acc"],
        "test_loss_aux": at_aux and at_aux["loss"],
        "test_acc_aux": at_aux and at_aux["acc"],
        "test_bpb": _bits_per_token(run.data, at_x),
        "test_bpb_aux": _bits_per_token(run.data, at_aux),
        "grad_norm_sq": grad_norm_sq,
        "val_loss": at_val and at_val["loss"],
        "val_acc": at_val and at_val["acc"],
        **trainer.bits,
        "bits_per_round": sum(trainer.bits.values()) / trainer.rounds if trainer.rounds else None,
        "mismatch_ef": loop.mismatch_ef * mismatch_scale if measured else None,
        "mismatch_saef": loop.mismatch_saef * mismatch_scale if measured else None,
        "skipped_steps": loop.skipped,
        "epoch_time": time.perf_counter() - run.epoch_started,
        "wall_time": time.perf_counter() - run.started,
    }


def epoch_row(run: Run) -> Dict[str, Any]:
    """The row of the epoch just trained."""
    return _row(run, run.loop.epoch + 1, 1.0)


def step_row(run: Run, steps_per_epoch: int) -> Dict[str, Any]:
    """A row within the epoch (``--eval-every``): ``epoch`` is the epochs done (2.5 halfway through the third);
    the mismatch terms are the mean over the epoch's steps so far where they are measured every step, and
    not measured otherwise (one dense all-reduce, at the epoch's end)."""
    loop = run.loop
    scale = steps_per_epoch / loop.step_in_epoch if run.trainer.cheap_diagnostics else None
    return _row(run, loop.epoch + loop.step_in_epoch / steps_per_epoch, scale)


def record_step_row(run: Run, steps_per_epoch: int) -> None:
    """Measure a row within the epoch, write it to ``steps.jsonl`` / ``steps.csv`` and log it."""
    row = step_row(run, steps_per_epoch)
    if run.record is not None:
        run.record.append(row, stem="steps")
    loss = "" if row["train_loss"] is None else f"  train loss {row['train_loss']:.4f}"
    run.log(f"step {row['step']} (epoch {row['epoch']:.2f}){loss}  test loss {row['test_loss']:.4f}  "
            f"test acc {100 * row['test_acc']:.2f}%")
