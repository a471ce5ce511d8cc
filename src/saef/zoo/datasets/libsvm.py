"""``libsvm``: a binary LIBSVM/svmlight file (labels -1/+1 or 0/1, e.g. a9a), read line by line (every line
validated, values checked in float32) and held sparse until the rows kept are made dense, of a width bounded
by :data:`LIBSVM_MAX_FEATURES`; the test split is ``test_file``, or the training file itself (so that the metrics are those of
the training objective). ``size`` keeps a random subset of the training samples.

Example::

    >>> data = load_dataset("libsvm", "unused", data_file="a9a")   # doctest: +SKIP
    >>> data.input_shape   # doctest: +SKIP
    (123,)
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .base import Data, DatasetSplit, open_regular, subsample_indices
from .registry import DatasetRequest, register_dataset

__all__ = ["LIBSVM_MAX_FEATURES", "LIBSVM_MAX_VALUES", "LIBSVM_MAX_ENTRIES", "LIBSVM_MAX_LINE", "load_libsvm"]

# The model (logistic regression) is dense over the features, and so are the rows trained on; the bounds:
LIBSVM_MAX_FEATURES = 1 << 20  # the largest feature index (news20.binary has 1,355,191: subset it first)
LIBSVM_MAX_VALUES = 1 << 29  # samples x features held densely (2 GiB of float32): larger are refused
LIBSVM_MAX_ENTRIES = 1 << 28  # index:value pairs read (held sparse while reading: 2 GiB as int32 + float32)
LIBSVM_MAX_LINE = 1 << 26  # bytes in one line (64 MiB)
_FLOAT32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103  # the smallest magnitude that rounds to inf in float32


def _load(request: DatasetRequest) -> Data:
    if request.data_file is None:
        raise ValueError("dataset libsvm needs data_file (a LIBSVM/svmlight file, e.g. a9a)")
    return load_libsvm(request.data_file, request.test_file, size=request.size, seed=request.seed)


@dataclass
class _Rows:
    """A LIBSVM file read sparsely: its labels, each row's pairs at ``starts[r]:starts[r + 1]`` of
    ``indices`` (1-based) and ``values`` (float32, as trained on), the largest index and the sha256."""
    labels: list = field(default_factory=list)
    starts: array = field(default_factory=lambda: array("q", [0]))
    indices: array = field(default_factory=lambda: array("i"))
    values: array = field(default_factory=lambda: array("f"))
    features: int = 0
    digest: str = ""


def _parse_line(line: str, path: Path, number: int) -> tuple[float, list[int], list[float]] | None:
    """One line's label, indices and values (None for a blank or comment line), every value checked."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    fields = line.split()
    try:
        label, indices, values = float(fields[0]), [], []
        for item in fields[1:]:
            index, sep, value = item.partition(":")
            if not sep:
                raise ValueError(f"{item!r} is not index:value")
            indices.append(int(index))
            values.append(float(value))
    except ValueError as error:
        raise ValueError(f"{path}, line {number}: not LIBSVM format ({error})") from None
    if indices and min(indices) < 1:
        raise ValueError(f"{path}, line {number}: feature indices start at 1")
    if indices and max(indices) > LIBSVM_MAX_FEATURES:
        raise ValueError(f"{path}, line {number}: feature index {max(indices)} is above the largest read, "
                         f"{LIBSVM_MAX_FEATURES:,} (the features are held densely)")
    if not all(abs(v) < _FLOAT32_OVERFLOW for v in values) or not math.isfinite(label):  # (NaN fails too)
        raise ValueError(f"{path}, line {number}: a value is not finite in float32")
    return label, indices, values


