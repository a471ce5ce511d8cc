"""Datasets as plain tensors: MNIST-1D (the default, generated locally), digits, CIFAR-10/100, ImageNet, synthetic.

Every loader returns a :class:`Data` record whose splits hold the whole set as two tensors (inputs float32
with a channel axis, targets int64), so a training loop indexes batches directly and needs no DataLoader.
Randomness is explicit: shuffling (:func:`epoch_batches`) and augmentation (``Data.augment``) take a
``torch.Generator``, so two runs with one seed see the same batches.

Nothing here downloads: MNIST-1D is generated with ``mnist1d.data.make_dataset`` and cached on disk, digits
ships with scikit-learn, and CIFAR/ImageNet are read from folders the user has put under ``root``.

Example::

    >>> data = load_dataset("synthetic", root="unused")
    >>> g = torch.Generator().manual_seed(0)
    >>> for indices in epoch_batches(len(data.train), 64, g):
    ...     inputs, targets = data.train.batch(indices)
"""

from __future__ import annotations

import hashlib
import math
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..files import write_atomically
from .text import byte_windows, read_corpus, split_corpus

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100", "imagenet", "synthetic", "libsvm", "text")

MNIST1D_DEFAULT_SIZE = 10_000  # 8000 train / 2000 test: the published MNIST-1D benchmarks use 4000/1000,
# twice that leaves less of the comparison between compressors to over-fitting; generating it takes ~8 s once.

# Standard per-channel statistics of the CIFAR training sets (pixels in [0, 1]).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class DatasetSplit:
    """One split held in memory.

    Args:
        inputs: float tensor ``(N, *input_shape)`` (int64 tokens for text).
        targets: int64 tensor ``(N,)`` of class indices (``(N, T)``, one per position, for text).
    """

    inputs: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        if self.targets.dtype != torch.int64 or self.targets.dim() not in (1, 2):
            raise ValueError(f"targets must be an int64 tensor (N,) or (N, T), got {self.targets.dtype} {tuple(self.targets.shape)}")
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"inputs ({len(self.inputs)}) and targets ({len(self.targets)}) differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(inputs[indices], targets[indices])``."""
        indices = indices.to(self.targets.device)
        return self.inputs[indices], self.targets[indices]

    def to(self, device: torch.device | str) -> "DatasetSplit":
        """Copy of the split on ``device`` (small sets live on the accelerator for the whole run)."""
        return DatasetSplit(self.inputs.to(device), self.targets.to(device))


@dataclass
class Data:
    """A dataset: two splits and what a model needs to know about them.

    Args:
        train, test: the splits (:class:`DatasetSplit`, or :class:`ImageFolderSplit` for ImageNet).
        num_classes: number of classes; targets lie in ``[0, num_classes)``.
        input_shape: shape of one input without the batch axis, e.g. ``(1, 40)`` or ``(3, 32, 32)``.
        name: the name given to :func:`load_dataset`.
        augment: ``augment(batch, generator) -> batch`` applied on the fly to training batches, or None.
    """

    train: Any
    test: Any
    num_classes: int
    input_shape: tuple
    name: str
    augment: Augment | None = None
    digest: str | None = None  # sha256 of the file(s) read (libsvm): part of what a checkpoint is checked against
    val: Any = None  # a split held out of training (:func:`hold_out`), to choose hyperparameters on
    tokens: bool = False  # samples are token sequences (text): losses are also reported in bits per token


