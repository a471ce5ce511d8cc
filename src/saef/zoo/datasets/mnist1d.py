"""MNIST-1D (Greydanus, 2020), the default dataset: generated locally with ``mnist1d.data.make_dataset``
(never downloaded) and cached on disk under ``root`` as ``mnist1d-SIZE-SEED.npz``.

``size`` samples are generated (train 80 %, test 20 %; default :data:`MNIST1D_DEFAULT_SIZE`), inputs
``(1, 40)`` standardised by the training split's statistics.

Example::

    >>> data = load_dataset("mnist1d", "~/.cache/saef")   # doctest: +SKIP
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ...files import write_atomically
from .base import Data, DatasetSplit, normalise_scalar
from .registry import DatasetRequest, register_dataset

__all__ = ["MNIST1D_DEFAULT_SIZE", "MNIST1D_MAX_SIZE"]

MNIST1D_DEFAULT_SIZE = 10_000  # 8000 train / 2000 test: the published MNIST-1D benchmarks use 4000/1000,
# twice that leaves less of the comparison between compressors to over-fitting; generating it takes ~8 s once.
# Made here, so its size is bounded by the time it takes: ~3000 samples a second on one core (200,000 in
# about a minute).
MNIST1D_MAX_SIZE = 200_000


def _load(request: DatasetRequest) -> Data:
    return _load_mnist1d(request.root, MNIST1D_DEFAULT_SIZE if request.size is None else request.size, request.seed)


def _load_mnist1d(root: Path, size: int, seed: int) -> Data:
    if size < 10:
        raise ValueError(f"mnist1d size must be >= 10 (one sample per class), got {size}")
    path = root / f"mnist1d-{size}-{seed}.npz"
    if path.exists():
        arrays = _read_mnist1d_cache(path, size, seed)
    else:
        arrays = _generate_mnist1d(size, seed)
        _write_npz_atomically(path, {**arrays, "made_from": np.array([size, seed], dtype=np.int64)})
    train_x, test_x = normalise_scalar(arrays["x"], arrays["x_test"])
    return Data(
        train=DatasetSplit(train_x.unsqueeze(1), torch.from_numpy(arrays["y"]).long()),
        test=DatasetSplit(test_x.unsqueeze(1), torch.from_numpy(arrays["y_test"]).long()),
        num_classes=10,
        input_shape=(1, train_x.shape[1]),
        name="mnist1d",
    )


def _generate_mnist1d(size: int, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # never get_dataset: it downloads

    args = get_dataset_args()
    args.num_samples, args.seed = size, seed
    # make_dataset reseeds the global `random` and `np.random` generators; restore them so loading data
    # does not change the caller's random stream.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {key: np.asarray(generated[key]) for key in ("x", "y", "x_test", "y_test")}


def _expected_shapes(size: int) -> dict[str, tuple[int, ...]]:
    """The arrays ``make_dataset`` makes for ``size`` samples: the first ``int(0.8 size)`` train, the rest test."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    n_train, width = int(size * args.train_split), args.final_seq_length
    return {"x": (n_train, width), "y": (n_train,), "x_test": (size - n_train, width), "y_test": (size - n_train,)}


def _check_members(archive: zipfile.ZipFile, expected: dict[str, tuple[int, ...]], size: int) -> None:
    """Each array's header (shape, dtype) and uncompressed size in the zip directory against what ``size``
    makes, read before any array is: a cache of another size, or a small file that inflates to gigabytes,
    is refused without being decompressed."""
    for key, shape in expected.items():
        info = archive.getinfo(f"{key}.npy")  # KeyError if missing
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{key}.npy has .npy format version {version}, not 1.0 or 2.0")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            found, _, dtype = read_header(member)
            header = member.tell()
        kind = "f" if key.startswith("x") else "iu"  # (the labels, and made_from: size and seed)
        if tuple(found) != shape or dtype.kind not in kind or dtype.itemsize > 8:
            raise ValueError(f"{key} is {dtype} {tuple(found)}, not the {shape} that size {size} makes")
        if info.file_size > header + int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{key}.npy inflates to {info.file_size:,} bytes, more than its shape holds")


def _read_mnist1d_cache(path: Path, size: int, seed: int) -> dict[str, np.ndarray]:
    """The cached arrays, checked against ``size`` and ``seed`` before they are read; a cache that does not
    match is refused (ValueError naming it), not regenerated: it is the user's file, and several ranks may
    read it. (A cache written before caches recorded their size and seed is refused too.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_members(archive, _expected_shapes(size), size)
            if "made_from.npy" not in archive.namelist():
                raise ValueError("it does not record the size and seed it was made for (an earlier saef's cache?)")
            _check_members(archive, {"made_from": (2,)}, size)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("x", "y", "x_test", "y_test", "made_from")}
    except Exception as err:  # noqa: BLE001 -- truncated, damaged (bad CRC), not a zip, missing arrays: all the same to us
        raise ValueError(f"malformed MNIST-1D cache {path} ({type(err).__name__}: {err}); delete it to regenerate") from err
    made_from = [int(v) for v in arrays.pop("made_from")]
    if made_from != [size, seed]:
        raise ValueError(f"the MNIST-1D cache {path} was made for size {made_from[0]} and seed {made_from[1]}, not size "
                         f"{size} and seed {seed} (a copy under another name?); delete it to regenerate")
    return arrays


def _write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # A crash or a concurrent reader (several ranks starting at once) sees either no file or a complete one.
    write_atomically(path, lambda handle: np.savez(handle, **arrays), make_parent=True)


register_dataset("mnist1d", _load, generated=MNIST1D_MAX_SIZE, default_size=MNIST1D_DEFAULT_SIZE)
