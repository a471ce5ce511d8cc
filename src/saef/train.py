"""The training loop behind ``saef train``: data, model, trainer, evaluation and the run record.

No algorithm math here: a *trainer* (the :class:`~saef.simulator.Simulator`, or one rank of a distributed
run) takes global batches and does Algorithm 1; this module feeds it, evaluates x and x~ after every epoch
and writes the records.

Example::

    >>> from saef.config import TrainConfig
    >>> summary = train(TrainConfig(dataset="synthetic", epochs=2, output="runs/try"))
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig, default_output
from .data import Data, DatasetSplit, epoch_batches, load_dataset
from .models import build_model
from .records import RunRecord, environment
from .simulator import Simulator

__all__ = ["train", "resolve_device", "evaluate", "build_trainer"]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device = {name!r} but no CUDA device is available")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, split, device: torch.device, batch_size: int = 1000) -> Dict[str, float]:
    """Mean cross-entropy loss and top-1 accuracy of ``model`` on ``split``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(split), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(split)))
        inputs, targets = split.batch(indices)
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs)
        total_loss += F.cross_entropy(outputs, targets, reduction="sum").item()
        correct += (outputs.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return {"loss": total_loss / count, "acc": correct / count}


def build_trainer(config: TrainConfig, model: nn.Module) -> Simulator:
    """The in-process trainer for ``config`` (the full-precision baseline is EF with identity, single-way,
    which is exactly momentum SGD)."""
    sgd = config.method == "sgd"
    return Simulator(
        model,
        workers=config.workers,
        method=config.algorithm_method,
        compressor=config.worker_compressor,
        server_compressor=config.server_compressor,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        double_way=False if sgd else config.double_way,
        average_every=config.average_every,
    )


def _batches(data: Data, indices: torch.Tensor, generator: torch.Generator, device: torch.device):
    if isinstance(data.train, DatasetSplit):
        inputs, targets = data.train.batch(indices)
        if data.augment is not None:
            inputs = data.augment(inputs, generator)
    else:  # image folders decode and augment on the fly
        inputs, targets = data.train.batch(indices, generator)
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    trainer_factory: Optional[Callable[[TrainConfig, nn.Module], Any]] = None,
) -> Dict[str, Any]:
    """Run ``config`` to the end and return the summary (also written to ``summary.json``).

    ``trainer_factory`` builds the trainer from the config and the initial model (default: the simulator);
    the distributed backend passes its own.
    """
    from tqdm.auto import tqdm

    device = resolve_device(config.device)
    data = load_dataset(config.dataset, config.data_dir, size=config.dataset_size, seed=config.seed)
    if len(data.train) < config.batch_size:
        raise ValueError(f"batch_size = {config.batch_size} is larger than the training set ({len(data.train)} samples)")
    if isinstance(data.train, DatasetSplit) and data.augment is None:
        data.train, data.test = data.train.to(device), data.test.to(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data).to(device)
    trainer = (trainer_factory or build_trainer)(config, model)
    eval_model = copy.deepcopy(model)
    output = Path(config.output) if config.output else default_output(config, time.strftime("%Y%m%d-%H%M%S"))
    record = RunRecord(output, config.to_dict(), environment(str(device)))
    log(f"saef: training {config.model} on {config.dataset} ({len(data.train)} train / {len(data.test)} test) "
        f"with {config.method} {config.worker_compressor}, K={config.workers}, on {device}; records in {output}")

    order = torch.Generator().manual_seed(config.seed)
    augment_rng = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = len(data.train) // config.batch_size
    start, step, rows = time.perf_counter(), 0, []
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        lr = config.lr_at_epoch(epoch)
        losses, mismatch = [], {"mismatch_ef": 0.0, "mismatch_saef": 0.0}
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress)
        for indices in epoch_batches(len(data.train), config.batch_size, order):
            inputs, targets = _batches(data, indices, augment_rng, device)
            loss = trainer.step(inputs, targets, lr)
            step += 1
            losses.append(loss)
            if config.method != "sgd":
                for key, value in trainer.mismatch().items():
                    mismatch[key] += value
            bar.update()
        bar.close()
        train_loss = torch.stack(losses).mean().item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; lower --lr")
        at_x = evaluate(trainer.load_into(eval_model, point="x"), data.test, device)
        at_aux = None if config.method == "sgd" else evaluate(trainer.load_into(eval_model, point="auxiliary"), data.test, device)
        bits = trainer.bits
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": train_loss,
            "test_loss": at_x["loss"],
            "test_acc": at_x["acc"],
            "test_loss_aux": at_aux and at_aux["loss"],
            "test_acc_aux": at_aux and at_aux["acc"],
            **bits,
            "mismatch_ef": None if config.method == "sgd" else mismatch["mismatch_ef"] / len(losses),
            "mismatch_saef": None if config.method == "sgd" else mismatch["mismatch_saef"] / len(losses),
            "epoch_time": time.perf_counter() - epoch_start,
            "wall_time": time.perf_counter() - start,
        }
        record.append(row)
        rows.append(row)
        aux = "" if at_aux is None else f"  test acc at x~ {100 * at_aux['acc']:.2f}%"
        log(f"epoch {epoch + 1:3d}/{config.epochs}  lr {lr:.4g}  train loss {train_loss:.4f}  "
            f"test loss {at_x['loss']:.4f}  test acc {100 * at_x['acc']:.2f}%{aux}  ({row['epoch_time']:.1f} s)")

    from .plots import plot_run

    plot_run(output)
    last = rows[-1]
    summary = {
        "run_dir": str(output),
        "epochs": config.epochs,
        "steps": step,
        "final_test_acc": last["test_acc"],
        "final_test_acc_aux": last["test_acc_aux"],
        "best_test_acc": max(r["test_acc"] for r in rows),
        "final_train_loss": last["train_loss"],
        "bits_up": last["bits_up"],
        "bits_down": last["bits_down"],
        "bits_averaging": last["bits_averaging"],
        "wall_time": last["wall_time"],
    }
    record.finish(summary)
    log(format_summary(config, summary))
    return summary


def format_summary(config: TrainConfig, summary: Dict[str, Any]) -> str:
    """The final table printed at the end of a run."""
    def megabytes(bits):
        return f"{bits / 8e6:.2f} MB"

    lines = [
        ("method", f"{config.method} ({config.worker_compressor}, {'double' if config.double_way and config.method != 'sgd' else 'single'}-way, K={config.workers})"),
        ("final test accuracy at x", f"{100 * summary['final_test_acc']:.2f}%"),
    ]
    if summary["final_test_acc_aux"] is not None:
        lines.append(("final test accuracy at x~", f"{100 * summary['final_test_acc_aux']:.2f}%"))
    lines += [
        ("best test accuracy at x", f"{100 * summary['best_test_acc']:.2f}%"),
        ("final train loss", f"{summary['final_train_loss']:.4f}"),
        ("sent per worker (up)", megabytes(summary["bits_up"])),
        ("received per worker (down)", megabytes(summary["bits_down"])),
        ("error averaging per worker", megabytes(summary["bits_averaging"])),
        ("wall time", f"{summary['wall_time']:.1f} s"),
        ("records", summary["run_dir"]),
    ]
    width = max(len(k) for k, _ in lines)
    rule = "-" * (width + 2 + max(len(v) for _, v in lines))
    return "\n".join([rule] + [f"{k.ljust(width)}  {v}" for k, v in lines] + [rule])
