"""The top-k compressor: keep the k = max(1, floor(rho d)) entries of largest magnitude, with their indices
packed in ceil(log2 d) bits each.

Its payload format and bit count are in the table of :mod:`saef.compress.base`; the kernels it runs (compiled,
numpy or torch) are in :mod:`saef.compress.kernels`.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import Compressor, Layout, Payload
from .kernels import (
    NativeLayers,
    cpu_empty,
    index_bits,
    largest,
    largest_array,
    native_ready,
    native_topk_decode,
    native_topk_encode,
    native_topk_indices,
    numpy_view,
    one_layer,
    pack_bits,
    pack_index_bits,
    unpack_bits,
    unpack_index_bits,
)

__all__ = ["TopK"]


# numpy packs indices one layer at a time; below this many kept entries in all, torch's few vectorised
# kernels over all layers cost less than a loop over the layers.
_NUMPY_INDICES_MIN = 1 << 12


class TopK(Compressor):
    """Top-k sparsification: keep the k = max(1, floor(rho * d)) entries of largest magnitude.

    Payload per row: the k kept values (dtype of ``v``) and their indices, each written in
    b = ceil(log2 d) bits and packed into bytes -- the explicit-index floor up to byte padding.
    delta = k / d: the kept entries are the largest, so they hold at least k/d of the squared norm.

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
        """Number of entries kept of ``d``. The tiny relative slack makes 0.3 * 10 count as 3."""
        if d == 0:
            return 0
        return min(d, max(1, math.floor(self.rho * d * (1 + 1e-12))))

    def _select(self, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """The kept values and their indices, both ``(W, k)``, chosen as the encoder chooses them."""
        d = rows.shape[1]
        kept = native_topk_encode(rows, k=self.k(d), indices=True) if d else None
        if kept is not None:
            return kept[0], kept[2]
        idx = largest(rows.abs(), self.k(d))
        return rows.gather(1, idx), idx

    def encode_rows(self, rows: Tensor) -> Payload:
        d = rows.shape[1]
        payload = native_topk_encode(rows, k=self.k(d)) if d else None  # one compiled pass, where it is built
        if payload is not None:
            return payload
        b, array = index_bits(d), numpy_view(rows) if rows.is_floating_point() and d else None
        if array is not None:  # all in numpy: a handful of calls, no torch dispatch per step
            idx = largest_array(np.abs(array), self.k(d))
            packed = pack_index_bits(idx, b) if b else np.zeros((rows.shape[0], 0), dtype=np.uint8)
            # one row: a plain take (take_along_axis builds index grids, ~20 µs at small sizes)
            values = np.take(array[0], idx[0])[None] if len(array) == 1 else np.take_along_axis(array, idx, axis=1)
            return torch.from_numpy(values), torch.from_numpy(packed)
        values, idx = self._select(rows)
        if b == 0:
            packed = torch.empty(rows.shape[0], 0, dtype=torch.uint8, device=rows.device)
        elif numpy_view(idx) is not None:
            packed = torch.from_numpy(pack_index_bits(idx.numpy(), b))
        else:
            shifts = torch.arange(b, device=rows.device)
            bits = ((idx.unsqueeze(-1) >> shifts) & 1).bool().view(rows.shape[0], -1)
            packed = pack_bits(bits)
        return values, packed

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        values, packed = payload
        rows, k = values.shape
        if native_ready() and values.is_cpu and k <= d:
            out = cpu_empty((rows, d), values.dtype)
            if native_topk_decode(values, packed, one_layer(d, k), out):
                return out
        b = index_bits(d)
        if b == 0:
            idx = torch.zeros(rows, k, dtype=torch.int64, device=values.device)
        elif native_ready() and packed.device.type == "cpu":
            idx = native_topk_indices(packed, one_layer(d, k))
        elif numpy_view(packed) is not None:
            idx = torch.from_numpy(unpack_index_bits(packed.numpy(), k, b))
        else:
            bits = unpack_bits(packed, k * b).view(rows, k, b).to(torch.int64)
            idx = (bits << torch.arange(b, device=values.device)).sum(dim=-1)
        out = torch.zeros(rows, d, dtype=values.dtype, device=values.device)
        return out.scatter_(1, idx, values)

    def compress_rows(self, rows: Tensor) -> Tensor:
        values, idx = self._select(rows)
        return torch.zeros_like(rows).scatter_(1, idx, values)

    def delta(self, d: int) -> float:
        return self.k(d) / d if d else 1.0

    # Vectorised over layers: layers of equal size share one topk call, and the indices of all layers
    # are packed (and unpacked) by a few kernels with precomputed bit positions. The payloads are those
    # of encode_rows, layer by layer.
    def _plan(self, layout: Layout, device: torch.device) -> Dict[str, object]:
        return layout.memo(("topk-plan", type(self), self.rho, device), lambda: self._make_plan(layout, device))

    def _make_plan(self, layout: Layout, device: torch.device) -> Dict[str, object]:
        sizes, offsets = layout.sizes, layout.offsets
        ks = [self.k(d) for d in sizes]
        bits = [index_bits(d) for d in sizes]
        groups: Dict[int, List[int]] = {}
        for i, d in enumerate(sizes):
            groups.setdefault(d, []).append(i)
        group_plan = []
        for d, members in groups.items():
            gather = None
            if len(members) > 1:
                gather = torch.cat([torch.arange(offsets[i], offsets[i] + d) for i in members]).to(device)
            group_plan.append((d, members, gather))
        # Where layer i's kept entries sit in the concatenation of all layers' kept entries (layer order).
        starts = Layout(ks).offsets
        total_k = starts[-1]
        width = max(bits) if bits else 0
        byte_start = Layout([-(-k * b // 8) for k, b in zip(ks, bits)]).offsets
        total_bits = 8 * byte_start[-1]
        # Bit j of kept entry e of layer i lies at 8 * byte_start[i] + e * b_i + j of the packed stream.
        # source: for each stream bit, which (entry, j) of the (total_k, width) bit table it copies, or the
        # filler (an extra zero at the end); position: the inverse, for unpacking (filler for j >= b_i).
        filler_source = total_k * width
        source = torch.full((total_bits,), filler_source, dtype=torch.int64)
        position = torch.full((total_k, max(width, 1)), total_bits, dtype=torch.int64)
        layer_offset = torch.empty(total_k, dtype=torch.int64)
        for i, (k, b) in enumerate(zip(ks, bits)):
            layer_offset[starts[i] : starts[i + 1]] = offsets[i]
            if k == 0 or b == 0:
                continue
            entries = torch.arange(starts[i], starts[i + 1]).unsqueeze(1)
            js = torch.arange(b).unsqueeze(0)
            stream = 8 * byte_start[i] + (entries - starts[i]) * b + js
            source[stream.reshape(-1)] = (entries * width + js).reshape(-1)
            position[starts[i] : starts[i + 1], :b] = stream
        return dict(ks=ks, bits=bits, starts=starts, byte_start=byte_start, width=width, groups=group_plan,
                    source=source.to(device), position=position.to(device), layer_offset=layer_offset.to(device),
                    shifts=torch.arange(max(width, 1), dtype=torch.int64, device=device))

    def _native_layers(self, layout: Layout) -> NativeLayers:
        return layout.memo(("native-topk", type(self), self.rho), lambda: NativeLayers(layout.sizes, [self.k(d) for d in layout.sizes]))

    def encode_layers(self, rows: Tensor, layout: Layout) -> List[Payload]:
        layers = self._native_layers(layout)
        payload = native_topk_encode(rows, layers)
        if payload is not None:  # one compiled pass over all layers
            values, packed = payload
            v, b = layers.value_starts, layers.byte_starts
            return [(values[:, v[i] : v[i + 1]], packed[:, b[i] : b[i + 1]]) for i in range(len(layout))]
        if any(d == 0 for d in layout.sizes):
            return super().encode_layers(rows, layout)
        plan = self._plan(layout, rows.device)
        w = rows.shape[0]
        array = numpy_view(rows) if rows.is_floating_point() else None
        if array is not None:  # |v| into a buffer kept by the layout (a fresh one costs page faults)
            buffer = layout.memo(("topk-magnitude", array.shape, array.dtype), lambda: np.empty_like(array))
            magnitude = torch.from_numpy(np.abs(array, out=buffer))
        else:
            magnitude = rows.abs()
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
        local_all = torch.cat(local, dim=1)  # (W, total_k), layer order
        values = rows.gather(1, local_all + plan["layer_offset"])
        width = plan["width"]
        if width and array is not None and local_all.numel() >= _NUMPY_INDICES_MIN:
            packed = torch.from_numpy(self._pack_indices(local_all.numpy(), plan))
        elif width:
            table = ((local_all.unsqueeze(-1) >> plan["shifts"]) & 1).to(torch.uint8).view(w, -1)
            table = torch.cat([table, table.new_zeros(w, 1)], dim=1)  # the filler bit
            packed = pack_bits(table.index_select(1, plan["source"]).view(torch.bool))
        else:
            packed = rows.new_empty(w, 0, dtype=torch.uint8)
        starts, byte_start = plan["starts"], plan["byte_start"]
        return [(values[:, starts[i] : starts[i + 1]], packed[:, byte_start[i] : byte_start[i + 1]]) for i in range(len(layout))]

    # On the CPU the layers' indices are packed and unpacked with numpy, one layer at a time.
    @staticmethod
    def _pack_indices(local: np.ndarray, plan: Dict[str, object]) -> np.ndarray:
        """``(W, total k)`` layer-local indices -> ``(W, bytes)``, the stream of encode_rows, layer after layer."""
        starts = plan["starts"]
        parts = [pack_index_bits(local[:, starts[i] : starts[i + 1]], b) for i, (k, b) in enumerate(zip(plan["ks"], plan["bits"])) if k and b]
        return np.concatenate(parts, axis=1) if parts else np.zeros((local.shape[0], 0), dtype=np.uint8)

    @staticmethod
    def _unpack_indices(packed: np.ndarray, plan: Dict[str, object]) -> np.ndarray:
        """Inverse of :meth:`_pack_indices`: ``(W, bytes)`` -> ``(W, total k)`` int64 layer-local indices."""
        starts, byte_start = plan["starts"], plan["byte_start"]
        local = np.zeros((packed.shape[0], starts[-1]), dtype=np.int64)
        for i, (k, b) in enumerate(zip(plan["ks"], plan["bits"])):
            if k and b:
                local[:, starts[i] : starts[i + 1]] = unpack_index_bits(packed[:, byte_start[i] : byte_start[i + 1]], k, b)
        return local

    def _kept(self, payloads: Sequence[Payload], layout: Layout) -> Tuple[Tensor, Tensor]:
        """All layers' kept values and their positions on the flat axis, both ``(W, total k)``."""
        plan = self._plan(layout, payloads[0][0].device)
        values = torch.cat([p[0] for p in payloads], dim=1)
        w = values.shape[0]
        if plan["width"] and native_ready() and payloads[0][1].device.type == "cpu":
            packed = torch.cat([p[1] for p in payloads], dim=1)
            local = native_topk_indices(packed, self._native_layers(layout))
        elif plan["width"] and numpy_view(payloads[0][1]) is not None and values.numel() >= _NUMPY_INDICES_MIN:
            packed = torch.cat([p[1] for p in payloads], dim=1)
            local = torch.from_numpy(self._unpack_indices(packed.numpy(), plan))
        elif plan["width"]:
            packed = torch.cat([p[1] for p in payloads], dim=1)
            stream = unpack_bits(packed, packed.shape[1] * 8).to(torch.int64)
            stream = torch.cat([stream, stream.new_zeros(w, 1)], dim=1)  # the filler bit reads 0
            bits = stream.index_select(1, plan["position"].view(-1)).view(w, -1, plan["position"].shape[1])
            local = (bits << plan["shifts"]).sum(dim=2)
        else:
            local = torch.zeros_like(values, dtype=torch.int64)
        return values, local + plan["layer_offset"]

    def _native_decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str, divisor: int = 1):
        """The compiled decoder writing into (a fresh ``(W, P)`` tensor if ``out`` is None), subtracting
        from or adding to ``out``; returns the tensor written, or None if the compiled kernels cannot."""
        if not native_ready() or not payloads or not payloads[0][0].is_cpu:
            return None
        values = torch.cat([p[0] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][0]
        packed = torch.cat([p[1] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][1]
        if out is None:
            out = cpu_empty((values.shape[0], layout.total), values.dtype)
        return out if native_topk_decode(values, packed, self._native_layers(layout), out, mode, divisor) else None

    def decode_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        written = self._native_decode(payloads, layout, None, "write")
        if written is not None:
            return written
        if any(d == 0 for d in layout.sizes):
            return super().decode_layers(payloads, layout)
        values, index = self._kept(payloads, layout)
        return values.new_zeros(values.shape[0], layout.total).scatter_(1, index, values)

    def decode_layers_into(self, payloads: Sequence[Payload], layout: Layout, out: Tensor) -> Tensor:
        if self._native_decode(payloads, layout, out, "write") is not None:
            return out
        if any(d == 0 for d in layout.sizes):
            return super().decode_layers_into(payloads, layout, out)
        values, index = self._kept(payloads, layout)
        return out.zero_().scatter_(1, index, values)

    def subtract_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor) -> Tensor:
        """Only the kept entries change (t + (-v) is t - v exactly): no dense decode."""
        return self._combine(payloads, layout, target, "subtract")

    def add_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor) -> Tensor:
        """Only the kept entries change: no dense decode."""
        return self._combine(payloads, layout, target, "add")

    def _combine(self, payloads: Sequence[Payload], layout: Layout, target: Tensor, mode: str) -> Tensor:
        if self._native_decode(payloads, layout, target, mode) is not None:
            return target
        if any(d == 0 for d in layout.sizes):
            dense = self.decode_layers(payloads, layout)
            return target.sub_(dense) if mode == "subtract" else target.add_(dense)
        values, index = self._kept(payloads, layout)
        return target.scatter_add_(1, index, values.neg() if mode == "subtract" else values)

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        """The rows' kept values added into one dense row, divided by W: no ``(W, P)`` buffer. Equal to
        ``decode_layers(...).mean(0)`` up to rounding (the order of the additions differs). The result
        lives in a buffer kept by ``layout``: it is valid until the next call with the same layout."""
        if any(d == 0 for d in layout.sizes) or payloads[0][0].device.type != "cpu":
            # (scatter_add_ on a GPU adds in no fixed order; the dense mean is deterministic)
            return super().decode_mean_layers(payloads, layout)
        dtype = payloads[0][0].dtype
        total = layout.memo(("topk-mean-buffer", dtype), lambda: torch.empty(layout.total, dtype=dtype))
        if self._native_decode(payloads, layout, total.zero_(), "add", payloads[0][0].shape[0]) is not None:
            return total  # the compiled decoder adds the rows in the same order as the scatter below
        values, index = self._kept(payloads, layout)
        # each value divided by W before adding: k values per row instead of P (exact when W is a power of 2)
        return total.zero_().scatter_add_(0, index.view(-1), values.view(-1) / values.shape[0])

    def __repr__(self) -> str:
        return f"TopK(rho={self.rho!r})"
