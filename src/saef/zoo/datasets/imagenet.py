"""``imagenet``: image folders ``root/train/<class>/*`` and ``root/val/<class>/*`` read with torchvision,
decoded lazily batch by batch (:class:`ImageFolderSplit`), with the standard random-resized-crop and flip
for training and resize plus centre crop for validation; ``size`` keeps a random subset of the training
images.

Example::

    >>> data = load_dataset("imagenet", "~/data/imagenet")   # doctest: +SKIP
    >>> data.input_shape   # doctest: +SKIP
    (3, 224, 224)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import Data, subsample
from .registry import DatasetRequest, register_dataset

__all__ = ["IMAGENET_STATS", "ImageFolderSplit"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _load(request: DatasetRequest) -> Data:
    data = _load_imagenet(request.root)
    if request.size is not None:
        data.train = subsample(data.train, request.size, request.seed)
    return data


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


register_dataset("imagenet", _load)
