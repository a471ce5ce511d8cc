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

from ..zoo.data import Data, DatasetSplit

__all__ = ["evaluate", "shard_generator", "local_batch"]


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
