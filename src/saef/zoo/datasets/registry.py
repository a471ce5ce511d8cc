"""The dataset registry: :func:`load_dataset` finds a dataset's loader by name, as
:mod:`saef.compress.registry` finds a compressor, and :func:`register_dataset` adds one's own.

A source registers a loader, ``load(request) -> Data``, with what it accepts: whether it reads a
``data_file`` / ``test_file``, and, for a set generated here, the largest size it makes. :func:`load_dataset`
checks the arguments every dataset shares (the name, the size, the files), calls the loader, and checks
that every label is a class index. What ``size`` means is the source's own (samples generated, a random
subset of the training split, bytes of a corpus): each loader applies it.

Example::

    >>> import torch
    >>> from saef.zoo.datasets import Data, DatasetSplit, load_dataset, register_dataset
    >>> def tiny(request):
    ...     split = DatasetSplit(torch.zeros(4, 1, 2), torch.tensor([0, 1, 0, 1]))
    ...     return Data(split, split, 2, (1, 2), request.name)
    >>> register_dataset("tiny", tiny)
    >>> load_dataset("tiny", root="unused").num_classes
    2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

from torch import Tensor

from .base import Data

__all__ = ["DatasetRequest", "register_dataset", "load_dataset", "file_keys", "default_size", "datasets_reading", "readers_phrase", "DATASETS", "GENERATED"]


@dataclass(frozen=True)
class DatasetRequest:
    """What :func:`load_dataset` was asked for, handed to the loader (see :func:`load_dataset` for each field)."""

    name: str
    root: Path
    size: Optional[int]
    seed: int
    data_file: Optional[Path]
    test_file: Optional[Path]
    context: int


@dataclass(frozen=True)
class _Source:
    load: Callable[[DatasetRequest], Data]
    files: frozenset  # which of "data_file", "test_file" it reads
    generated: Optional[int]  # made here: the largest size it makes (bounded by time and memory); else None
    default_size: Optional[int]  # the size made when none is asked for (generated sets); else None


_SOURCES: Dict[str, _Source] = {}  # in registration order: the order DATASETS lists them in


def register_dataset(name: str, load: Callable[[DatasetRequest], Data], *, data_file: bool = False,
                     test_file: bool = False, generated: Optional[int] = None, default_size: Optional[int] = None,
                     overwrite: bool = False) -> None:
    """Make ``load`` available as ``load_dataset(name, ...)``.

    Args:
        name: the dataset's name (non-empty).
        load: ``load(request: DatasetRequest) -> Data``; it applies ``request.size`` as the dataset means it.
        data_file, test_file: whether the dataset reads a file the user names (default: neither; a name
            given to a dataset that reads none is refused).
        generated: for a set made here, the largest ``size`` it makes (larger sizes are refused).
        default_size: for a set made here, the ``size`` it makes when given None (so that asking for it by
            number is known to be the same dataset).
        overwrite: replace a registered dataset of the same name instead of refusing.
    """
    if not name:
        raise ValueError("a dataset name must be non-empty")
    if name in _SOURCES and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace it)")
    files = frozenset(f for f, on in (("data_file", data_file), ("test_file", test_file)) if on)
    _SOURCES[name] = _Source(load, files, generated, default_size)


def file_keys(name: str) -> frozenset:
    """Which of ``data_file`` and ``test_file`` dataset ``name`` reads (empty for an unknown name)."""
    source = _SOURCES.get(name)
    return source.files if source is not None else frozenset()


def default_size(name: str) -> Optional[int]:
    """The size dataset ``name`` makes when none is asked for, where it has one (generated sets); else None."""
    source = _SOURCES.get(name)
    return source.default_size if source is not None else None


def datasets_reading(key: str) -> Tuple[str, ...]:
    """The registered datasets that read the file ``key`` (``"data_file"`` or ``"test_file"``)."""
    return tuple(name for name, source in _SOURCES.items() if key in source.files)


def readers_phrase(key: str) -> str:
    """"dataset libsvm", "datasets libsvm and text", "datasets a, b and c" (or "no dataset"): who reads ``key``."""
    names = datasets_reading(key)
    if not names:
        return "no dataset"
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"dataset{'s' if len(names) > 1 else ''} {listed}"


class _Names(Sequence):
    """The registered dataset names, in registration order (a live view: it includes later registrations)."""

    def __getitem__(self, index):
        return tuple(_SOURCES)[index]

    def __len__(self) -> int:
        return len(_SOURCES)

    def __contains__(self, name) -> bool:
        return name in _SOURCES

    def __repr__(self) -> str:
        return repr(tuple(_SOURCES))


class _Generated(Mapping):
    """Name -> the largest size, for the datasets generated here (a live view)."""

    def __getitem__(self, name: str) -> int:
        source = _SOURCES[name]
        if source.generated is None:
            raise KeyError(name)
        return source.generated

    def __iter__(self) -> Iterator[str]:
        return (name for name, source in _SOURCES.items() if source.generated is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


DATASETS = _Names()
GENERATED = _Generated()


def load_dataset(name: str, root: str | Path, *, size: int | None = None, seed: int = 0,
                 data_file: str | None = None, test_file: str | None = None, context: int = 64) -> Data:
    """Load dataset ``name`` from (or, for MNIST-1D, generate it into) ``root``.

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding the data (CIFAR/ImageNet) or the MNIST-1D cache; ignored by ``synthetic``/``digits``.
        size: MNIST-1D: number of samples generated (train 80 %, test 20 %; default 10000, at least 10).
            synthetic: training samples (default 512; test gets a quarter). text: bytes of the corpus
            (default 2,000,000). Other sets: keep a random subset of this many training samples (default: all).
        seed: seeds generation (MNIST-1D, synthetic), the digits train/test split and any subsampling.
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
    source = _SOURCES.get(name)
    if source is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    if size is not None and source.generated is not None and size > source.generated:
        raise ValueError(f"dataset_size = {size} is more than {name} generates here (at most {source.generated})")
    root = Path(root).expanduser()
    if (data_file is not None and "data_file" not in source.files) or (test_file is not None and "test_file" not in source.files):
        raise ValueError(f"data_file is for {readers_phrase('data_file')}, test_file for {readers_phrase('test_file')}, "
                         f"not {name!r}")
    as_path = lambda f: None if f is None else Path(f).expanduser()  # noqa: E731
    data = source.load(DatasetRequest(name, root, size, seed, as_path(data_file), as_path(test_file), context))
    _check_labels(data, root)
    return data


def _check_labels(data: Data, root: Path) -> None:
    """Every label a class index of the dataset (a corrupted file must not index out of the classifier)."""
    for split_name, split in (("train", data.train), ("test", data.test)):
        targets = getattr(split, "targets", None)
        if isinstance(targets, Tensor) and len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < data.num_classes):
            raise ValueError(f"{data.name} under {root}: {split_name} labels range over [{int(targets.min())}, "
                             f"{int(targets.max())}], not the {data.num_classes} classes 0..{data.num_classes - 1}")
