"""The scaled-sign compressor: C(v) = (||v||_1 / d) sign(v), one bit per entry and one scale per tensor.

Its payload format and bit count are in the table of :mod:`saef.compress.base`; the kernels it runs (compiled,
numpy or torch) are in :mod:`saef.compress.kernels`.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .base import DecodesInPlace, Layout, Payload, mean_of_rows
from .kernels import (
    KernelSet,
    NativeLayers,
    cpu_empty,
    l1_norms,
    l1_norms_array,
    native_sign_decode,
    native_sign_encode,
    numpy_view,
    one_layer,
)
from .packing import pack_bits, pack_nonnegative, pack_nonnegative_array, sign_lookup

__all__ = ["ScaledSign"]


class ScaledSign(DecodesInPlace):
    """Scaled sign: C(v) = (||v||_1 / d) * sign(v) with sign(0) := +1 so that every sign is one bit.

    Payload per row: the signs packed 8 per byte (uint8) and one scale in the dtype of ``v``.
    delta = 1 / d: ||C(v) - v||^2 = ||v||^2 - ||v||_1^2 / d <= (1 - 1/d) ||v||^2.

    The work is done by the kernels of the tensor's path (:func:`saef.compress.kernels.path`): torch, numpy
    or compiled, below.
    """

    name = "sign"

    def encode_rows(self, rows: Tensor) -> Payload:
        return _KERNELS(rows).encode_rows(rows)

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        return _KERNELS(payload[1]).decode_rows(payload[0], payload[1], d)

    def compress_rows(self, rows: Tensor) -> Tensor:
        # the encoder's own scale, so that C(v) is exactly decode(encode(v)) whichever kernel summed |v|
        scale = self.encode_rows(rows)[1].unsqueeze(1)
        return torch.where(rows >= 0, scale, -scale)

    def delta(self, d: int) -> float:
        return 1.0 / d if d else 1.0

    # Vectorised over layers: the same payloads, made with a handful of kernels instead of a dozen per
    # layer (the simulator's step is dominated by per-layer kernel launches otherwise).
    def encode_layers(self, rows: Tensor, layout: Layout, context=None) -> List[Payload]:
        encoded = _KERNELS(rows).encode_layers(rows, layout)
        if encoded is None:  # a layer of no elements: one layer at a time
            return super().encode_layers(rows, layout)
        packed, scales = encoded
        out, start = [], 0
        for i, d in enumerate(layout.sizes):
            n = -(-d // 8)
            out.append((packed[:, start : start + n], scales[:, i]))
            start += n
        return out

    def _decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor = None, mode: str = "write") -> Tensor:
        return _KERNELS(payloads[0][1]).decode(payloads, layout, out, mode)

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout, context=None) -> Tensor:
        """The rows decoded with their scales divided by W and added in row order, in buffers kept by
        ``layout``: no fresh ``(W, P)`` tensor per step. Equal to ``decode_layers(...).mean(0)`` up to
        rounding. The result lives in a buffer: it is valid until the next call with the same layout and
        number of rows."""
        if not payloads:
            return super().decode_mean_layers(payloads, layout)
        return _KERNELS(payloads[0][1]).mean(payloads, layout)


def _joined(payloads: Sequence[Payload]) -> Tuple[Tensor, Tensor]:
    """All layers' packed signs ``(W, bytes)`` and scales ``(W, layers)``, end to end."""
    packed = torch.cat([p[0] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][0]
    scales = torch.stack([p[1] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][1].unsqueeze(1)
    return packed, scales


class TorchSignKernels:
    """The scaled-sign kernels in torch, on any device (the helpers of :mod:`.kernels` take numpy's faster
    route themselves where the tensor allows it)."""

    def encode_rows(self, rows: Tensor) -> Payload:
        # ||v||_1 / d. An empty tensor gets scale 0 (nothing to scale; the mean of nothing would be NaN).
        return pack_bits(rows >= 0), l1_norms(rows, divide_by=max(rows.shape[1], 1))

    def decode_rows(self, packed: Tensor, scale: Tensor, d: int) -> Tensor:
        return sign_lookup(packed, scale.unsqueeze(1), 0)[:, :d]

    def encode_layers(self, rows: Tensor, layout: Layout):
        """The packed signs ``(W, bytes)`` (each layer from a byte boundary) and scales ``(W, layers)``, or
        None when a layer is empty."""
        if any(d == 0 for d in layout.sizes):
            return None
        scales = _layer_scales(rows, layout)
        if all(d % 8 == 0 for d in layout.sizes[:-1]):  # layers already byte-aligned: pack in one go
            packed = pack_nonnegative(rows, layout.memo)
        else:  # move each layer to a byte boundary first; the filler -1 packs as bit 0
            source = layout.cached("sign-source", rows.device, lambda: _source_index(layout))
            padded = torch.cat([rows, rows.new_full((rows.shape[0], 1), -1.0)], dim=1).index_select(1, source)
            packed = pack_nonnegative(padded, layout.memo)
        return packed, scales

    def decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str) -> Tensor:
        """Write (into ``out``, or a fresh tensor), subtract from or add to ``out`` the decoded payloads."""
        if mode == "write":
            return self._lookup(payloads, layout, out)
        buffer = layout.memo(("sign-decoded", tuple(out.shape), out.dtype, out.device), lambda: torch.empty_like(out))
        decoded = self._lookup(payloads, layout, buffer)
        return out.sub_(decoded) if mode == "subtract" else out.add_(decoded)

    def _lookup(self, payloads: Sequence[Payload], layout: Layout, out: Tensor = None) -> Tensor:
        """A lookup table per (row, layer) maps each byte straight to its 8 values +-scale, so decoding is
        one gather that writes the output once (unpacking to booleans first took three passes)."""
        if any(d == 0 for d in layout.sizes):  # a layer of no elements: one layer at a time
            dense = torch.cat([self.decode_rows(p[0], p[1], d) for p, d in zip(payloads, layout.sizes)], dim=1)
            return dense if out is None else out.copy_(dense)
        device = payloads[0][0].device
        packed, scales = _joined(payloads)
        table_of_byte = layout.cached("sign-table-of-byte", device, lambda: torch.repeat_interleave(
            torch.arange(len(layout.sizes)) * 256, torch.tensor([-(-d // 8) for d in layout.sizes])))
        if all(d % 8 == 0 for d in layout.sizes[:-1]):
            if out is not None:
                return sign_lookup(packed, scales, table_of_byte, out=out)
            return sign_lookup(packed, scales, table_of_byte)[:, : layout.total]
        values = sign_lookup(packed, scales, table_of_byte)
        padded = layout.cached("sign-padded", device, lambda: _padded_index(layout))
        return values.index_select(1, padded) if out is None else torch.index_select(values, 1, padded, out=out)

    def mean(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        """On the CPU, each row decoded with its scale divided by W, then the rows added in order."""
        rows = payloads[0][0].shape[0]
        if rows < 2 or payloads[0][1].device.type != "cpu":
            return mean_of_rows(self.decode(payloads, layout, None, "write"))
        share = [(packed, scale / rows) for packed, scale in payloads]
        dtype, device = share[0][1].dtype, share[0][1].device
        decoded = layout.memo(("sign-mean-rows", rows, dtype, device), lambda: torch.empty(rows, layout.total, dtype=dtype, device=device))
        self._lookup(share, layout, out=decoded)
        # added up in place, row after row, element by element: the same value whichever layers are
        # averaged together (a sum over dim 0 promises no order, and was 2.5x slower on large rows)
        total = decoded[0]
        for r in range(1, rows):
            total.add_(decoded[r])
        return total


class NumpySignKernels(TorchSignKernels):
    """On the CPU without the compiled module: one tensor's payload all in numpy (at small sizes the
    per-call cost of torch dominates)."""

    def encode_rows(self, rows: Tensor) -> Payload:
        array = numpy_view(rows) if rows.is_floating_point() else None
        if array is None:
            return super().encode_rows(rows)
        packed = pack_nonnegative_array(array)
        return torch.from_numpy(packed), torch.from_numpy(l1_norms_array(array, max(array.shape[1], 1)))


class NativeSignKernels(NumpySignKernels):
    """The compiled one-pass encoders and decoders; inputs they cannot read (another dtype, a layout in
    memory they cannot walk, buffers autograd guards) go to the numpy kernels."""

    def encode_rows(self, rows: Tensor) -> Payload:
        payload = native_sign_encode(rows)
        return payload if payload is not None else super().encode_rows(rows)

    def decode_rows(self, packed: Tensor, scale: Tensor, d: int) -> Tensor:
        out = cpu_empty((packed.shape[0], d), scale.dtype)
        return out if native_sign_decode(packed, scale, one_layer(d), out) else super().decode_rows(packed, scale, d)

    def encode_layers(self, rows: Tensor, layout: Layout):
        payload = native_sign_encode(rows, _native_layers(layout))
        return payload if payload is not None else super().encode_layers(rows, layout)

    def decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str) -> Tensor:
        written = self._native(payloads, layout, out, mode)
        return written if written is not None else super().decode(payloads, layout, out, mode)

    def mean(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        """Each row added onto one buffer, its scale divided by W, in one compiled pass."""
        dtype = payloads[0][1].dtype
        total = layout.memo(("sign-mean", dtype), lambda: torch.empty(layout.total, dtype=dtype)).zero_()
        written = self._native(payloads, layout, total, "add", payloads[0][0].shape[0])
        return written if written is not None else super().mean(payloads, layout)

    @staticmethod
    def _native(payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str, divisor: int = 1):
        """The compiled decoder writing into (a fresh ``(W, P)`` tensor if ``out`` is None), subtracting
        from or adding to ``out``; returns the tensor written, or None if it cannot."""
        packed, scales = _joined(payloads)
        if out is None:
            out = cpu_empty((packed.shape[0], layout.total), scales.dtype)
        return out if native_sign_decode(packed, scales, _native_layers(layout), out, mode, divisor) else None


_KERNELS = KernelSet(TorchSignKernels(), NumpySignKernels(), NativeSignKernels())


def _native_layers(layout: Layout) -> NativeLayers:
    return layout.memo(("native-layers",), lambda: NativeLayers(layout.sizes))


def _layer_scales(rows: Tensor, layout: Layout) -> Tensor:
    """(W, layers): ||v||_1 / d of every layer of every row."""
    if rows.numel() <= 1 << 20 and rows.device.type == "cpu":  # small: one kernel beats a loop of launches
        # (CPU only: index_add_ on a GPU adds in no fixed order, and runs must be bit-identical)
        layer = layout.cached("layer-of-element", rows.device, lambda: torch.repeat_interleave(
            torch.arange(len(layout)), torch.tensor(layout.sizes)))
        sums = rows.new_zeros(rows.shape[0], len(layout)).index_add_(1, layer, rows.abs())
    else:  # large: a plain reduction per layer streams the memory once (index_add does not)
        sums = torch.stack([l1_norms(rows[:, s]) for s in layout.slices], dim=1)
    return sums / layout.cached("lengths", rows.device, lambda: torch.tensor(layout.sizes)).to(rows.dtype)


def _padded_index(layout: Layout) -> Tensor:
    """Position of each element in the concatenation of layers each padded to a multiple of 8."""
    padded = Layout([8 * -(-d // 8) for d in layout.sizes]).offsets
    return torch.cat([torch.arange(d) + start for d, start in zip(layout.sizes, padded)])


def _source_index(layout: Layout) -> Tensor:
    """For each position of the byte-aligned layers, the element it holds, or P (a filler) for padding."""
    nbits = 8 * sum(-(-d // 8) for d in layout.sizes)
    source = torch.full((nbits,), layout.total, dtype=torch.int64)
    source[_padded_index(layout)] = torch.arange(layout.total)
    return source
