"""Top-k per chunk (``topk:RHO:chunk=N``): the flattened layer is cut into chunks of n = min(N, d) entries,
and each chunk keeps its k = max(1, floor(rho n)) entries of largest magnitude (SparseLoCo's and DeMo's
sparsification, which spreads what is sent over the whole layer instead of where the largest entries
cluster).

Payload per row: the C k kept values (C = ceil(d / n) chunks; dtype of ``v``), chunk by chunk, and each
one's index within its chunk in b = ceil(log2 n) bits (a fixed width: the receiver finds chunk c's entries
at positions c k .. c k + k - 1), packed: 8 ceil(C k b / 8) bits. A last chunk shorter than n is padded with
entries that are never kept while it has k real ones (and are zeros, dropped on decoding, when it has fewer).
delta = k / n per chunk, so k / n for the layer too (each chunk keeps at least k / n of its squared norm).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Compressor, Payload, kept_count
from .packing import pack_fixed, unpack_fixed

__all__ = ["ChunkedTopK"]


class ChunkedTopK(Compressor):
    """Top-k within each chunk of ``chunk`` entries of the flattened layer.

    Args:
        rho: fraction of each chunk's entries kept, in (0, 1].
        chunk: entries per chunk, >= 2 (layers smaller than it are one chunk).
    """

    def __init__(self, rho: float, chunk: int):
        rho = float(rho)
        if not (0.0 < rho <= 1.0):
            raise ValueError(f"topk: rho must be in (0, 1], got rho={rho!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 2:
            raise ValueError(f"topk: chunk must be an integer >= 2, got chunk={chunk!r}")
        self.rho, self.chunk = rho, chunk
        self.name = f"topk:{rho:g}:chunk={chunk}"

    def shape(self, d: int):
        """(n, C, k): entries per chunk, chunks, entries kept per chunk, for a layer of ``d``."""
        n = min(self.chunk, d)
        return n, math.ceil(d / n), kept_count(self.rho, n)

    def encode_rows(self, rows: Tensor) -> Payload:
        w, d = rows.shape
        n, c, k = self.shape(d)
        magnitude = rows.new_full((w, c * n), -1.0)  # (padding: below every real magnitude, never kept first)
        magnitude[:, :d] = rows.abs()
        index = magnitude.view(w, c, n).topk(k, dim=2, sorted=False).indices.sort(dim=2).values  # (w, c, k)
        flat = (index + torch.arange(c, device=rows.device).view(1, c, 1) * n).view(w, -1)
        padded = rows.new_zeros(w, c * n)
        padded[:, :d] = rows
        values = padded.gather(1, flat)
        return values, pack_fixed(index.view(w, -1), max(1, (n - 1).bit_length())).to(rows.device)

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        values, packed = payload
        w = values.shape[0]
        n, c, k = self.shape(d)
        index = unpack_fixed(packed, c * k, max(1, (n - 1).bit_length())).to(values.device).view(w, c, k)
        flat = (index + torch.arange(c, device=values.device).view(1, c, 1) * n).view(w, -1)
        out = values.new_zeros(w, c * n)
        out.scatter_(1, flat, values)
        return out[:, :d]

    def delta(self, d: int) -> float:
        n, _, k = self.shape(d)
        return k / n
