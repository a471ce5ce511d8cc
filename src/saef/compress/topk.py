"""The top-k compressor: keep the k = max(1, floor(rho d)) entries of largest magnitude, with their indices
coded near their information content (Elias-Fano, :mod:`saef.compress.indexcode`) or, where that is not
shorter, packed in ceil(log2 d) bits each.

Its payload format and bit count are in the table of :mod:`saef.compress.base`; the kernels it runs (compiled,
numpy or torch) are below, over the helpers of :mod:`saef.compress.kernels`, and where its indices go in a
payload (the index plan and section packers) is :mod:`saef.compress.topk_index`.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import DecodesInPlace, Layout, Payload, kept_count, mean_of_rows
from .indexcode import is_coded
from .kernels import (
    KernelSet,
    NativeLayers,
    cpu_empty,
    index_bits,
    largest,
    largest_array,
    native_topk_decode,
    native_topk_encode,
    native_topk_indices,
    numpy_view,
    one_layer,
)
from .packing import pack_bits, pack_fixed, unpack_bits, unpack_fixed
from .topk_index import add_high_parts, decode_coded, encode_coded, index_plan, pack_section, unpack_section

__all__ = ["TopK"]


# numpy packs indices one layer at a time; below this many kept entries in all, torch's few vectorised
# kernels over all layers cost less than a loop over the layers.
_NUMPY_INDICES_MIN = 1 << 12


class TopK(DecodesInPlace):
    """Top-k sparsification: keep the k = max(1, floor(rho * d)) entries of largest magnitude.

    Payload per row: the k kept values (dtype of ``v``), in index order, and their indices in the smaller
    of two formats (:func:`saef.compress.indexcode.is_coded`, decided by (d, k) alone): the Elias-Fano code
    (within 0.56 k bits of log2 C(d, k) where d / k is a power of two), or each index in b = ceil(log2 d)
    bits (smaller only for layers of a few elements). Either is padded to whole bytes.
    delta = k / d: the kept entries are the largest, so they hold at least k/d of the squared norm.
    The work is done by the kernels of the tensor's path (:func:`saef.compress.kernels.path`): torch,
    numpy or compiled, below.

    Args:
        rho: fraction of entries kept, in (0, 1].
    """

    def __init__(self, rho: float):
        rho = float(rho)
        if not (0.0 < rho <= 1.0):  # also rejects NaN
            raise ValueError(f"topk: rho must be in (0, 1], got rho={rho!r}")
        if rho == 1.0:
            warnings.warn("topk:1 keeps every entry: it sends more than identity (values and indices)", stacklevel=3)
        self.rho = rho
        self.name = f"topk:{rho:g}"

    def k(self, d: int) -> int:
        """Number of entries kept of ``d`` (:func:`~saef.compress.base.kept_count`)."""
        return kept_count(self.rho, d)

    def encode_rows(self, rows: Tensor) -> Payload:
        return _KERNELS(rows).encode_rows(self, rows)

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        return _KERNELS(payload[0]).decode_rows(payload[0], payload[1], d)

    def select(self, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """The kept values and their indices, both ``(W, k)``, chosen as the encoder chooses them."""
        return _KERNELS(rows).select(self, rows)

    def compress_rows(self, rows: Tensor) -> Tensor:
        values, idx = self.select(rows)
        return torch.zeros_like(rows).scatter_(1, idx, values)

    def delta(self, d: int) -> float:
        return self.k(d) / d if d else 1.0

    # Vectorised over layers: layers of equal size share one selection, and the indices of all layers are
    # packed (and unpacked) by a few kernels with precomputed bit positions. The payloads are those of
    # encode_rows, layer by layer.
    def encode_layers(self, rows: Tensor, layout: Layout, context=None) -> List[Payload]:
        encoded = _KERNELS(rows).encode_layers(self, rows, layout)
        if encoded is None:  # a layer of no elements: one layer at a time
            return super().encode_layers(rows, layout)
        values, packed = encoded
        layers = self.native_layers(layout)
        v, b = layers.value_starts, layers.byte_starts
        return [(values[:, v[i] : v[i + 1]], packed[:, b[i] : b[i + 1]]) for i in range(len(layout))]

    def native_layers(self, layout: Layout) -> NativeLayers:
        """Layer sizes and kept counts as the compiled kernels read them (and where each layer's values and
        index bytes start in a payload row)."""
        return layout.memo(("native-topk", type(self), self.rho), lambda: NativeLayers(layout.sizes, [self.k(d) for d in layout.sizes]))

    def _decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor = None, mode: str = "write") -> Tensor:
        return _KERNELS(payloads[0][0]).decode(self, payloads, layout, out, mode)

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout, context=None) -> Tensor:
        """The rows' kept values added into one dense row, divided by W: no ``(W, P)`` buffer. Equal to
        ``decode_layers(...).mean(0)`` up to rounding (the order of the additions differs). The result
        lives in a buffer kept by ``layout``: it is valid until the next call with the same layout."""
        return _KERNELS(payloads[0][0]).mean(self, payloads, layout)

    def __repr__(self) -> str:
        return f"TopK(rho={self.rho!r})"


class TorchTopKKernels:
    """The top-k kernels in torch, on any device (the helpers of :mod:`.kernels` take numpy's faster route
    themselves where the tensor allows it)."""

    def select(self, topk: TopK, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """The kept values and their indices, both ``(W, k)``, chosen as the encoder chooses them."""
        idx = largest(rows.abs(), topk.k(rows.shape[1]))
        return rows.gather(1, idx), idx

    def encode_rows(self, topk: TopK, rows: Tensor) -> Payload:
        values, idx = self.select(topk, rows)
        idx, order = idx.sort(dim=1)  # every path writes the kept entries in index order (as the code needs)
        return values.gather(1, order), self._pack_row(idx, rows.shape[1])

    @staticmethod
    def _pack_row(idx: Tensor, d: int) -> Tensor:
        """``(W, k)`` indices (sorted, where the layer is coded) -> their index section, ``(W, bytes)``."""
        k = idx.shape[1]
        if is_coded(d, k):
            return encode_coded(idx, d)
        return pack_fixed(idx, index_bits(d)) if index_bits(d) else idx.new_empty(idx.shape[0], 0, dtype=torch.uint8)

    def decode_rows(self, values: Tensor, packed: Tensor, d: int) -> Tensor:
        rows, k = values.shape
        idx = self._unpack_row(packed, k, d)
        return torch.zeros(rows, d, dtype=values.dtype, device=values.device).scatter_(1, idx, values)

    @staticmethod
    def _unpack_row(packed: Tensor, k: int, d: int) -> Tensor:
        if is_coded(d, k):
            return decode_coded(packed, d, k)
        if index_bits(d) == 0:
            return torch.zeros(packed.shape[0], k, dtype=torch.int64, device=packed.device)
        return unpack_fixed(packed, k, index_bits(d))

    def encode_layers(self, topk: TopK, rows: Tensor, layout: Layout):
        """All layers' kept values ``(W, total k)`` and packed indices ``(W, bytes)``, layer after layer, or
        None when a layer is empty."""
        if any(d == 0 for d in layout.sizes):
            return None
        plan = index_plan(topk, layout, rows.device)
        w = rows.shape[0]
        magnitude = self._magnitude(rows, layout)
        local: List[Tensor] = [None] * len(layout)  # per layer, (W, k) indices within the layer
        for d, members, gather in plan["groups"]:
            k = plan["ks"][members[0]]
            if gather is None:
                i = members[0]
                local[i] = largest(magnitude[:, layout.slices[i]], k)
                continue
            picked = largest(magnitude.index_select(1, gather).view(w * len(members), d), k).view(w, len(members), k)
            for j, i in enumerate(members):
                local[i] = picked[:, j]
        # positions on the row, sorted: each layer's entries stay in its own span, in index order (as the
        # code writes them)
        flat = (torch.cat(local, dim=1) + plan["layer_offset"]).sort(dim=1).values
        values = rows.gather(1, flat)
        if not plan["width"] and not plan["coded"]:
            return values, rows.new_empty(w, 0, dtype=torch.uint8)
        return values, self._pack_layers(flat - plan["layer_offset"], plan)

    @staticmethod
    def _magnitude(rows: Tensor, layout: Layout) -> Tensor:
        return rows.abs()

    @staticmethod
    def _pack_layers(local: Tensor, plan: Dict[str, object]) -> Tensor:
        """``(W, total k)`` layer-local indices (sorted within coded layers) -> ``(W, bytes)`` through
        precomputed bit positions: the fixed-width fields (explicit indices, or the code's low bits) copied
        from a bit table, then the code's high bits set."""
        w = local.shape[0]
        table = ((local.unsqueeze(-1) >> plan["shifts"]) & 1).to(torch.uint8).view(w, -1)
        table = torch.cat([table, table.new_zeros(w, 1)], dim=1)  # the filler bit
        stream = torch.cat([table.index_select(1, plan["source"]), table.new_zeros(w, 1)], dim=1)
        if plan["coded"]:  # entries of explicit layers mark the extra column, dropped below
            stream.scatter_(1, plan["high_base"] + (local >> plan["high_shift"]), 1)
        return pack_bits(stream[:, :-1].view(torch.bool))

    def kept(self, topk: TopK, payloads: Sequence[Payload], layout: Layout) -> Tuple[Tensor, Tensor]:
        """All layers' kept values and their positions on the flat axis, both ``(W, total k)``."""
        plan = index_plan(topk, layout, payloads[0][0].device)
        values = torch.cat([p[0] for p in payloads], dim=1)
        if plan["width"] or plan["coded"]:
            local = self._unpack_layers(torch.cat([p[1] for p in payloads], dim=1), topk, layout, plan)
        else:
            local = torch.zeros_like(values, dtype=torch.int64)
        return values, local + plan["layer_offset"]

    @staticmethod
    def _unpack_layers(packed: Tensor, topk: TopK, layout: Layout, plan: Dict[str, object]) -> Tensor:
        w = packed.shape[0]
        stream = unpack_bits(packed, packed.shape[1] * 8).to(torch.int64)
        stream = torch.cat([stream, stream.new_zeros(w, 1)], dim=1)  # the filler bit reads 0
        bits = stream.index_select(1, plan["position"].view(-1)).view(w, -1, plan["position"].shape[1])
        local = (bits << plan["shifts"]).sum(dim=2)
        if plan["coded"]:
            local = add_high_parts(local, stream, plan)
        if bool((local >= plan["layer_size"]).any()):
            raise ValueError("top-k payload holds an index beyond its layer size")
        return local

    def decode(self, topk: TopK, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str) -> Tensor:
        """Write (into ``out``, or a fresh tensor), subtract from or add to ``out`` the decoded payloads."""
        if any(d == 0 for d in layout.sizes):  # a layer of no elements: one layer at a time
            dense = torch.cat([self.decode_rows(p[0], p[1], d) for p, d in zip(payloads, layout.sizes)], dim=1)
            if mode == "write":
                return dense if out is None else out.copy_(dense)
            return out.sub_(dense) if mode == "subtract" else out.add_(dense)
        values, index = self.kept(topk, payloads, layout)
        if mode == "write":
            out = values.new_zeros(values.shape[0], layout.total) if out is None else out.zero_()
            return out.scatter_(1, index, values)
        return out.scatter_add_(1, index, values.neg() if mode == "subtract" else values)

    def mean(self, topk: TopK, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        if any(d == 0 for d in layout.sizes) or payloads[0][0].device.type != "cpu":
            # (scatter_add_ on a GPU adds in no fixed order; the dense mean is deterministic)
            return mean_of_rows(self.decode(topk, payloads, layout, None, "write"))
        dtype = payloads[0][0].dtype
        total = layout.memo(("topk-mean-buffer", dtype), lambda: torch.empty(layout.total, dtype=dtype))
        values, index = self.kept(topk, payloads, layout)
        # each value divided by W before adding: k values per row instead of P (exact when W is a power of 2)
        return total.zero_().scatter_add_(0, index.view(-1), values.view(-1) / values.shape[0])


class NumpyTopKKernels(TorchTopKKernels):
    """On the CPU without the compiled module: selection, gathering and index packing in numpy where it is
    faster (long rows; many kept entries)."""

    def encode_rows(self, topk: TopK, rows: Tensor) -> Payload:
        d = rows.shape[1]
        array = numpy_view(rows) if rows.is_floating_point() and d else None
        if array is None:
            return super().encode_rows(topk, rows)
        k = topk.k(d)  # all in numpy: a handful of calls, no torch dispatch per step
        idx = np.sort(largest_array(np.abs(array), k), axis=1)  # in index order, as on every path
        packed = pack_section(idx, d)
        # one row: a plain take (take_along_axis builds index grids, ~20 µs at small sizes)
        values = np.take(array[0], idx[0])[None] if len(array) == 1 else np.take_along_axis(array, idx, axis=1)
        return torch.from_numpy(values), torch.from_numpy(packed)

    @staticmethod
    def _pack_row(idx: Tensor, d: int) -> Tensor:
        if numpy_view(idx) is None:
            return TorchTopKKernels._pack_row(idx, d)
        return torch.from_numpy(pack_section(idx.numpy(), d))

    @staticmethod
    def _unpack_row(packed: Tensor, k: int, d: int) -> Tensor:
        if numpy_view(packed) is None:
            return TorchTopKKernels._unpack_row(packed, k, d)
        return torch.from_numpy(unpack_section(packed.numpy(), k, d))

    @staticmethod
    def _magnitude(rows: Tensor, layout: Layout) -> Tensor:
        array = numpy_view(rows) if rows.is_floating_point() else None
        if array is None:
            return rows.abs()
        # |v| into a buffer kept by the layout (a fresh one costs page faults)
        buffer = layout.memo(("topk-magnitude", array.shape, array.dtype), lambda: np.empty_like(array))
        return torch.from_numpy(np.abs(array, out=buffer))

    @staticmethod
    def _pack_layers(local: Tensor, plan: Dict[str, object]) -> Tensor:
        # numpy packs one layer at a time: worth it only with many kept entries in all
        if local.numel() < _NUMPY_INDICES_MIN or numpy_view(local) is None:
            return TorchTopKKernels._pack_layers(local, plan)
        starts, array = plan["starts"], local.numpy()
        parts = [pack_section(array[:, starts[i] : starts[i + 1]], d) for i, d in enumerate(plan["sizes"])]
        return torch.from_numpy(np.concatenate(parts, axis=1) if parts else np.zeros((array.shape[0], 0), dtype=np.uint8))

    @staticmethod
    def _unpack_layers(packed: Tensor, topk: TopK, layout: Layout, plan: Dict[str, object]) -> Tensor:
        if numpy_view(packed) is None or packed.shape[0] * plan["starts"][-1] < _NUMPY_INDICES_MIN:
            return TorchTopKKernels._unpack_layers(packed, topk, layout, plan)
        starts, byte_start, array = plan["starts"], plan["byte_start"], packed.numpy()
        local = np.zeros((array.shape[0], starts[-1]), dtype=np.int64)
        for i, (k, d) in enumerate(zip(plan["ks"], plan["sizes"])):
            if k:
                local[:, starts[i] : starts[i + 1]] = unpack_section(array[:, byte_start[i] : byte_start[i + 1]], k, d)
        return torch.from_numpy(local)


class NativeTopKKernels(NumpyTopKKernels):
    """The compiled one-pass encoders and decoders; inputs they cannot read go to the numpy kernels."""

    def select(self, topk: TopK, rows: Tensor) -> Tuple[Tensor, Tensor]:
        d = rows.shape[1]
        kept = native_topk_encode(rows, k=topk.k(d), indices=True) if d else None
        return (kept[0], kept[2]) if kept is not None else super().select(topk, rows)

    def encode_rows(self, topk: TopK, rows: Tensor) -> Payload:
        d = rows.shape[1]
        payload = native_topk_encode(rows, k=topk.k(d)) if d else None
        return payload if payload is not None else super().encode_rows(topk, rows)

    def decode_rows(self, values: Tensor, packed: Tensor, d: int) -> Tensor:
        rows, k = values.shape
        if k <= d:
            out = cpu_empty((rows, d), values.dtype)
            if native_topk_decode(values, packed, one_layer(d, k), out):
                return out
        return super().decode_rows(values, packed, d)

    @staticmethod
    def _unpack_row(packed: Tensor, k: int, d: int) -> Tensor:
        return native_topk_indices(packed, one_layer(d, k))

    def encode_layers(self, topk: TopK, rows: Tensor, layout: Layout):
        payload = native_topk_encode(rows, topk.native_layers(layout))
        return payload if payload is not None else super().encode_layers(topk, rows, layout)

    @staticmethod
    def _unpack_layers(packed: Tensor, topk: TopK, layout: Layout, plan: Dict[str, object]) -> Tensor:
        return native_topk_indices(packed, topk.native_layers(layout))

    def decode(self, topk: TopK, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str) -> Tensor:
        written = self._native(topk, payloads, layout, out, mode)
        return written if written is not None else super().decode(topk, payloads, layout, out, mode)

    def mean(self, topk: TopK, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        if any(d == 0 for d in layout.sizes):
            return super().mean(topk, payloads, layout)
        dtype = payloads[0][0].dtype
        total = layout.memo(("topk-mean-buffer", dtype), lambda: torch.empty(layout.total, dtype=dtype))
        # the compiled decoder adds the rows in the same order as the scatter of the numpy kernels
        written = self._native(topk, payloads, layout, total.zero_(), "add", payloads[0][0].shape[0])
        return written if written is not None else super().mean(topk, payloads, layout)

    @staticmethod
    def _native(topk: TopK, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str, divisor: int = 1):
        """The compiled decoder writing into (a fresh ``(W, P)`` tensor if ``out`` is None), subtracting
        from or adding to ``out``; returns the tensor written, or None if it cannot."""
        values = torch.cat([p[0] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][0]
        packed = torch.cat([p[1] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][1]
        if out is None:
            out = cpu_empty((values.shape[0], layout.total), values.dtype)
        return out if native_topk_decode(values, packed, topk.native_layers(layout), out, mode, divisor) else None


_KERNELS = KernelSet(TorchTopKKernels(), NumpyTopKKernels(), NativeTopKKernels())
