"""Datasets as plain tensors: MNIST-1D (the default, generated locally), digits, CIFAR-10/100, ImageNet,
synthetic, LIBSVM files and byte-level text, one module per source, each registering its loader with
:mod:`.registry`; :mod:`.base` holds what they share (:class:`Data`, :class:`DatasetSplit`, batching).

Nothing here downloads: MNIST-1D is generated with ``mnist1d.data.make_dataset`` and cached on disk, digits
ships with scikit-learn, the text corpus is the standard library's own source, and CIFAR/ImageNet/LIBSVM
are read from files the user has put under ``root`` or named.

Example::

    >>> import torch
    >>> from saef.zoo.datasets import epoch_batches, load_dataset
    >>> data = load_dataset("synthetic", root="unused")
    >>> g = torch.Generator().manual_seed(0)
    >>> for indices in epoch_batches(len(data.train), 64, g):
    ...     inputs, targets = data.train.batch(indices)
"""

from .base import Augment, Data, DatasetSplit, content_digest, crop_flip_augment, epoch_batches, hold_out
from .registry import (DATASETS, GENERATED, DatasetRequest, datasets_reading, default_size, file_keys, load_dataset, readers_phrase,
                       register_dataset)

# Each source registers itself on import; this order is the order DATASETS lists them in.
from . import mnist1d, digits, cifar, imagenet, synthetic, libsvm, text  # noqa: E402,F401,I001  isort:skip
from .cifar import CIFAR_STATS, RestrictedUnpickler  # noqa: E402
from .imagenet import IMAGENET_STATS, ImageFolderSplit  # noqa: E402
from .libsvm import load_libsvm  # noqa: E402
from .mnist1d import MNIST1D_DEFAULT_SIZE  # noqa: E402

__all__ = ["DATASETS", "GENERATED", "load_dataset", "register_dataset", "file_keys", "default_size", "datasets_reading", "readers_phrase", "DatasetRequest", "Data", "DatasetSplit", "content_digest",
           "Augment", "hold_out", "epoch_batches", "crop_flip_augment", "load_libsvm", "RestrictedUnpickler",
           "ImageFolderSplit", "CIFAR_STATS", "IMAGENET_STATS", "MNIST1D_DEFAULT_SIZE"]
