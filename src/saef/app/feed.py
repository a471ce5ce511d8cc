"""What the loop feeds a worker and how it evaluates: shards of each global batch, and test accuracy.

Worker k of K always gets the k-th contiguous slice of a global batch, augmented with a generator that is
a function of (seed, step, k) only, so the simulator and a distributed run see the same samples.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import model_penalty
from ..zoo.datasets import Data, DatasetSplit

__all__ = ["evaluate", "gradient_norm_sq", "shard_generator", "local_batch"]


def _penalty(model: nn.Module) -> float:
    """The model's own term of the objective at its parameters (0 for most models)."""
    value = model_penalty(model, [p.unsqueeze(0) for p in model.parameters() if p.requires_grad])
    return 0.0 if value is None else float(value[0])


@torch.no_grad()
def evaluate(model: nn.Module, split, device: torch.device, batch_size: int = 1000) -> Dict[str, float]:
    """Mean cross-entropy loss (plus the model's own penalty, if it has one: the objective) and top-1
    accuracy of ``model`` on ``split``, per prediction (per sample, or per position of a sequence)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(split), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(split)))
        inputs, targets = split.batch(indices)
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs)
        total_loss += F.cross_entropy(outputs, targets, reduction="sum").item()
        correct += (outputs.argmax(dim=1) == targets).sum().item()
        count += targets.numel()
    return {"loss": total_loss / count + _penalty(model), "acc": correct / count}


def gradient_norm_sq(model: nn.Module, split, device: torch.device, batch_size: int = 4096) -> float:
    """||grad f(x)||^2 of the objective f = mean cross-entropy over ``split`` (+ the model's penalty) at the
    model's parameters: the stationarity measure of non-convex analyses (a full pass with backward)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for start in range(0, len(split), batch_size):
            inputs, targets = split.batch(torch.arange(start, min(start + batch_size, len(split))))
            loss = F.cross_entropy(model(inputs.to(device)), targets.to(device), reduction="sum") / len(split)
            for acc, g in zip(total, torch.autograd.grad(loss, params)):
                acc += g
        penalty = model_penalty(model, [p.unsqueeze(0) for p in params])
        if penalty is not None:
            for acc, g in zip(total, torch.autograd.grad(penalty[0], params)):
                acc += g
    return float(sum(g.double().square().sum() for g in total))


def shard_generator(seed: int, step: int, worker: int) -> torch.Generator:
    """The augmentation generator of one worker's shard at one step: a function of (seed, step, worker)
    only, so the simulator and a distributed run augment every sample the same way."""
    state = np.random.SeedSequence([seed, step, worker]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def local_batch(data: Data, indices: torch.Tensor, workers: int, worker_ids: Sequence[int], seed: int, step: int, device):
    """The shards of the global batch ``indices`` that belong to ``worker_ids`` (worker k gets the k-th
    contiguous slice), loaded and augmented, concatenated in worker order."""
    per_worker = len(indices) // workers
    inputs, targets = [], []
    for k in worker_ids:
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
