"""Random-k sparsification: k = max(1, floor(rho d)) entries chosen uniformly at random, indices not sent.

The indices come from the generator of the :class:`~saef.compress.Context` (run seed, step, layer, sender),
so every party redraws them and the payload is the k values only. Biased form (the kept values as they
are: E||C(v) - v||^2 = (1 - k/d) ||v||^2, contractive in expectation, for ef/saef/ef21) by default;
``randk:RHO:unbiased`` scales them by d/k (E C(v) = v, for ``direct``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .base import Compressor, Payload, kept_count

__all__ = ["RandK"]


def _sample(d: int, k: int, generator, device) -> Tensor:
    """k distinct indices of range(d), uniformly: the first k distinct values of a stream of uniform draws
    (sequential sampling without replacement), in O(k log k) instead of a permutation's O(d); a
    permutation's first k where k is a large part of d (the stream would repeat itself often)."""
    if 8 * k > d or k == 0:
        return torch.randperm(d, generator=generator, device=device)[:k]
    stream = torch.randint(d, (k + k // 8 + 16,), generator=generator, device=device)
    values, inverse = torch.unique(stream, return_inverse=True)
    while values.numel() < k:  # too many repeats: draw on
        more = torch.randint(d, (k - values.numel() + k // 8 + 16,), generator=generator, device=device)
        stream = torch.cat([stream, more])
        values, inverse = torch.unique(stream, return_inverse=True)
    # position of each value's first draw, in draw order: the first k of them
    first = torch.full((values.numel(),), stream.numel(), dtype=torch.int64, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(stream.numel(), device=device), reduce="amin")
    return stream[first.sort().values[:k]]


class RandK(Compressor):
    """Rand-k: payload per row, the k values (dtype of ``v``); 32 k bits for fp32.

    Args:
        rho: fraction of entries kept, in (0, 1].
        unbiased: scale the kept values by d / k (E C(v) = v).
    """

    random = True

    def __init__(self, rho: float, unbiased: bool = False):
        rho = float(rho)
        if not (0.0 < rho <= 1.0):
            raise ValueError(f"randk: rho must be in (0, 1], got rho={rho!r}")
        self.rho, self.unbiased = rho, bool(unbiased)
        self.name = f"randk:{rho:g}" + (":unbiased" if unbiased else "")

    def k(self, d: int) -> int:
        """Entries kept of ``d``, as top-k counts them (:func:`~saef.compress.base.kept_count`)."""
        return kept_count(self.rho, d)

    def indices(self, d: int, generators: Optional[List[Optional[torch.Generator]]], rows: int, device) -> Tensor:
        """The ``(rows, k)`` kept indices: the first k of a random permutation per row, from that row's
        generator (torch's global one where None)."""
        k = self.k(d)
        generators = generators if generators is not None else [None] * rows
        if len(generators) != rows:
            raise ValueError(f"randk: {rows} rows need {rows} generators, got {len(generators)}")
        out = torch.empty(rows, k, dtype=torch.int64, device=device)
        for r, g in enumerate(generators):
            out[r] = _sample(d, k, g, device)
        return out

    def _scale(self, d: int) -> float:
        return d / self.k(d) if self.unbiased and d else 1.0

    def encode_rows(self, rows: Tensor, generators=None) -> Payload:
        idx = self.indices(rows.shape[1], generators, rows.shape[0], rows.device)
        values = rows.gather(1, idx)
        scale = self._scale(rows.shape[1])
        return (values * scale if scale != 1.0 else values,)

    def decode_rows(self, payload: Payload, d: int, generators=None) -> Tensor:
        if generators is None or any(g is None for g in generators):
            raise ValueError("randk sends values only: decode needs generator= (or a context) in the state the "
                             "encoder's generator started from, to redraw the indices")
        values = payload[0]
        idx = self.indices(d, generators, values.shape[0], values.device)
        return torch.zeros(values.shape[0], d, dtype=values.dtype, device=values.device).scatter_(1, idx, values)

    def compress_rows(self, rows: Tensor, generators=None) -> Tensor:
        idx = self.indices(rows.shape[1], generators, rows.shape[0], rows.device)
        values = rows.gather(1, idx) * self._scale(rows.shape[1])
        return torch.zeros_like(rows).scatter_(1, idx, values)

    def delta(self, d: int) -> float:
        """k / d, in expectation (biased form); the unbiased form is not contractive."""
        if self.unbiased:
            return super().delta(d)
        return self.k(d) / d if d else 1.0
