"""Toy problems shared by the algorithm tests: per-worker gradients that are cheap and exactly reproducible."""

import torch


def quadratic_problem(workers, shapes, seed=0, dtype=torch.float64):
    """Worker k's gradient at x: A_k * x - b_k (element-wise); returns (grad_fn, x0)."""
    g = torch.Generator().manual_seed(seed)
    scale = [[torch.rand(s, generator=g, dtype=dtype) + 0.5 for s in shapes] for _ in range(workers)]
    shift = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(workers)]

    def grad_fn(k, x):
        return [a * xi - b for a, xi, b in zip(scale[k], x, shift[k])]

    x0 = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return grad_fn, x0
