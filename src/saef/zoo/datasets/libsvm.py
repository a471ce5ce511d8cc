"""``libsvm``: a binary LIBSVM/svmlight file (labels -1/+1 or 0/1, e.g. a9a) read densely, every line
validated; the test split is ``test_file``, or the training file itself (so that the metrics are those of
the training objective). ``size`` keeps a random subset of the training samples.

Example::

    >>> data = load_dataset("libsvm", "unused", data_file="a9a")   # doctest: +SKIP
    >>> data.input_shape   # doctest: +SKIP
    (123,)
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import Tensor

from .base import Data, DatasetSplit, subsample
from .registry import DatasetRequest, register_dataset

__all__ = ["LIBSVM_MAX_VALUES", "load_libsvm"]

LIBSVM_MAX_VALUES = 1 << 30  # samples x features held densely (4 GiB of float32): larger files are refused


def _load(request: DatasetRequest) -> Data:
    if request.data_file is None:
        raise ValueError("dataset libsvm needs data_file (a LIBSVM/svmlight file, e.g. a9a)")
    data = load_libsvm(request.data_file, request.test_file)
    if request.size is not None:
        data.train = subsample(data.train, request.size, request.seed)
        if request.test_file is None:  # the metrics stay those of the training objective
            data.test = data.train
    return data


def _parse_libsvm(path: Path) -> tuple[list[float], list[list[tuple[int, float]]], str]:
    """Labels, rows of (1-based index, value) pairs, and the sha256 of ``path``; ValueError naming the file
    and line for anything that is not LIBSVM/svmlight text."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a LIBSVM file") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"LIBSVM file {path} not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a text file (not UTF-8: {error})") from None
    labels, rows = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            label = float(fields[0])
            row = []
            for field in fields[1:]:
                index, sep, value = field.partition(":")
                if not sep:
                    raise ValueError(f"{field!r} is not index:value")
                row.append((int(index), float(value)))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not LIBSVM format ({error})") from None
        if any(i < 1 for i, _ in row):
            raise ValueError(f"{path}, line {number}: feature indices start at 1")
        if not all(math.isfinite(v) for _, v in row) or not math.isfinite(label):
            raise ValueError(f"{path}, line {number}: a value is not finite")
        labels.append(label)
        rows.append(row)
    if not labels:
        raise ValueError(f"{path} holds no samples")
    return labels, rows, hashlib.sha256(raw).hexdigest()


def _binary_targets(labels: list[float], path: Path) -> Tensor:
    """Labels {-1, +1} or {0, 1} as class indices 0 (for -1 or 0) and 1 (for +1)."""
    found = sorted(set(labels))
    if not (set(found) <= {-1.0, 1.0} or set(found) <= {0.0, 1.0}):
        shown = ", ".join(f"{v:g}" for v in found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(f"{path}: labels must be -1/+1 or 0/1 (binary classification), found {shown}")
    return torch.tensor([1 if v == 1.0 else 0 for v in labels], dtype=torch.int64)


def _dense(rows: list[list[tuple[int, float]]], features: int) -> Tensor:
    out = torch.zeros(len(rows), features)
    index = [(r, i - 1) for r, row in enumerate(rows) for i, _ in row]
    if index:
        r, c = zip(*index)
        out[list(r), list(c)] = torch.tensor([v for row in rows for _, v in row], dtype=torch.float32)
    return out


def load_libsvm(path: Path, test_path: Path | None = None) -> Data:
    """A binary LIBSVM/svmlight file (labels -1/+1 or 0/1) as a dense float32 dataset: inputs ``(N, D)``, D the
    largest feature index of either file, targets 0/1. The test split is ``test_path``, or the training file
    itself. Every line is validated (a clear error names the file and line), and so are the sizes."""
    labels, rows, digest = _parse_libsvm(path)
    test = _parse_libsvm(test_path) if test_path is not None else (labels, rows, "")
    features = max(max((i for row in r for i, _ in row), default=0) for r in (rows, test[1]))
    if features == 0:
        raise ValueError(f"{path} has no features")
    if max(len(rows), len(test[1])) * features > LIBSVM_MAX_VALUES:
        raise ValueError(f"{path}: {len(rows)} samples x {features} features is too large to hold densely "
                         f"(at most {LIBSVM_MAX_VALUES:,} values)")
    train_split = DatasetSplit(_dense(rows, features), _binary_targets(labels, path))
    test_split = train_split if test_path is None else DatasetSplit(_dense(test[1], features), _binary_targets(test[0], test_path))
    return Data(train_split, test_split, 2, (features,), "libsvm", digest=digest + (":" + test[2] if test[2] else ""))


register_dataset("libsvm", _load, data_file=True, test_file=True)
