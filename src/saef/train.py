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

__all__ = ["train", "resolve_device", "evaluate", "build_trainer", "local_batch"]


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


def build_trainer(config: TrainConfig, model: nn.Module):
    """The trainer for ``config``: the simulator (``backend = "sim"``) or this rank's worker (``"dist"``).
    The full-precision baseline is EF with identity, single-way, which is exactly momentum SGD."""
    sgd = config.method == "sgd"
    kwargs = dict(
        method=config.algorithm_method,
        compressor=config.worker_compressor,
        server_compressor=config.server_compressor,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        double_way=False if sgd else config.double_way,
        average_every=config.average_every,
    )
    if config.backend == "dist":
        from .distributed import DistributedWorker

        return DistributedWorker(model, server="allreduce" if sgd else config.server, **kwargs)
    return Simulator(model, workers=config.workers, **kwargs)


def shard_generator(seed: int, step: int, worker: int) -> torch.Generator:
    """The augmentation generator of one worker's shard at one step: a function of (seed, step, worker)
    only, so the simulator and a distributed run augment every sample the same way."""
    import numpy as np

    state = np.random.SeedSequence([seed, step, worker]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def local_batch(data: Data, indices: torch.Tensor, workers: int, local_workers, seed: int, step: int, device):
    """The shards of the global batch ``indices`` that belong to ``local_workers`` (worker k gets the k-th
    contiguous slice), loaded and augmented, concatenated in worker order."""
    per_worker = len(indices) // workers
    inputs, targets = [], []
    for k in local_workers:
        shard = indices[k * per_worker : (k + 1) * per_worker]
        if isinstance(data.train, DatasetSplit):
            x, y = data.train.batch(shard)
            if data.augment is not None:
                x = data.augment(x, shard_generator(seed, step, k))
        else:  # image folders decode and augment on the fly
            x, y = data.train.batch(shard, shard_generator(seed, step, k))
        inputs.append(x)
        targets.append(y)
    return torch.cat(inputs).to(device, non_blocking=True), torch.cat(targets).to(device, non_blocking=True)


def _setup(config: TrainConfig):
    """Device, (for dist) the process group and the worker count, and the data. In a distributed run
    rank 0 generates or checks the data first, so the ranks do not all write the same cache."""
    if config.backend != "dist":
        device = resolve_device(config.device)
        return config, device, load_dataset(config.dataset, config.data_dir, size=config.dataset_size, seed=config.seed)
    import torch.distributed as dist

    from .distributed import init_distributed

    device = init_distributed(config.device, config.timeout)
    world = dist.get_world_size()
    if config.workers != world:
        config = config.replace(workers=world)  # one worker per rank; re-validates batch divisibility
    load = lambda: load_dataset(config.dataset, config.data_dir, size=config.dataset_size, seed=config.seed)
    data = load() if dist.get_rank() == 0 else None
    dist.barrier()
    return config, device, data if data is not None else load()


def _gather_digests(digest: str):
    """Barrier for checkpoints of a distributed run: every rank's file digest, once all have written."""
    import torch.distributed as dist

    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    return digests


def _checkpoint_state(trainer, config, loop: Dict[str, Any]) -> Dict[str, Any]:
    from .checkpoint import capture_rng

    return {"config": _state_config(config), "trainer": trainer.state_dict(), "loop": dict(loop), "rng": capture_rng()}


def _state_config(config: TrainConfig) -> Dict[str, Any]:
    """The settings a checkpoint must agree with to be resumed without --reset-errors."""
    d = config.to_dict()
    return {k: d[k] for k in ("workers", "method", "compressor", "server_compressor", "double_way", "model", "dataset", "batch_size", "seed")}


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: bool = False,
    reset_errors: bool = False,
    changed: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run ``config`` to the end and return the summary (also written to ``summary.json``; ``{}`` on ranks
    other than 0).

    In a distributed run every rank calls this; rank 0 writes the records, every rank its checkpoint
    shard. ``resume`` continues the run in ``config.output`` from its newest complete checkpoint (exactly:
    same batches, same random numbers, same records); ``reset_errors`` starts the worker and server errors
    and momentum from zero instead (required when the number of workers, method or compressor changed).
    """
    import os

    from tqdm.auto import tqdm

    from . import checkpoint
    from .simulator import NonFiniteStep

    config, device, data = _setup(config)
    if len(data.train) < config.batch_size:
        raise ValueError(f"batch_size = {config.batch_size} is larger than the training set ({len(data.train)} samples)")
    if isinstance(data.train, DatasetSplit) and data.augment is None:
        data.train, data.test = data.train.to(device), data.test.to(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data).to(device)
    trainer = build_trainer(config, model)
    main = trainer.is_main
    rank, world = (trainer.rank, trainer.workers) if config.backend == "dist" else (0, 1)
    log = log if main else (lambda message: None)
    eval_model = copy.deepcopy(model)
    if config.backend == "dist" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and config.output:
        resume = resume or (Path(config.output) / "checkpoints" / "manifest.json").exists()  # torchrun restarted us
    output = Path(config.output) if config.output else default_output(config, time.strftime("%Y%m%d-%H%M%S"))
    folder = output / "checkpoints"

    order = torch.Generator().manual_seed(config.seed)
    loop = {"epoch": 0, "step": 0, "step_in_epoch": 0, "epoch_order": order.get_state(), "losses": [], "mismatch_ef": 0.0,
            "mismatch_saef": 0.0, "skipped": 0, "consecutive_skips": 0, "elapsed": 0.0, "epoch_elapsed": 0.0}
    if resume:
        saved = checkpoint.load_latest(folder, rank=0 if reset_errors else rank, world=None if reset_errors else world)
        if saved is None:
            raise checkpoint.CheckpointError(f"{output} has no checkpoint to resume from")
        if not reset_errors and saved["config"] != _state_config(config):
            raise checkpoint.CheckpointError(f"the checkpoint in {output} was written with {saved['config']}, not {_state_config(config)}")
        trainer.load_state_dict(saved["trainer"], reset_errors=reset_errors)
        loop.update(saved["loop"])
        checkpoint.restore_rng(saved["rng"])
        order.set_state(loop["epoch_order"])
        event = {"step": loop["step"], "changed": {k: list(v) for k, v in (changed or {}).items()}, "reset_errors": reset_errors}
        record = RunRecord(output, config.to_dict(), environment(str(device)), resume_rows=loop["epoch"], event=event) if main else None
        log(f"saef: resuming {output} at epoch {loop['epoch'] + 1}, step {loop['step']}" + (" with errors reset" if reset_errors else ""))
    else:
        record = RunRecord(output, config.to_dict(), environment(str(device))) if main else None
    rows = record.rows() if record is not None else []
    log(f"saef: training {config.model} on {config.dataset} ({len(data.train)} train / {len(data.test)} test) "
        f"with {config.method} {config.worker_compressor}, K={config.workers} ({config.backend}), on {device}; "
        f"records in {output}")

    def save_checkpoint():
        state = _checkpoint_state(trainer, config, loop)
        checkpoint.save(folder, loop["step"], state, rank=rank, world=world, keep=config.keep_checkpoints,
                        barrier=_gather_digests if config.backend == "dist" else None)

    steps_per_epoch = len(data.train) // config.batch_size
    diagnostics = config.method != "sgd"
    run_start = time.perf_counter() - loop["elapsed"]
    while loop["epoch"] < config.epochs:
        epoch = loop["epoch"]
        epoch_start = time.perf_counter() - loop["epoch_elapsed"]
        lr = config.lr_at_epoch(epoch)
        order.set_state(loop["epoch_order"])  # the order generator as it was when this epoch began
        batches = list(epoch_batches(len(data.train), config.batch_size, order))
        bar = tqdm(total=steps_per_epoch, initial=loop["step_in_epoch"], desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=None if (progress and main) else True)  # None: bars on a terminal only
        for indices in batches[loop["step_in_epoch"]:]:
            inputs, targets = local_batch(data, indices, config.workers, trainer.local_workers, config.seed, loop["step"], device)
            try:
                loop["losses"].append(float(trainer.step(inputs, targets, lr)))
                loop["consecutive_skips"] = 0
            except NonFiniteStep as error:
                loop["skipped"] += 1
                loop["consecutive_skips"] += 1
                if loop["consecutive_skips"] > config.max_nonfinite_skips:
                    raise FloatingPointError(
                        f"{loop['consecutive_skips']} step(s) in a row had a NaN or Inf loss or gradient (last at step {loop['step']}: "
                        f"{error}); stopped with parameters, momentum and errors from before them. Lower --lr or check the data"
                    ) from None
                log(f"saef: step {loop['step']} skipped: {error}")
            loop["step"] += 1
            loop["step_in_epoch"] += 1
            if checkpoint.fault_point("kill-at-step", loop["step"], rank):
                checkpoint.kill_self()
            if diagnostics and trainer.cheap_diagnostics and loop["consecutive_skips"] == 0:
                for key, value in trainer.mismatch().items():
                    loop[key] += value / steps_per_epoch
            bar.update()
            if config.checkpoint_every and loop["step"] % config.checkpoint_every == 0 and loop["step_in_epoch"] < len(batches):
                loop["elapsed"], loop["epoch_elapsed"] = time.perf_counter() - run_start, time.perf_counter() - epoch_start
                save_checkpoint()
        bar.close()
        if diagnostics and not trainer.cheap_diagnostics:  # one dense all-reduce per epoch, at its end
            loop.update(trainer.mismatch())
        if not loop["losses"]:
            raise FloatingPointError(f"every step of epoch {epoch + 1} had a NaN or Inf loss or gradient")
        train_loss = trainer.average(torch.tensor(loop["losses"], dtype=torch.float64).mean().item())
        at_x = evaluate(trainer.load_into(eval_model, point="x"), data.test, device)
        at_aux = evaluate(trainer.load_into(eval_model, point="auxiliary"), data.test, device) if diagnostics else None
        row = {
            "epoch": epoch + 1,
            "step": loop["step"],
            "lr": lr,
            "train_loss": train_loss,
            "test_loss": at_x["loss"],
            "test_acc": at_x["acc"],
            "test_loss_aux": at_aux and at_aux["loss"],
            "test_acc_aux": at_aux and at_aux["acc"],
            **trainer.bits,
            "mismatch_ef": loop["mismatch_ef"] if diagnostics else None,
            "mismatch_saef": loop["mismatch_saef"] if diagnostics else None,
            "skipped_steps": loop["skipped"],
            "epoch_time": time.perf_counter() - epoch_start,
            "wall_time": time.perf_counter() - run_start,
        }
        rows.append(row)
        if record is not None:
            record.append(row)
        aux = "" if at_aux is None else f"  test acc at x~ {100 * at_aux['acc']:.2f}%"
        log(f"epoch {epoch + 1:3d}/{config.epochs}  lr {lr:.4g}  train loss {train_loss:.4f}  "
            f"test loss {at_x['loss']:.4f}  test acc {100 * at_x['acc']:.2f}%{aux}  ({row['epoch_time']:.1f} s)")
        loop.update(epoch=epoch + 1, step_in_epoch=0, losses=[], mismatch_ef=0.0, mismatch_saef=0.0, epoch_order=order.get_state(),
                    elapsed=time.perf_counter() - run_start, epoch_elapsed=0.0)
        save_checkpoint()

    if not main:  # rank 0 writes the records and the summary
        return {}
    last = rows[-1]
    summary = {
        "run_dir": str(output),
        "epochs": config.epochs,
        "steps": loop["step"],
        "final_test_acc": last["test_acc"],
        "final_test_acc_aux": last["test_acc_aux"],
        "best_test_acc": max(r["test_acc"] for r in rows),
        "final_train_loss": last["train_loss"],
        "bits_up": last["bits_up"],
        "bits_down": last["bits_down"],
        "bits_averaging": last["bits_averaging"],
        "skipped_steps": last["skipped_steps"],
        "wall_time": last["wall_time"],
    }
    from .plots import plot_run

    plot_run(output)
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
