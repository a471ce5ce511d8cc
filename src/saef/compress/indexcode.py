"""Sorted index sets coded near their information content: the Elias-Fano code, of a size fixed by (d, k).

A top-k payload names k of d positions. Written one by one in ceil(log2 d) bits each (today's format), that
costs k ceil(log2 d) bits; the set itself holds log2 C(d, k) bits of information, about
k (log2(d / k) + log2 e) when k << d (8.1 bits per kept entry at 1 % of 10^6, against 20).

Elias-Fano writes the sorted indices i_0 < ... < i_{k-1} as
  * their low L = max(0, floor(log2(d / k))) bits, packed (k L bits), and
  * their high parts h_j = i_j >> L in unary: a bit vector of k + ((d - 1) >> L) + 1 bits with bit
    h_j + j set for every j,
at most k (2 + log2(d / k)) bits: within 0.56 k bits of the bound where d / k is a power of two.

Why this code rather than Golomb-Rice on the gaps (about as short, and chosen by the same d / k): its size
depends on (d, k) only, so a receiver knows every payload's size before it arrives (the transports'
all-to-all needs that; a Rice code's size depends on the gaps and would need its sizes exchanged first),
and both directions are a few vectorised passes (positions of the set bits decode the high parts), where a
Rice decoder walks the stream entry by entry.

Top-k's index section of a layer is whichever of the two is smaller (:func:`is_coded`): the code, or the
explicit ceil(log2 d) bits per index (smaller only for layers of a few elements). Both sides compute that
choice from (d, k), so no flag bit is sent. The compiled kernels (``_native.c``, ``index_section``) apply
the same rule.

Example::

    >>> idx = np.array([[3, 4, 90]])                 # sorted, one row
    >>> packed = encode(idx, d=100)                  # (1, ceil(coded_bits(100, 3) / 8)) bytes
    >>> decode(packed, d=100, k=3)
    array([[ 3,  4, 90]])
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["index_bits", "word_type", "low_bits", "coded_bits", "explicit_bits", "is_coded", "section_bits",
           "information_bits", "encode", "decode"]


def index_bits(d: int) -> int:
    """Bits needed to write any index in ``range(d)``: ceil(log2 d), 0 for d <= 1."""
    return max(d - 1, 0).bit_length()


def word_type(b: int) -> str:
    """The narrowest little-endian unsigned type that holds b bits (fewer bits to unpack and drop)."""
    return "<u1" if b <= 8 else "<u2" if b <= 16 else "<u4" if b <= 32 else "<u8"


def low_bits(d: int, k: int) -> int:
    """L: the low bits written as they are, max(0, floor(log2(d / k))) (0 for k = 0)."""
    if k <= 0 or d <= k:
        return 0
    return (d // k).bit_length() - 1


def _high_length(d: int, k: int, low: int) -> int:
    return k + ((d - 1) >> low) + 1 if d > 0 else k


def coded_bits(d: int, k: int) -> int:
    """Bits of the Elias-Fano code of k indices in [0, d): k L + k + ((d - 1) >> L) + 1."""
    low = low_bits(d, k)
    return k * low + _high_length(d, k, low)


def explicit_bits(d: int, k: int) -> int:
    """Bits of k indices written one by one: k ceil(log2 d) (top-k's format today)."""
    return k * index_bits(d)


def is_coded(d: int, k: int) -> bool:
    """Whether top-k writes a layer's k indices in [0, d) with this code (shorter than the explicit bits)."""
    return coded_bits(d, k) < explicit_bits(d, k)


def section_bits(d: int, k: int) -> int:
    """Bits of top-k's index section for a layer: the smaller of :func:`coded_bits` and :func:`explicit_bits`."""
    return min(coded_bits(d, k), explicit_bits(d, k))


def information_bits(d: int, k: int) -> float:
    """log2 C(d, k), the information in a k-subset of d positions."""
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)


def _check(idx: np.ndarray, d: int) -> None:
    if idx.ndim != 2:
        raise ValueError(f"indices must be (rows, k), got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= d):
        raise ValueError(f"indices must lie in [0, {d}), got [{idx.min()}, {idx.max()}]")
    if idx.shape[1] > 1 and bool((np.diff(idx, axis=1) <= 0).any()):
        raise ValueError("indices must be strictly increasing along each row")


def encode(idx: np.ndarray, d: int, check: bool = True) -> np.ndarray:
    """``(W, k)`` strictly increasing indices in [0, d) -> ``(W, ceil(coded_bits(d, k) / 8))`` uint8: the L-bit
    low parts packed (bit j of entry e at stream bit e L + j), then the high bit vector. ``check=False``
    skips the checks of the indices (for callers that made them sorted and in range)."""
    idx = np.asarray(idx, dtype=np.int64)
    if check:
        _check(idx, d)
    rows, k = idx.shape
    low = low_bits(d, k)
    high_length = _high_length(d, k, low)
    bits = np.zeros((rows, k * low + high_length), dtype=np.uint8)
    if low:  # the low bits of each index, least significant first, from its little-endian bytes
        words = np.ascontiguousarray(idx.astype(word_type(low)))  # (the narrowest type, as top-k packs indices)
        spread = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little").reshape(rows, k, -1)
        bits[:, : k * low] = spread[:, :, :low].reshape(rows, k * low)
    positions = (idx >> low) + np.arange(k, dtype=np.int64)  # h_j + j: strictly increasing
    np.put_along_axis(bits[:, k * low :], positions, 1, axis=1)
    return np.packbits(bits, axis=1, bitorder="little")


def decode(packed: np.ndarray, d: int, k: int) -> np.ndarray:
    """Inverse of :func:`encode`: ``(W, bytes)`` -> ``(W, k)`` int64 indices."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    low = low_bits(d, k)
    total = coded_bits(d, k)
    if packed.shape[1] != (total + 7) // 8:
        raise ValueError(f"a code of {k} indices in [0, {d}) has {(total + 7) // 8} bytes, got {packed.shape[1]}")
    bits = np.unpackbits(packed, axis=1, count=total, bitorder="little")
    high = bits[:, k * low :]
    set_bits = np.flatnonzero(high.ravel())  # row by row, in order (one pass, faster than a 2-D nonzero)
    if set_bits.size != rows * k or (rows > 1 and bool((np.bincount(set_bits // high.shape[1], minlength=rows) != k).any())):
        raise ValueError(f"the high bit vector holds {set_bits.size} set bits, expected {k} in each of {rows} row(s)")
    out = ((set_bits % high.shape[1]).reshape(rows, k) - np.arange(k, dtype=np.int64)) << low
    if low:  # the low bits back into numbers: each entry's L bits against their weights 2^j
        out |= bits[:, : k * low].reshape(rows, k, low) @ (np.int64(1) << np.arange(low, dtype=np.int64))
    if k and (out[:, -1].max() >= d or (k > 1 and bool((out[:, 1:] <= out[:, :-1]).any()))):
        raise ValueError(f"the code does not hold {k} strictly increasing indices in [0, {d})")
    return out