def hold_out(data: Data, n: int) -> Data:
    """``data`` with the last ``n`` training samples moved to a validation split ``val`` (they are no longer
    trained on). The generated and subsampled training sets are already in random order; a LIBSVM file is in
    its own order."""
    if not isinstance(data.train, DatasetSplit):
        raise ValueError(f"a held-out split needs a dataset held in memory, not {data.name}")
    if not 0 < n < len(data.train):
        raise ValueError(f"holdout = {n} must be between 1 and the training set's size - 1 ({len(data.train) - 1})")
    train, keep = data.train, len(data.train) - n
    test = data.test
    held = DatasetSplit(train.inputs[keep:], train.targets[keep:])
    kept = DatasetSplit(train.inputs[:keep], train.targets[:keep])
    if test is train:  # (libsvm without a test file: the test metrics are the training objective's)
        test = kept
    return Data(kept, test, data.num_classes, data.input_shape, data.name, data.augment, data.digest, held, data.tokens)


def load_dataset(name: str, root: str | Path, *, size: int | None = None, seed: int = 0,
                 data_file: str | None = None, test_file: str | None = None, context: int = 64) -> Data:
    """Load dataset ``name`` from (or, for MNIST-1D, generate it into) ``root``.

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding the data (CIFAR/ImageNet) or the MNIST-1D cache; ignored by ``synthetic``/``digits``.
        size: MNIST-1D: number of samples generated (train 80 %, test 20 %; default 10000, at least 10).
            synthetic: training samples (default 512; test gets a quarter). Other sets: keep a random subset
            of this many training samples (default: all).
        seed: seeds generation (MNIST-1D, synthetic), the digits train/test split and any subsampling.
            text: bytes of the corpus (default 2,000,000).
        data_file, test_file: libsvm only: the LIBSVM/svmlight file to train on, and one to test on (default:
            the training file itself, so that the metrics are those of the training objective). text: a text
            file to use instead of the standard library's ``.py`` files.
        context: text only: the length of each sample (the model's context).

    Raises:
        ValueError: unknown name, bad size, or malformed files. FileNotFoundError: data missing under root.
        ImportError: an optional dependency (scikit-learn, torchvision) is missing.

    Example:
        >>> data = load_dataset("mnist1d", "~/.cache/saef")   # doctest: +SKIP
        >>> data.train.inputs.shape   # doctest: +SKIP
        torch.Size([8000, 1, 40])
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    if size is not None and size > GENERATED.get(name, size):
        raise ValueError(f"dataset_size = {size} is more than {name} generates here (at most {GENERATED[name]})")
    root = Path(root).expanduser()
    if (data_file is not None and name not in ("libsvm", "text")) or (test_file is not None and name != "libsvm"):
        raise ValueError(f"data_file is for datasets libsvm and text, test_file for libsvm, not {name!r}")
    if name == "libsvm":
        if data_file is None:
            raise ValueError("dataset libsvm needs data_file (a LIBSVM/svmlight file, e.g. a9a)")
        data = load_libsvm(Path(data_file).expanduser(), None if test_file is None else Path(test_file).expanduser())
    elif name == "text":
        data = _load_text(None if data_file is None else Path(data_file).expanduser(), size, context)
    elif name == "mnist1d":
        data = _load_mnist1d(root, MNIST1D_DEFAULT_SIZE if size is None else size, seed)
    elif name == "synthetic":
        data = _make_synthetic(512 if size is None else size, seed)
    elif name == "digits":
        data = _load_digits(seed)
    elif name in ("cifar10", "cifar100"):
        data = _load_cifar(name, root)
    else:
        data = _load_imagenet(root)
    if size is not None and name not in GENERATED and name != "text":  # (text: size is the corpus's bytes)
        data.train = _subsample(data.train, size, seed)
        if name == "libsvm" and test_file is None:  # the metrics stay those of the training objective
            data.test = data.train
    _check_labels(data, root)
    return data


# Made here, so their size is bounded by the time and memory it takes: MNIST-1D generates ~3000 samples a
# second on one core (200,000 in about a minute), the synthetic set a million in half a second.
GENERATED = {"mnist1d": 200_000, "synthetic": 1_000_000}


def _check_labels(data: "Data", root: Path) -> None:
    """Every label a class index of the dataset (a corrupted file must not index out of the classifier)."""
    for split_name, split in (("train", data.train), ("test", data.test)):
        targets = getattr(split, "targets", None)
        if isinstance(targets, Tensor) and len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < data.num_classes):
            raise ValueError(f"{data.name} under {root}: {split_name} labels range over [{int(targets.min())}, "
                             f"{int(targets.max())}], not the {data.num_classes} classes 0..{data.num_classes - 1}")


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> Iterator[Tensor]:
    """Yield the index tensors of one epoch over ``n`` samples, shuffled with ``generator``.

    With ``drop_last`` (default) every batch has exactly ``batch_size`` indices, so a global batch split over
    K workers is the same size every step; the last ``n % batch_size`` samples of the permutation are skipped.

    Args:
        n: number of samples (>= 1).
        batch_size: indices per batch, in ``[1, n]`` when ``drop_last``.
        generator: drives the permutation; the epoch is a function of its state alone. Indices are created on
            the generator's device.
        drop_last: drop the incomplete final batch.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> [len(b) for b in epoch_batches(10, 4, g)]
        [4, 4]
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1 or (drop_last and batch_size > n):
        raise ValueError(f"batch_size must be in [1, n={n}] (drop_last={drop_last}), got {batch_size}")
    permutation = torch.randperm(n, generator=generator, device=generator.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield permutation[start : start + batch_size]


# --------------------------------------------------------------------------------------------------- helpers


def _subsample(split: Any, size: int, seed: int) -> Any:
    if size >= len(split):
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size]
    if isinstance(split, DatasetSplit):
        return DatasetSplit(split.inputs[keep], split.targets[keep])
    return split.subset(keep)


