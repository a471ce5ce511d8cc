"""``synthetic``: Gaussian clusters in 40 dimensions, generated in memory from ``seed`` (never touches the
disk), which a linear model separates almost perfectly: tests check that training makes progress in a few
steps. ``size`` training samples (default 512); the test split gets a quarter as many.

Example::

    >>> from saef.zoo.datasets import load_dataset
    >>> load_dataset("synthetic", root="unused", size=100).input_shape
    (1, 40)
"""

from __future__ import annotations

import torch

from .base import Data, DatasetSplit
from .registry import DatasetRequest, register_dataset

__all__ = ["SYNTHETIC_MAX_SIZE"]

SYNTHETIC_MAX_SIZE = 1_000_000  # made here, so bounded by memory: a million samples in half a second
SYNTHETIC_DEFAULT_SIZE = 512


def _load(request: DatasetRequest) -> Data:
    return _make_synthetic(SYNTHETIC_DEFAULT_SIZE if request.size is None else request.size, request.seed)


def _make_synthetic(train_size: int, seed: int) -> Data:
    # Gaussian clusters around random centres in 40 dimensions: a linear model separates them almost
    # perfectly, so tests can check that training makes progress in a few steps. Never touches the disk.
    generator = torch.Generator().manual_seed(seed)
    num_classes, length = 10, 40
    centres = torch.randn(num_classes, length, generator=generator)

    def split(n: int) -> DatasetSplit:
        targets = torch.arange(n) % num_classes
        targets = targets[torch.randperm(n, generator=generator)]
        inputs = centres[targets] + 0.5 * torch.randn(n, length, generator=generator)
        return DatasetSplit(inputs.unsqueeze(1), targets)

    train = split(train_size)
    test = split(max(1, train_size // 4))
    return Data(train, test, num_classes, (1, length), "synthetic")


register_dataset("synthetic", _load, generated=SYNTHETIC_MAX_SIZE, default_size=SYNTHETIC_DEFAULT_SIZE)
