"""Bits on the wire: packing booleans into bytes (signs), fixed-width unsigned integers (QSGD's levels,
top-k's fixed-width indices), packed-sign decoding by lookup tables, and the index packing of top-k.

Each helper takes numpy's route where :func:`saef.compress.kernels.numpy_view` allows it (a CPU path) and
torch's otherwise; both produce the same bytes.

Example::

    >>> bits = torch.tensor([[True, False, True]])
    >>> pack_bits(bits)
    tensor([[5]], dtype=torch.uint8)
    >>> unpack_bits(pack_bits(bits), 3)
    tensor([[ True, False,  True]])
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch import Tensor

from .indexcode import word_type
from .kernels import numpy_view

__all__ = ["pack_bits", "unpack_bits", "pack_fixed", "unpack_fixed", "pack_nonnegative", "pack_nonnegative_array",
           "sign_lookup", "pack_index_bits", "unpack_index_bits"]

_BIT_WEIGHTS: Dict[torch.device, Tensor] = {}


def _bit_weights(device: torch.device) -> Tensor:
    # 1, 2, 4, ..., 128 as uint8; cached per device because packing runs every step.
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return w


# Multiplying the int64 view of 8 bytes that are each 0 or 1 by this constant gathers byte i's bit at
# bit 56 + i of the product, and no other partial product reaches bits 56..63 (nor carries into them).
_GATHER_8_BYTES = 0x0102040810204080


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a ``(W, n)`` bool tensor into ``(W, ceil(n / 8))`` uint8, bit i of byte j = element 8 j + i."""
    rows, n = bits.shape
    array = numpy_view(bits)
    if array is not None:
        return torch.from_numpy(np.packbits(array, axis=1, bitorder="little")).view(rows, -(-n // 8))
    pad = (-n) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    if sys.byteorder == "little" and bits.is_contiguous() and bits.numel():
        # One multiply per 8 elements instead of a reduction over a length-8 axis (~8x faster).
        words = bits.view(torch.uint8).view(rows, -1, 8).view(torch.int64).squeeze(-1)
        gathered = words * _GATHER_8_BYTES
        gathered >>= 56  # in place: one temporary less (fresh buffers cost page faults on every call)
        return gathered.to(torch.uint8)
    grouped = bits.view(rows, -1, 8).to(torch.uint8)
    return (grouped * _bit_weights(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``(W, ceil(n / 8))`` uint8 -> ``(W, n)`` bool."""
    rows = packed.shape[0]
    array = numpy_view(packed)
    if array is not None:
        return torch.from_numpy(np.unpackbits(array, axis=1, count=n, bitorder="little")).view(torch.bool).view(rows, n)
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0
    return bits.view(rows, -1)[:, :n]


_FIXED_CHUNK = 1 << 16  # entries per numpy pass (a multiple of 8, so every chunk's bits start on a byte)


def pack_fixed(values: Tensor, b: int) -> Tensor:
    """``(W, n)`` integers in [0, 2^b), b <= 32 -> ``(W, ceil(n b / 8))`` bytes: bit j of entry e at stream
    bit e b + j (the format of top-k's indices and of quantised levels), on any device (numpy on the CPU,
    in chunks that bound its temporaries)."""
    array = numpy_view(values)
    if array is not None:
        return torch.from_numpy(_pack_fixed_array(array, b))
    rows, n = values.shape
    bits = torch.empty(rows, n, b, dtype=torch.bool, device=values.device)  # one byte per bit, not eight
    for j in range(b):
        torch.ne((values >> j) & 1, 0, out=bits[:, :, j])
    return pack_bits(bits.view(rows, n * b))


def _pack_fixed_array(array: np.ndarray, b: int) -> np.ndarray:
    rows, n = array.shape
    out = np.empty((rows, -(-n * b // 8)), dtype=np.uint8)
    for start in range(0, n, _FIXED_CHUNK):
        packed = pack_index_bits(array[:, start : start + _FIXED_CHUNK], b)
        out[:, start * b // 8 : start * b // 8 + packed.shape[1]] = packed
    return out


def _unpack_fixed_array(packed: np.ndarray, n: int, b: int) -> np.ndarray:
    out = np.empty((packed.shape[0], n), dtype=np.int64)
    for start in range(0, n, _FIXED_CHUNK):
        count = min(_FIXED_CHUNK, n - start)
        out[:, start : start + count] = unpack_index_bits(packed[:, start * b // 8 : -(-(start + count) * b // 8)], count, b)
    return out


def unpack_fixed(packed: Tensor, n: int, b: int) -> Tensor:
    """Inverse of :func:`pack_fixed`: ``(W, bytes)`` -> ``(W, n)`` int64."""
    array = numpy_view(packed)
    if array is not None:
        return torch.from_numpy(_unpack_fixed_array(array, n, b))
    bits = unpack_bits(packed, n * b).view(packed.shape[0], n, b)
    out = torch.zeros(packed.shape[0], n, dtype=torch.int64, device=packed.device)
    for j in range(b):
        out |= bits[:, :, j].to(torch.int64) << j
    return out


def pack_nonnegative(rows: Tensor, memo: Callable = None) -> Tensor:
    """``pack_bits(rows >= 0)``; on the CPU through numpy (its comparison is ~3x faster than torch's), the
    booleans written into a buffer kept by ``memo`` (a :meth:`Layout.memo <saef.compress.Layout.memo>`)
    if one is given."""
    array = numpy_view(rows)
    if array is None:
        return pack_bits(rows >= 0)
    out = None if memo is None else memo(("nonnegative-bits", array.shape), lambda: np.empty(array.shape, dtype=bool))
    return torch.from_numpy(pack_nonnegative_array(array, out))


def pack_nonnegative_array(array: np.ndarray, out: np.ndarray = None) -> np.ndarray:
    """:func:`pack_nonnegative` of a numpy array, the booleans written into ``out`` if given."""
    return np.packbits(np.greater_equal(array, 0, out=out), axis=1, bitorder="little")


_SIGN_TABLES: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}


def sign_lookup(packed: Tensor, scales: Tensor, table_of_byte, out: Tensor = None) -> Tensor:
    """Decode packed signs with lookup tables: ``(W, n)`` bytes -> ``(W, 8 n)`` values +-scale.

    ``scales`` is ``(W, T)``: T tables per row, each mapping a byte to its 8 values; byte j of a row uses
    table ``t`` where ``table_of_byte[j] = 256 t`` (an int, or a ``(n,)`` int64 tensor). One gather writes the output once;
    unpacking to booleans and then selecting took three passes. With ``out`` (``(W, m)``, m <= 8 n), the
    first m values of each row are written into it instead, and ``out`` is returned."""
    rows, nbytes = packed.shape
    key = (packed.device, scales.dtype)
    signs = _SIGN_TABLES.get(key)
    if signs is None:  # +-1 for the 8 bits of every byte value
        bits = unpack_bits(torch.arange(256, dtype=torch.uint8, device=packed.device).view(256, 1), 8)
        signs = _SIGN_TABLES[key] = bits.to(scales.dtype) * 2 - 1
    tables = scales.reshape(-1, 1, 1) * signs  # (W * T, 256, 8)
    if rows == 1 and isinstance(table_of_byte, int) and table_of_byte == 0:
        index = packed  # one table: the byte is the index
    else:
        index = packed.long() + table_of_byte  # table_of_byte: first row of each byte's table (a multiple of 256)
        if rows > 1:  # row w's tables start at w * T * 256
            index += (torch.arange(rows, device=packed.device) * (scales.shape[1] * 256)).unsqueeze(1)
    tables = tables.view(-1, 8)
    array = numpy_view(tables)
    if (out is not None and array is not None and out.stride(-1) == 1 and out.dtype == tables.dtype
            and not out.requires_grad and not out.is_inference()):  # (those are left to copy_, which checks them)
        # Straight into out, row by row: whole bytes by take, the last byte's first few values apart.
        m = out.shape[1]
        whole, target, index = m // 8, out.numpy(), index.numpy()
        for r in range(rows):
            np.take(array, index[r, :whole], axis=0, out=target[r, : 8 * whole].reshape(whole, 8), mode="clip")
            if m > 8 * whole:
                target[r, 8 * whole :] = array[index[r, whole]][: m - 8 * whole]
        return out
    if array is not None:  # numpy's take copies the 32-byte rows ~1.7x faster than index_select
        values = torch.from_numpy(np.take(array, index.reshape(-1).numpy(), axis=0, mode="clip")).view(rows, nbytes * 8)
    else:
        values = tables.index_select(0, index.reshape(-1).long()).view(rows, nbytes * 8)
    return values if out is None else out.copy_(values[:, : out.shape[1]])


# Index packing with numpy: an index's low b bits are the first b bits of its little-endian 32-bit form,
# so unpackbits/packbits move all of them at once (the torch path works bit by bit).
def pack_index_bits(idx: np.ndarray, b: int) -> np.ndarray:
    """``(W, k)`` indices < 2^b -> ``(W, ceil(k b / 8))`` bytes: bit j of entry e at stream bit e b + j."""
    w, k = idx.shape
    word = np.dtype(word_type(b))
    # flat (un)packing: numpy's per-axis versions over an axis of a few bytes are 2-3x slower
    bits = np.unpackbits(idx.astype(word).view(np.uint8).reshape(-1), bitorder="little").reshape(w, k, 8 * word.itemsize)[:, :, :b]
    return np.packbits(bits.reshape(w, k * b), axis=1, bitorder="little")


def unpack_index_bits(packed: np.ndarray, k: int, b: int) -> np.ndarray:
    """Inverse of :func:`pack_index_bits`: ``(W, bytes)`` -> ``(W, k)`` int64."""
    w = packed.shape[0]
    word = np.dtype(word_type(b))
    words = np.zeros((w, k, 8 * word.itemsize), dtype=np.uint8)
    words[:, :, :b] = np.unpackbits(packed, axis=1, count=k * b, bitorder="little").reshape(w, k, b)
    return np.packbits(words.reshape(-1), bitorder="little").view(word).reshape(w, k).astype(np.int64)