def _normalise_scalar(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    # Statistics from the training split only, so nothing about the test set leaks into training.
    mean, std = float(train.mean()), float(train.std())
    as_tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return as_tensor(train), as_tensor(test)


# ------------------------------------------------------------------------------------------------- MNIST-1D


def _load_mnist1d(root: Path, size: int, seed: int) -> Data:
    if size < 10:
        raise ValueError(f"mnist1d size must be >= 10 (one sample per class), got {size}")
    path = root / f"mnist1d-{size}-{seed}.npz"
    if path.exists():
        arrays = _read_mnist1d_cache(path)
    else:
        arrays = _generate_mnist1d(size, seed)
        _write_npz_atomically(path, arrays)
    train_x, test_x = _normalise_scalar(arrays["x"], arrays["x_test"])
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


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("x", "y", "x_test", "y_test")}
    except Exception as err:  # noqa: BLE001 -- truncated, damaged (bad CRC), not a zip, missing arrays: all the same to us
        raise ValueError(f"malformed MNIST-1D cache {path} ({type(err).__name__}: {err}); delete it to regenerate") from err
    if arrays["x"].ndim != 2 or len(arrays["x"]) != len(arrays["y"]) or len(arrays["x_test"]) != len(arrays["y_test"]):
        raise ValueError(f"malformed MNIST-1D cache {path} (inconsistent shapes); delete it to regenerate")
    return arrays


def _write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # A crash or a concurrent reader (several ranks starting at once) sees either no file or a complete one.
    write_atomically(path, lambda handle: np.savez(handle, **arrays), make_parent=True)


# ----------------------------------------------------------------------------------------------------- LIBSVM

LIBSVM_MAX_VALUES = 1 << 30  # samples x features held densely (4 GiB of float32): larger files are refused


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


# ------------------------------------------------------------------------------------------ synthetic, digits


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


def _load_text(data_file: Path | None, size: int | None, context: int) -> Data:
    """Byte-level language modelling (:mod:`saef.zoo.text`): train on the first 90 % of the corpus, validate
    (the test split) on the last 10 %, both cut into windows of ``context`` next-byte predictions."""
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive integer, got {context!r}")
    corpus, _ = read_corpus(data_file, size)
    train, val = split_corpus(corpus)
    try:
        splits = [DatasetSplit(*byte_windows(part, context)) for part in (train, val)]
    except ValueError as error:
        raise ValueError(f"the text corpus ({len(corpus)} bytes) is too short for context {context}: {error}") from None
    digest = hashlib.sha256(corpus).hexdigest()
    return Data(splits[0], splits[1], 256, (context,), "text", digest=digest, tokens=True)


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


