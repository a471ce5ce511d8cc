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

__all__ = ["ChunkedTopK", "DCTTopK"]


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


class DCTTopK(ChunkedTopK):
    """Top-k per chunk of the chunk's DCT coefficients (``dcttopk:RHO:chunk=N``; DeMo's transform, here 1-D
    per chunk of the flattened layer, default N = 64): each chunk of n entries is rotated by the orthonormal
    DCT-II, keeps its k = max(1, floor(rho n)) coefficients of largest magnitude, and is rotated back. The
    payload is :class:`ChunkedTopK`'s over the coefficients (values and their indices within the chunk). The
    rotation keeps norms, so delta = k / n as for top-k per chunk (a last chunk is padded with zeros, which
    adds nothing to the norm)."""

    def __init__(self, rho: float, chunk: int = 64):
        super().__init__(rho, chunk)
        self.name = f"dcttopk:{rho:g}:chunk={chunk}"

    @staticmethod
    def basis(n: int, dtype: torch.dtype, device) -> Tensor:
        """The orthonormal DCT-II matrix of size n (rows: frequencies)."""
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        basis[0] /= math.sqrt(2.0)
        return basis.to(dtype=dtype, device=device)

    def _rotate(self, rows: Tensor, d: int, inverse: bool) -> Tensor:
        n, c, _ = self.shape(d)
        basis = self.basis(n, rows.dtype, rows.device)
        chunks = rows.view(rows.shape[0], c, n)
        return (chunks @ basis if inverse else chunks @ basis.T).reshape(rows.shape[0], c * n)

    def encode_rows(self, rows: Tensor) -> Payload:
        w, d = rows.shape
        n, c, _ = self.shape(d)
        padded = rows.new_zeros(w, c * n)
        padded[:, :d] = rows
        return super().encode_rows(self._rotate(padded, d, inverse=False))

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        n, c, _ = self.shape(d)
        coefficients = super().decode_rows(payload, c * n)
        return self._rotate(coefficients.contiguous(), d, inverse=True)[:, :d]
