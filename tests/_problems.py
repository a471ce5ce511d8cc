"""Toy problems shared by the algorithm tests: per-worker gradients that are cheap and exactly reproducible,
and a small convolutional model with its batches (the simulator and the optimizer facade)."""

import torch
from torch import nn


def quadratic_problem(workers, shapes, seed=0, dtype=torch.float64):
    """Worker k's gradient at x: A_k * x - b_k (element-wise); returns (grad_fn, x0)."""
    g = torch.Generator().manual_seed(seed)
    scale = [[torch.rand(s, generator=g, dtype=dtype) + 0.5 for s in shapes] for _ in range(workers)]
    shift = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(workers)]

    def grad_fn(k, x):
        return [a * xi - b for a, xi, b in zip(scale[k], x, shift[k])]

    x0 = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return grad_fn, x0


def small_model(batchnorm=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv1d(1, 4, 5, padding=2)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 5)]
    return nn.Sequential(*layers)


def batches(n, size=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 12, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def tiny_mlp():
    """A 5-8-3 MLP, seeded (the model of the rules' and the facade's tests)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_batches(n, seed=1):
    """``n`` batches of 12 samples of 5 features and 3 classes for :func:`tiny_mlp`."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]