# ---------------------------------------------------------------------------------------------------- CIFAR


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


def crop_flip_augment(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """The CIFAR augmentation of He et al. (2016): random crop with zero padding, random horizontal flip.

    Each image of the batch is padded by ``padding`` zeros on every side (zero is the mean colour, since
    inputs are normalised, as in the paper where the mean was subtracted first), cropped back to its size
    at an offset drawn uniformly from ``[0, 2 * padding]`` in each axis, and flipped left-right with
    probability 1/2. Vectorised over the batch; all draws come from ``generator`` (on its device).

    Args:
        images: ``(B, C, H, W)``.
        generator: source of the offsets and flips.
        padding: pixels of padding per side (>= 0).

    Example:
        >>> out = crop_flip_augment(torch.randn(8, 3, 32, 32), torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([8, 3, 32, 32])
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch, _, height, width = images.shape
    draw = lambda high: torch.randint(0, high, (batch,), generator=generator, device=generator.device).to(images.device)  # noqa: E731
    row_offset, col_offset, flip = draw(2 * padding + 1), draw(2 * padding + 1), draw(2).bool()
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = (row_offset[:, None] + torch.arange(height, device=images.device))[:, :, None]  # (B, H, 1)
    cols = col_offset[:, None] + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # flipping = reading columns backwards
    crops = padded[torch.arange(batch, device=images.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------------------------- ImageNet


class ImageFolderSplit:
    """A lazily decoded image-folder split (ImageNet): images are read from disk batch by batch.

    Minimal by design: it offers what :class:`DatasetSplit` offers a training loop (``len``, ``targets``,
    ``batch(indices)``) without holding the set in memory. Training splits decode with a random-resized crop
    and a horizontal flip; ``batch(indices, generator)`` seeds those draws from ``generator`` so they are
    reproducible. ``Data.augment`` is None for ImageNet since augmentation happens here, at decode time.
    """

    def __init__(self, folder: Any, train: bool, indices: Tensor | None = None) -> None:
        self.folder, self.train = folder, train
        self.indices = torch.arange(len(folder.samples)) if indices is None else indices
        self.targets = torch.tensor(folder.targets, dtype=torch.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, keep: Tensor) -> "ImageFolderSplit":
        return ImageFolderSplit(self.folder, self.train, self.indices[keep])

    def batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Decode the images at ``indices``; returns ``(inputs (B, 3, 224, 224), targets (B,))``."""
        indices = indices.cpu()
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global RNG
            if seed is not None:
                torch.manual_seed(seed)
            images = [self.folder[int(self.indices[i])][0] for i in indices]
        return torch.stack(images), self.targets[indices]


def _load_imagenet(root: Path) -> Data:
    try:
        from torchvision import datasets, transforms
    except ImportError as err:
        raise ImportError("the 'imagenet' dataset needs torchvision: pip install saef[imagenet]") from err
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"expected ImageNet image folders {root}/train/<class>/* and {root}/val/<class>/*")
    normalise = transforms.Normalize(*IMAGENET_STATS)
    train_transform = transforms.Compose(
        [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise]
    )
    test_transform = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalise]
    )
    train = datasets.ImageFolder(str(root / "train"), transform=train_transform)
    test = datasets.ImageFolder(str(root / "val"), transform=test_transform)
    if train.classes != test.classes:
        raise ValueError(f"{root}/train and {root}/val hold different class folders")
    return Data(ImageFolderSplit(train, True), ImageFolderSplit(test, False), len(train.classes), (3, 224, 224), "imagenet")