def _lines(handle, path: Path, digest):
    """The file's lines, numbered as ``str.splitlines`` numbers them, read one at a time (each at most
    :data:`LIBSVM_MAX_LINE` bytes) and fed to ``digest``."""
    number = 0
    while raw := handle.readline(LIBSVM_MAX_LINE + 1):
        if len(raw) > LIBSVM_MAX_LINE:
            raise ValueError(f"{path}, line {number + 1}: longer than {LIBSVM_MAX_LINE:,} bytes")
        digest.update(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not a text file (line {number + 1} is not UTF-8: {error})") from None
        for line in text.splitlines():
            number += 1
            yield number, line


def _parse_libsvm(path: Path) -> _Rows:
    """The file read line by line into :class:`_Rows`; ValueError naming the file and line for anything
    that is not LIBSVM/svmlight text or passes the bounds above."""
    rows, digest = _Rows(), hashlib.sha256()
    with open_regular(path, "LIBSVM file") as handle:
        for number, line in _lines(handle, path, digest):
            parsed = _parse_line(line, path, number)
            if parsed is None:
                continue
            label, indices, values = parsed
            if len(rows.indices) + len(indices) > LIBSVM_MAX_ENTRIES:
                raise ValueError(f"{path}, line {number}: more than {LIBSVM_MAX_ENTRIES:,} index:value pairs in all")
            rows.labels.append(label)
            rows.indices.extend(indices)
            rows.values.extend(values)
            rows.starts.append(len(rows.indices))
            rows.features = max(rows.features, max(indices, default=0))
    if not rows.labels:
        raise ValueError(f"{path} holds no samples")
    rows.digest = digest.hexdigest()
    return rows


def _binary_targets(labels: list[float], path: Path) -> Tensor:
    """Labels {-1, +1} or {0, 1} as class indices 0 (for -1 or 0) and 1 (for +1)."""
    found = sorted(set(labels))
    if not (set(found) <= {-1.0, 1.0} or set(found) <= {0.0, 1.0}):
        shown = ", ".join(f"{v:g}" for v in found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(f"{path}: labels must be -1/+1 or 0/1 (binary classification), found {shown}")
    return torch.tensor([1 if v == 1.0 else 0 for v in labels], dtype=torch.int64)


def _dense(rows: _Rows, keep: Tensor | None, features: int) -> Tensor:
    """The rows ``keep`` (all if None), in that order, as a dense float32 ``(len(keep), features)``."""
    order = range(len(rows.labels)) if keep is None else keep.tolist()
    out = torch.zeros(len(order), features)
    r, c, v = array("q"), array("q"), array("f")
    for position, row in enumerate(order):
        start, stop = rows.starts[row], rows.starts[row + 1]
        r.extend([position] * (stop - start))
        c.extend(i - 1 for i in rows.indices[start:stop])
        v.extend(rows.values[start:stop])
    if len(v):
        out[torch.frombuffer(r, dtype=torch.int64), torch.frombuffer(c, dtype=torch.int64)] = torch.frombuffer(v, dtype=torch.float32)
    return out


def _split(rows: _Rows, keep: Tensor | None, features: int, path: Path) -> DatasetSplit:
    targets = _binary_targets(rows.labels, path)
    return DatasetSplit(_dense(rows, keep, features), targets if keep is None else targets[keep])


def load_libsvm(path: Path, test_path: Path | None = None, *, size: int | None = None, seed: int = 0) -> Data:
    """A binary LIBSVM/svmlight file (labels -1/+1 or 0/1) as a dense float32 dataset: inputs ``(N, D)``, D the
    largest feature index of either file, targets 0/1. ``size`` keeps a random subset of the training
    samples (those :func:`~.base.subsample` keeps, drawn from ``seed``). The test split is ``test_path``, or
    the training split itself. Both files are read line by line and held sparse until the rows kept are made
    dense; every line is validated (a clear error names the file and line), and so are the sizes
    (:data:`LIBSVM_MAX_FEATURES`, :data:`LIBSVM_MAX_VALUES`, :data:`LIBSVM_MAX_ENTRIES`)."""
    train = _parse_libsvm(path)
    test = _parse_libsvm(test_path) if test_path is not None else None
    features = max(train.features, test.features if test is not None else 0)
    if features == 0:
        raise ValueError(f"{path} has no features")
    keep = subsample_indices(len(train.labels), size, seed) if size is not None else None
    held = len(train.labels) if keep is None else len(keep)
    for name, count in ((path, held), (test_path, len(test.labels) if test is not None else 0)):
        if count * features > LIBSVM_MAX_VALUES:
            raise ValueError(f"{name}: {count} samples x {features} features is too large to hold densely "
                             f"(at most {LIBSVM_MAX_VALUES:,} values, 2 GiB)")
    train_split = _split(train, keep, features, path)
    test_split = train_split if test is None else _split(test, None, features, test_path)
    digest = train.digest + (":" + test.digest if test is not None else "")
    return Data(train_split, test_split, 2, (features,), "libsvm", digest=digest)


register_dataset("libsvm", _load, data_file=True, test_file=True)
