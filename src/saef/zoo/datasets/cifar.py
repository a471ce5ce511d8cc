"""``cifar10`` / ``cifar100``: the python version of CIFAR (Krizhevsky, 2009), read from the folder the user
extracted under ``root`` (nothing is downloaded) with :class:`RestrictedUnpickler`, which builds numpy
arrays and plain containers only. Images ``(3, 32, 32)`` normalised by :data:`CIFAR_STATS`, trained with
:func:`~saef.zoo.datasets.base.crop_flip_augment`; ``size`` keeps a random subset of the training split.

Example::

    >>> data = load_dataset("cifar10", "~/data")   # doctest: +SKIP
    >>> data.num_classes, data.input_shape   # doctest: +SKIP
    (10, (3, 32, 32))
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Data, DatasetSplit, crop_flip_augment, subsample
from .registry import DatasetRequest, register_dataset

__all__ = ["CIFAR_STATS", "RestrictedUnpickler"]

# Standard per-channel statistics of the CIFAR training sets (pixels in [0, 1]).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _load(request: DatasetRequest) -> Data:
    data = _load_cifar(request.name, request.root)
    if request.size is not None:
        data.train = subsample(data.train, request.size, request.seed)
    return data


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); allow exactly that.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _ArrayType:
    """Stands for ``numpy.ndarray`` in a pickle: it may be named (as the type :func:`_empty_array` builds)
    but not called, since ``ndarray(shape)`` allocates whatever shape a file asks for, uninitialised."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # Map names to the objects themselves rather than importing by name: numpy 1 pickles say numpy.core,
    # numpy 2 says numpy._core, and importing numpy.core on numpy 2 warns.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    def _empty_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') -- an empty array -- and then sets
        # its state, whose size numpy checks against the bytes the file really holds. Any other call
        # would allocate a size the file merely declares.
        if subtype is not _ArrayType or tuple(shape) != (0,):
            raise pickle.UnpicklingError(f"refusing to build an array of shape {shape!r} before its data is read")
        return _reconstruct(np.ndarray, (0,), dtype)

    def _plain_dtype(*args: Any) -> np.dtype:
        # an object dtype would make numpy allocate the declared shape before reading a list whose length
        # it does not check (a small file could exhaust memory or crash the process): numbers only
        dtype = np.dtype(*args)
        if dtype.hasobject:
            raise pickle.UnpicklingError(f"refusing an array of Python objects (dtype {dtype})")
        return dtype

    return {
        ("numpy.core.multiarray", "_reconstruct"): _empty_array,
        ("numpy._core.multiarray", "_reconstruct"): _empty_array,
        ("numpy", "ndarray"): _ArrayType,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays, lists, dicts, numbers and strings.

    A pickle can call any importable function while it loads, so reading a downloaded file with plain
    ``pickle.load`` runs whatever its author chose. CIFAR's python files need only numpy's array
    reconstruction; every other global is refused with ``pickle.UnpicklingError`` before it is called. An
    array is only ever built empty and then filled from the file's own bytes (numpy checks their size), so a
    small file cannot make the reader allocate what it merely declares.

    Example:
        >>> import io
        >>> RestrictedUnpickler(io.BytesIO(pickle.dumps({b"labels": [1]}, protocol=2)), encoding="bytes").load()
        {b'labels': [1]}
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: uint8 ``(N, 3072)`` pixels and int64 ``(N,)`` labels."""
    try:
        with open(path, "rb") as handle:
            batch = RestrictedUnpickler(handle, encoding="bytes").load()
        pixels = batch[b"data"]
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise ValueError(f"malformed CIFAR file {path}: {type(err).__name__}: {err}") from err
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise ValueError(f"malformed CIFAR file {path}: b'data' must be a uint8 array of shape (N, 3072)")
    if labels.shape != (len(pixels),):
        raise ValueError(f"malformed CIFAR file {path}: {len(labels)} labels for {len(pixels)} images")
    return pixels, labels


def _find_folder(root: Path, folder: str, first_file: str) -> Path:
    for candidate in (root / folder, root):  # root is the archive's parent, or the extracted folder itself
        if (candidate / first_file).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {folder}/ under {root}: download the python version of the dataset (the archive holding "
        f"{folder}/), extract it and put {folder}/ under {root}, or pass the folder itself as root"
    )


def _load_cifar(name: str, root: Path) -> Data:
    if name == "cifar10":
        folder = _find_folder(root, "cifar-10-batches-py", "data_batch_1")
        train_files, test_files, label_key, num_classes = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10
    else:
        folder = _find_folder(root, "cifar-100-python", "train")
        train_files, test_files, label_key, num_classes = ["train"], ["test"], b"fine_labels", 100
    mean, std = CIFAR_STATS[name]
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def split(files: list[str]) -> DatasetSplit:
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; expected {', '.join(files)}")
        parts = [_read_cifar_batch(folder / f, label_key) for f in files]
        pixels = np.concatenate([p for p, _ in parts])
        labels = np.concatenate([l for _, l in parts])
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels in {folder} outside [0, {num_classes})")
        # Each row is the red plane, then green, then blue, each 32x32 row-major: a plain reshape gives CHW.
        images = torch.from_numpy(pixels).view(-1, 3, 32, 32).float().div_(255.0)
        return DatasetSplit((images - mean_t) / std_t, torch.from_numpy(labels))

    return Data(split(train_files), split(test_files), num_classes, (3, 32, 32), name, augment=crop_flip_augment)


register_dataset("cifar10", _load)
register_dataset("cifar100", _load)
