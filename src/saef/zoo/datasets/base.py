"""What every dataset is made of: splits held as two tensors, the :class:`Data` record, batching,
held-out splits and the on-the-fly augmentation of images.

A loader (one module per source in this package) returns a :class:`Data` whose splits hold the whole set as
two tensors (inputs float32 with a channel axis, targets int64), so a training loop indexes batches
directly and needs no DataLoader. Randomness is explicit: shuffling (:func:`epoch_batches`) and
augmentation (``Data.augment``) take a ``torch.Generator``, so two runs with one seed see the same batches.

Example::

    >>> g = torch.Generator().manual_seed(0)
    >>> split = DatasetSplit(torch.zeros(10, 1, 4), torch.arange(10) % 2)
    >>> [split.batch(indices)[0].shape[0] for indices in epoch_batches(len(split), 4, g)]
    [4, 4]
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ... import files

__all__ = ["Augment", "DatasetSplit", "Data", "content_digest", "hold_out", "epoch_batches", "subsample", "normalise_scalar",
           "crop_flip_augment", "open_regular", "subsample_indices"]

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


def content_digest(data: Data) -> str:
    """SHA-256 of the data as loaded: every split's inputs and targets (for a split read lazily from files,
    its targets), so that processes which loaded different data can tell. Covers generated sets too, whose
    :attr:`Data.digest` is None."""
    digest = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        for tensor in ((split.inputs, split.targets) if isinstance(split, DatasetSplit) else (getattr(split, "targets", None),)):
            if isinstance(tensor, Tensor):
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


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


def subsample_indices(n: int, size: int, seed: int) -> Tensor | None:
    """Which of ``n`` samples :func:`subsample` keeps (in its order), or None for all of them: a reader
    that streams its file keeps just these rows."""
    if size >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def subsample(split: Any, size: int, seed: int) -> Any:
    """A random ``size`` of the split's samples (drawn from ``seed``), or the split itself if it is no larger."""
    keep = subsample_indices(len(split), size, seed)
    if keep is None:
        return split
    if isinstance(split, DatasetSplit):
        return DatasetSplit(split.inputs[keep], split.targets[keep])
    return split.subset(keep)


def open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading in binary, if it is a regular file: a FIFO, a device (``/dev/zero``), a
    socket or a directory is refused at once with a ValueError naming it (:func:`saef.files.open_regular`:
    a FIFO with no writer cannot block). FileNotFoundError if it does not exist; ``what`` names the file in
    messages ("LIBSVM file")."""
    try:
        return os.fdopen(files.open_regular(path), "rb")
    except files.NotRegularFile as error:
        raise ValueError(f"{path} is {error.kind}, not a {what} (a regular file is needed)") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    except OSError as error:
        raise ValueError(f"{what} {path} cannot be opened: {error.strerror or error}") from None


def normalise_scalar(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    """Both arrays as float32 tensors standardised by the training array's mean and standard deviation."""
    # Statistics from the training split only, so nothing about the test set leaks into training.
    mean, std = float(train.mean()), float(train.std())
    as_tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return as_tensor(train), as_tensor(test)


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
