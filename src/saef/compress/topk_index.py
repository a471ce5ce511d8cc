"""Where top-k's indices go in its payload: the plan of every layer's index section (Elias-Fano coded or
fixed-width, :func:`saef.compress.indexcode.is_coded`), made once per layout, and the packers of those
sections in torch (any device) and numpy. :mod:`saef.compress.topk` uses them; the arithmetic of the kept
values is there.

Example::

    >>> idx = torch.tensor([[1, 5, 6]])
    >>> decode_coded(encode_coded(idx, 64), 64, 3)
    tensor([[1, 5, 6]])
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from torch import Tensor

from . import indexcode
from .base import Compressor, Layout
from .indexcode import is_coded, low_bits
from .kernels import index_bits
from .packing import pack_bits, pack_index_bits, unpack_bits, unpack_index_bits

__all__ = ["index_plan", "add_high_parts", "encode_coded", "decode_coded", "pack_section", "unpack_section"]


def index_plan(topk: Compressor, layout: Layout, device: torch.device) -> Dict[str, object]:
    """Where every layer's kept entries and index bits lie (made once per layout and device)."""
    return layout.memo(("topk-plan", type(topk), topk.rho, device), lambda: _make_plan(topk, layout, device))


def _make_plan(topk: Compressor, layout: Layout, device: torch.device) -> Dict[str, object]:
    sizes, offsets = list(layout.sizes), layout.offsets
    ks = [topk.k(d) for d in sizes]
    coded = [is_coded(d, k) for d, k in zip(sizes, ks)]
    # each layer's fixed-width fields: the code's low bits, or the explicit indices
    bits = [low_bits(d, k) if c else index_bits(d) for d, k, c in zip(sizes, ks, coded)]
    groups: Dict[int, List[int]] = {}
    for i, d in enumerate(sizes):
        groups.setdefault(d, []).append(i)
    group_plan = []
    for d, members in groups.items():
        gather = None
        if len(members) > 1:
            gather = torch.cat([torch.arange(offsets[i], offsets[i] + d) for i in members]).to(device)
        group_plan.append((d, members, gather))
    # Where layer i's kept entries sit in the concatenation of all layers' kept entries (layer order), and
    # where its index section starts in a payload row.
    starts = Layout(ks).offsets
    byte_start = Layout([-(-indexcode.section_bits(d, k) // 8) for d, k in zip(sizes, ks)]).offsets
    plan = dict(ks=ks, bits=bits, sizes=sizes, starts=starts, byte_start=byte_start, width=max(bits, default=0),
                groups=group_plan, coded=any(coded))
    per_entry = lambda values: np.repeat(np.asarray(values, dtype=np.int64), ks)  # noqa: E731 (one value per kept entry)
    tables = dict(layer_offset=per_entry(offsets[:-1]), layer_size=per_entry(sizes), **_field_plan(plan),
                  **_high_plan(plan, coded, per_entry))
    plan.update({name: torch.from_numpy(np.ascontiguousarray(t)).to(device) for name, t in tables.items()})
    plan["shifts"] = torch.arange(max(plan["width"], 1), dtype=torch.int64, device=device)
    return plan


def _field_plan(plan: Dict[str, object]) -> Dict[str, np.ndarray]:
    """The fixed-width fields: bit j of kept entry e of layer i lies at 8 byte_start[i] + e b_i + j of the
    packed stream. ``source``: for each stream bit, which (entry, j) of the ``(total k, width)`` bit table
    it copies, or the filler (an extra zero at the end); ``position``: the inverse, for unpacking (the
    filler for j >= b_i)."""
    ks, bits, starts, byte_start, width = plan["ks"], plan["bits"], plan["starts"], plan["byte_start"], plan["width"]
    total_k, total_bits = starts[-1], 8 * byte_start[-1]
    source = np.full(total_bits, total_k * width, dtype=np.int64)
    position = np.full((total_k, max(width, 1)), total_bits, dtype=np.int64)
    for i, (k, b) in enumerate(zip(ks, bits)):
        if k and b:
            entries = np.arange(starts[i], starts[i + 1])[:, None]
            stream = 8 * byte_start[i] + (entries - starts[i]) * b + np.arange(b)[None, :]
            source[stream.reshape(-1)] = (entries * width + np.arange(b)[None, :]).reshape(-1)
            position[starts[i] : starts[i + 1], :b] = stream
    return dict(source=source, position=position)


def _high_plan(plan: Dict[str, object], coded: List[bool], per_entry) -> Dict[str, np.ndarray]:
    """The code's high bit vectors. Encoding sets bit high_base[e] + (index >> high_shift[e]) for kept
    entry e, the j-th of layer i: high_base[e] = 8 byte_start[i] + k_i L_i + j (entries of explicit layers
    point past the stream, to a column that is dropped). Decoding reads the coded layers' high bit vectors
    concatenated (``high_positions``), where entry e's set bit must lie in [high_start[e], high_end[e])."""
    ks, sizes, bits, starts, byte_start = plan["ks"], plan["sizes"], plan["bits"], plan["starts"], plan["byte_start"]
    total_k, total_bits = starts[-1], 8 * byte_start[-1]
    is_coded_entry = per_entry(coded).astype(bool)
    entry_in_layer = np.arange(total_k, dtype=np.int64) - per_entry(starts[:-1])
    vector_start = per_entry([8 * byte_start[i] + k * b for i, (k, b) in enumerate(zip(ks, bits))])
    high_base = np.where(is_coded_entry, vector_start + entry_in_layer, total_bits)
    high_shift = np.where(is_coded_entry, per_entry(bits), 62)
    layers = [i for i in range(len(ks)) if coded[i]]
    lengths = [indexcode.coded_bits(sizes[i], ks[i]) - ks[i] * bits[i] for i in layers]
    first = 8 * np.asarray(byte_start[:-1], dtype=np.int64) + np.asarray(ks, dtype=np.int64) * np.asarray(bits, dtype=np.int64)
    high_positions = np.concatenate([np.arange(first[i], first[i] + n) for i, n in zip(layers, lengths)] or [np.zeros(0, np.int64)])
    coded_ks = [ks[i] for i in layers]
    high_start = np.repeat(np.asarray(Layout(lengths).offsets[:-1], dtype=np.int64), coded_ks)
    coded_entries = np.flatnonzero(is_coded_entry)
    return dict(high_base=high_base, high_shift=high_shift, coded_entries=coded_entries,
                high_positions=high_positions, high_start=high_start,
                high_end=high_start + np.repeat(np.asarray(lengths, dtype=np.int64), coded_ks),
                coded_rank=entry_in_layer[coded_entries], coded_shift=high_shift[coded_entries])


def add_high_parts(low: Tensor, stream: Tensor, plan: Dict[str, object]) -> Tensor:
    """The code's indices: ``low`` (``(W, total k)`` fixed-width fields) with the coded entries' high parts
    added, read from the set bits of ``stream`` (``(W, bits + 1)``, 0/1). Raises ValueError when a high bit
    vector does not hold one set bit per entry."""
    w = stream.shape[0]
    entries = plan["coded_entries"]
    high_bits = stream.index_select(1, plan["high_positions"])
    found = high_bits.nonzero()  # (n, 2), row by row, each row's set bits in order
    if found.shape[0] != w * entries.numel():
        raise ValueError(f"the top-k index code holds {found.shape[0]} set bits, expected {entries.numel()} per row")
    column = found[:, 1].view(w, -1)
    start, end = plan["high_start"], plan["high_end"]
    if bool(((column < start) | (column >= end)).any()):
        raise ValueError("the top-k index code of a layer holds another number of set bits than its kept entries")
    local = low.clone()
    local[:, entries] += (column - start - plan["coded_rank"]) << plan["coded_shift"]
    return local


def encode_coded(idx: Tensor, d: int) -> Tensor:
    """:func:`saef.compress.indexcode.encode` in torch, for any device: ``(W, k)`` sorted -> ``(W, bytes)``."""
    rows, k = idx.shape
    low = low_bits(d, k)
    bits = torch.zeros(rows, indexcode.coded_bits(d, k), dtype=torch.bool, device=idx.device)
    if low:
        shifts = torch.arange(low, device=idx.device)
        bits[:, : k * low] = ((idx.unsqueeze(-1) >> shifts) & 1).bool().view(rows, k * low)
    bits.scatter_(1, k * low + (idx >> low) + torch.arange(k, device=idx.device), True)
    return pack_bits(bits)


def decode_coded(packed: Tensor, d: int, k: int) -> Tensor:
    """Inverse of :func:`encode_coded`: ``(W, bytes)`` -> ``(W, k)`` int64, sorted. Raises ValueError when
    a row's high bit vector holds other than k set bits or an index falls beyond d."""
    rows = packed.shape[0]
    low = low_bits(d, k)
    bits = unpack_bits(packed, indexcode.coded_bits(d, k))
    found = bits[:, k * low :].nonzero()
    if found.shape[0] != rows * k or (rows > 1 and bool((found[:, 0].view(rows, k) != torch.arange(rows, device=packed.device).unsqueeze(1)).any())):
        raise ValueError(f"the top-k index code holds {found.shape[0]} set bits, expected {k} in each of {rows} row(s)")
    out = (found[:, 1].view(rows, k) - torch.arange(k, device=packed.device)) << low
    if low:
        weights = 1 << torch.arange(low, device=packed.device)
        out += (bits[:, : k * low].view(rows, k, low).long() * weights).sum(2)
    if bool((out >= d).any()):
        raise ValueError(f"the top-k index code holds an index beyond {d}")
    return out


def pack_section(idx: np.ndarray, d: int) -> np.ndarray:
    """A layer's index section with numpy: ``(W, k)`` (sorted where the layer is coded) -> ``(W, bytes)``."""
    k = idx.shape[1]
    if is_coded(d, k):
        return indexcode.encode(idx, d, check=False)
    b = index_bits(d)
    return pack_index_bits(idx, b) if k and b else np.zeros((idx.shape[0], 0), dtype=np.uint8)


def unpack_section(packed: np.ndarray, k: int, d: int) -> np.ndarray:
    """Inverse of :func:`pack_section`: ``(W, bytes)`` -> ``(W, k)`` int64; ValueError for an index beyond ``d``."""
    if is_coded(d, k):
        return indexcode.decode(packed, d, k)
    b = index_bits(d)
    if not b:
        return np.zeros((packed.shape[0], k), dtype=np.int64)
    idx = unpack_index_bits(packed, k, b)
    if idx.size and idx.max() >= d:
        raise ValueError(f"top-k payload holds an index beyond its layer size {d}")
    return idx
