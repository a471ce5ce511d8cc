"""``digits``: scikit-learn's 8x8 handwritten digits (1797 images, shipped with scikit-learn), split 80/20
into train and test by ``seed``; ``size`` keeps a random subset of the training split.

Example::

    >>> load_dataset("digits", root="unused").input_shape   # doctest: +SKIP
    (1, 8, 8)
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Data, DatasetSplit, subsample
from .registry import DatasetRequest, register_dataset

__all__: list = []


def _load(request: DatasetRequest) -> Data:
    data = _load_digits(request.seed)
    if request.size is not None:
        data.train = subsample(data.train, request.size, request.seed)
    return data


def _load_digits(seed: int) -> Data:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the 'digits' dataset needs scikit-learn: pip install scikit-learn (or pip install saef[digits])"
        ) from err
    digits = load_digits()
    inputs = torch.from_numpy((digits.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    targets = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(targets))
    train, test = order[:n_train], order[n_train:]
    return Data(DatasetSplit(inputs[train], targets[train]), DatasetSplit(inputs[test], targets[test]), 10, (1, 8, 8), "digits")


register_dataset("digits", _load)
