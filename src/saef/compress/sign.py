"""The scaled-sign compressor: C(v) = (||v||_1 / d) sign(v), one bit per entry and one scale per tensor.

Its payload format and bit count are in the table of :mod:`saef.compress.base`; the kernels it runs (compiled,
numpy or torch) are in :mod:`saef.compress.kernels`.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .base import Compressor, Layout, Payload
from .kernels import (
    NativeLayers,
    cpu_empty,
    l1_norms,
    l1_norms_array,
    native_ready,
    native_sign_decode,
    native_sign_encode,
    numpy_view,
    one_layer,
    pack_bits,
    pack_nonnegative,
    pack_nonnegative_array,
    sign_lookup,
)

__all__ = ["ScaledSign"]


class ScaledSign(Compressor):
    """Scaled sign: C(v) = (||v||_1 / d) * sign(v) with sign(0) := +1 so that every sign is one bit.

    Payload per row: the signs packed 8 per byte (uint8) and one scale in the dtype of ``v``.
    delta = 1 / d: ||C(v) - v||^2 = ||v||^2 - ||v||_1^2 / d <= (1 - 1/d) ||v||^2.
    """

    name = "sign"

    def _scale(self, rows: Tensor) -> Tensor:
        # ||v||_1 / d. An empty tensor gets scale 0 (nothing to scale; the mean of nothing would be NaN).
        return l1_norms(rows, divide_by=max(rows.shape[1], 1))

    def encode_rows(self, rows: Tensor) -> Payload:
        payload = native_sign_encode(rows)  # one compiled pass, where it is built
        if payload is not None:
            return payload
        array = numpy_view(rows) if rows.is_floating_point() else None
        if array is not None:  # all in numpy (at small sizes the per-call cost of torch dominates)
            packed = pack_nonnegative_array(array)
            return torch.from_numpy(packed), torch.from_numpy(l1_norms_array(array, max(array.shape[1], 1)))
        return pack_bits(rows >= 0), self._scale(rows)

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        packed, scale = payload
        if native_ready() and scale.is_cpu:
            out = cpu_empty((packed.shape[0], d), scale.dtype)
            if native_sign_decode(packed, scale, one_layer(d), out):
                return out
        return sign_lookup(packed, scale.unsqueeze(1), 0)[:, :d]

    def compress_rows(self, rows: Tensor) -> Tensor:
        # the encoder's own scale, so that C(v) is exactly decode(encode(v)) whichever kernel summed |v|
        scale = self.encode_rows(rows)[1].unsqueeze(1)
        return torch.where(rows >= 0, scale, -scale)

    def delta(self, d: int) -> float:
        return 1.0 / d if d else 1.0

    # Vectorised over layers: the same payloads, made with a handful of kernels instead of a dozen per
    # layer (the simulator's step is dominated by per-layer kernel launches otherwise).
    def _padded_index(self, layout: Layout) -> Tensor:
        """Position of each element in the concatenation of layers each padded to a multiple of 8."""
        padded = Layout([8 * -(-d // 8) for d in layout.sizes]).offsets
        return torch.cat([torch.arange(d) + start for d, start in zip(layout.sizes, padded)])

    def _source_index(self, layout: Layout) -> Tensor:
        """For each position of the byte-aligned layers, the element it holds, or P (a filler) for padding."""
        nbits = 8 * sum(-(-d // 8) for d in layout.sizes)
        source = torch.full((nbits,), layout.total, dtype=torch.int64)
        source[self._padded_index(layout)] = torch.arange(layout.total)
        return source

    def _layer_scales(self, rows: Tensor, layout: Layout) -> Tensor:
        """(W, layers): ||v||_1 / d of every layer of every row."""
        if rows.numel() <= 1 << 20 and rows.device.type == "cpu":  # small: one kernel beats a loop of launches
            # (CPU only: index_add_ on a GPU adds in no fixed order, and runs must be bit-identical)
            layer = layout.cached("layer-of-element", rows.device, lambda: torch.repeat_interleave(
                torch.arange(len(layout)), torch.tensor(layout.sizes)))
            sums = rows.new_zeros(rows.shape[0], len(layout)).index_add_(1, layer, rows.abs())
        else:  # large: a plain reduction per layer streams the memory once (index_add does not)
            sums = torch.stack([l1_norms(rows[:, s]) for s in layout.slices], dim=1)
        return sums / layout.cached("lengths", rows.device, lambda: torch.tensor(layout.sizes)).to(rows.dtype)

    def encode_layers(self, rows: Tensor, layout: Layout) -> List[Payload]:
        nbytes = [-(-d // 8) for d in layout.sizes]
        payload = native_sign_encode(rows, layout.memo(("native-layers",), lambda: NativeLayers(layout.sizes)))
        if payload is not None:  # one compiled pass over all layers
            packed, scales = payload
        elif any(d == 0 for d in layout.sizes):
            return super().encode_layers(rows, layout)
        else:
            packed, scales = self._pack_layers(rows, layout)
        out, start = [], 0
        for i, n in enumerate(nbytes):
            out.append((packed[:, start : start + n], scales[:, i]))
            start += n
        return out

    def _pack_layers(self, rows: Tensor, layout: Layout) -> Tuple[Tensor, Tensor]:
        """The packed signs ``(W, bytes)`` (each layer from a byte boundary) and scales ``(W, layers)``."""
        scales = self._layer_scales(rows, layout)
        if all(d % 8 == 0 for d in layout.sizes[:-1]):  # layers already byte-aligned: pack in one go
            packed = pack_nonnegative(rows, layout.memo)
        else:  # move each layer to a byte boundary first; the filler -1 packs as bit 0
            source = layout.cached("sign-source", rows.device, lambda: self._source_index(layout))
            padded = torch.cat([rows, rows.new_full((rows.shape[0], 1), -1.0)], dim=1).index_select(1, source)
            packed = pack_nonnegative(padded, layout.memo)
        return packed, scales

    def _native_decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str, divisor: int = 1):
        """The compiled decoder writing into (a fresh ``(W, P)`` tensor if ``out`` is None), subtracting
        from or adding to ``out``; returns the tensor written, or None if the compiled kernels cannot."""
        if not native_ready() or not payloads or not payloads[0][1].is_cpu:
            return None
        packed = torch.cat([p[0] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][0]
        scales = torch.stack([p[1] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][1]
        if out is None:
            out = cpu_empty((packed.shape[0], layout.total), scales.dtype)
        layers = layout.memo(("native-layers",), lambda: NativeLayers(layout.sizes))
        return out if native_sign_decode(packed, scales, layers, out, mode, divisor) else None

    def _decode_layers(self, payloads: Sequence[Payload], layout: Layout, out: Tensor = None) -> Tensor:
        """A lookup table per (row, layer) maps each byte straight to its 8 values +-scale, so decoding is
        one gather that writes the output once (unpacking to booleans first took three passes). On the
        CPU the compiled decoder does the same in one pass."""
        written = self._native_decode(payloads, layout, out, "write")
        if written is not None:
            return written
        if any(d == 0 for d in layout.sizes):
            dense = super().decode_layers(payloads, layout)
            return dense if out is None else out.copy_(dense)
        device = payloads[0][0].device
        packed = torch.cat([p[0] for p in payloads], dim=1)  # (W, bytes)
        scales = torch.stack([p[1] for p in payloads], dim=1)  # (W, layers)
        table_of_byte = layout.cached("sign-table-of-byte", device, lambda: torch.repeat_interleave(
            torch.arange(len(layout.sizes)) * 256, torch.tensor([-(-d // 8) for d in layout.sizes])))
        if all(d % 8 == 0 for d in layout.sizes[:-1]):
            if out is not None:
                return sign_lookup(packed, scales, table_of_byte, out=out)
            return sign_lookup(packed, scales, table_of_byte)[:, : layout.total]
        values = sign_lookup(packed, scales, table_of_byte)
        padded = layout.cached("sign-padded", device, lambda: self._padded_index(layout))
        return values.index_select(1, padded) if out is None else torch.index_select(values, 1, padded, out=out)

    def decode_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        return self._decode_layers(payloads, layout)

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        """The rows decoded with their scales divided by W and added in row order, in buffers kept by
        ``layout``: no fresh ``(W, P)`` tensor per step. Equal to ``decode_layers(...).mean(0)`` up to
        rounding. The result lives in a buffer: it is valid until the next
        call with the same layout and number of rows."""
        rows = payloads[0][0].shape[0] if payloads else 0
        if rows and native_ready() and payloads[0][1].is_cpu:  # compiled: each row added onto one buffer
            dtype = payloads[0][1].dtype
            total = layout.memo(("sign-mean", dtype), lambda: torch.empty(layout.total, dtype=dtype)).zero_()
            if self._native_decode(payloads, layout, total, "add", rows) is not None:
                return total
        if rows < 2 or payloads[0][1].device.type != "cpu":
            return super().decode_mean_layers(payloads, layout)
        share = [(packed, scale / rows) for packed, scale in payloads]
        dtype = share[0][1].dtype
        decoded = layout.memo(("sign-mean-rows", rows, dtype), lambda: torch.empty(rows, layout.total, dtype=dtype))
        self._decode_layers(share, layout, out=decoded)
        # added up in place, row after row, element by element: the same value whichever layers are
        # averaged together (a sum over dim 0 promises no order, and was 2.5x slower on large rows)
        total = decoded[0]
        for r in range(1, rows):
            total.add_(decoded[r])
        return total

    def decode_layers_into(self, payloads: Sequence[Payload], layout: Layout, out: Tensor) -> Tensor:
        return self._decode_layers(payloads, layout, out)

    def subtract_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor) -> Tensor:
        return self._combine(payloads, layout, target, "subtract")

    def add_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor) -> Tensor:
        return self._combine(payloads, layout, target, "add")

    def _combine(self, payloads: Sequence[Payload], layout: Layout, target: Tensor, mode: str) -> Tensor:
        """``target -= decode`` or ``target += decode``: compiled in one pass, else through a reused buffer."""
        if self._native_decode(payloads, layout, target, mode) is not None:
            return target
        buffer = layout.memo(("sign-decoded", tuple(target.shape), target.dtype, target.device), lambda: torch.empty_like(target))
        decoded = self._decode_layers(payloads, layout, out=buffer)
        return target.sub_(decoded) if mode == "subtract" else target.add_(decoded)
