"""Flat parameter vectors: many tensors laid end to end on one axis, and the finiteness check of a step."""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor

__all__ = ["flatten", "unflatten", "write_flat", "all_finite", "check_dense", "NonFiniteStep"]


class NonFiniteStep(FloatingPointError):
    """A step's loss or gradient had a NaN or Inf; nothing was changed (parameters, momentum and errors
    are as before the step)."""


def all_finite(*tensors: Tensor) -> Tensor:
    """A 0-d bool: no NaN or Inf in any of ``tensors``.

    A NaN or an Inf anywhere makes a tensor's sum non-finite, so a finite sum proves the tensor finite in
    one pass (``isfinite(t).all()`` takes four). Only a non-finite sum -- a NaN, an Inf, or an overflow
    of finite values -- is checked element by element."""
    sums = torch.stack([t.sum() for t in tensors])
    if bool(sums.isfinite().all()):
        return torch.ones((), dtype=torch.bool, device=sums.device)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def check_dense(grads: Sequence[Tensor]) -> None:
    """Refuse sparse gradients (the compressors and the error buffers are dense), saying what to change."""
    if any(g is not None and g.is_sparse for g in grads):
        raise ValueError("saef needs dense gradients; a parameter has a sparse one (e.g. nn.Embedding(sparse=True)): "
                         "build it with sparse=False")


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def unflatten(flat: Tensor, shapes: Sequence[Sequence[int]]) -> List[Tensor]:
    """Views of ``flat`` (last axis) with the given shapes; a leading batch axis is kept."""
    lead = flat.shape[:-1]
    out, offset = [], 0
    for shape in shapes:
        d = math.prod(shape)
        out.append(flat[..., offset : offset + d].view(*lead, *shape))
        offset += d
    return out


@torch.no_grad()
def write_flat(params: Sequence[Tensor], flat: Tensor, shapes: Sequence[Sequence[int]]) -> None:
    """Copy the flat vector ``flat`` into the tensors ``params`` (laid end to end with ``shapes``)."""
    for p, value in zip(params, unflatten(flat, shapes)):
        p.copy_(value)
