"""Compressors: tensor -> payload (what goes on the wire) -> tensor, with exact bit counts.

Every compressor acts on one parameter tensor at a time (layer-wise, as in the paper) and is pure: it
keeps no state between calls. The same compressor also works on a *batch of rows* -- a ``(W, d)`` tensor
holding W workers' flattened copies of one layer -- so that the simulator compresses K workers with one
set of kernels. The single-tensor methods are thin wrappers over the row methods.

A payload is a tuple of tensors whose leading axis is the row (worker) axis. Its size in bits is the size of
those tensors, nothing nominal: :func:`payload_bits` reads ``numel * element_size``.

Registered compressors, with the delta of the delta-approximation ``||C(v) - v||^2 <= (1 - delta) ||v||^2``
(Assumption 4 of the paper) for a tensor of ``d`` elements:

==================  ===========================================  ===============================================
name                C(v)                                         payload (bits per tensor, fp32 values)
==================  ===========================================  ===============================================
``identity``        v                    (delta = 1)             values: 32 d
``sign``            (||v||_1 / d) sign(v), sign(0) := +1         signs packed 8 per byte + one scale:
                    (delta = 1 / d)                              8 ceil(d / 8) + 32
``topk:RHO``        the k = max(1, floor(RHO d)) entries of      values + indices packed in b = ceil(log2 d)
                    largest magnitude  (delta = k / d)           bits each: 32 k + 8 ceil(k b / 8)
==================  ===========================================  ===============================================

Example::

    >>> import torch, saef
    >>> c = saef.make_compressor("topk:0.25")
    >>> v = torch.tensor([0.5, -2.0, 0.1, 1.0])
    >>> c.compress(v)
    tensor([ 0., -2.,  0.,  0.])
    >>> payload = c.encode(v); c.bits(payload)   # one fp32 value + one 2-bit index packed in a byte
    40
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .kernels import (
    cpu_empty,
    index_bits,
    l1_norms,
    l1_norms_array,
    largest,
    largest_array,
    native_ready,
    native_sign_decode,
    native_sign_encode,
    native_topk_decode,
    native_topk_encode,
    native_topk_indices,
    NativeLayers,
    one_layer,
    numpy_view,
    pack_bits,
    pack_index_bits,
    pack_nonnegative,
    pack_nonnegative_array,
    sign_lookup,
    unpack_bits,
    unpack_index_bits,
)

Payload = Tuple[Tensor, ...]

__all__ = [
    "Layout",
    "Compressor",
    "Identity",
    "ScaledSign",
    "TopK",
    "Payload",
    "payload_bits",
    "make_compressor",
    "register_compressor",
    "available_compressors",
    "pack_bits",
    "unpack_bits",
]


def payload_bits(payload: Payload) -> int:
    """Size in bits of the tensors of ``payload``, all rows together."""
    return sum(t.numel() * t.element_size() * 8 for t in payload)


class Layout:
    """Layers laid end to end on one flat axis: layer i is ``[offsets[i], offsets[i] + sizes[i])``.

    The algorithm keeps all layers of all workers in one ``(W, P)`` tensor; a layout tells compressors
    where each layer is, so that they can compress every layer (still layer-wise) with a few kernels.
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = [int(d) for d in sizes]
        if any(d < 0 for d in self.sizes):
            raise ValueError(f"layer sizes must be >= 0, got {self.sizes}")
        self.offsets = [0]
        for d in self.sizes:
            self.offsets.append(self.offsets[-1] + d)
        self.total = self.offsets[-1]
        self.slices = [slice(a, b) for a, b in zip(self.offsets, self.offsets[1:])]
        self._cache: Dict[tuple, object] = {}

    def __len__(self) -> int:
        return len(self.sizes)

    def subset(self, layers: Sequence[int]) -> "Layout":
        """The layout of the given layers laid end to end."""
        return Layout([self.sizes[i] for i in layers])

    def span(self, layers: Sequence[int]):
        """The slice of the flat axis that ``layers`` cover when they are consecutive (``None`` otherwise,
        or for no layers)."""
        layers = list(layers)
        if not layers or layers != list(range(layers[0], layers[-1] + 1)):
            return None
        return slice(self.offsets[layers[0]], self.offsets[layers[-1] + 1])

    def memo(self, key: tuple, make: Callable[[], object]) -> object:
        """``make()``, computed once per layout and key (index maps and plans are reused every step)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def cached(self, name: str, device: torch.device, make: Callable[[], Tensor]) -> Tensor:
        """A per-layout, per-device index tensor, made once."""
        return self.memo((name, device), lambda: make().to(device))


class Compressor:
    """Base class. Subclasses implement the row methods ``encode_rows``, ``decode_rows`` and
    ``compress_rows`` (the dense C(v), computed directly: tests check it equals decode(encode(v))).

    ``encode_layers`` / ``decode_layers`` compress every layer of a flat ``(W, P)`` tensor; the default
    loops over layers, and a compressor may override them with a vectorised version that produces the
    same payload format. ``decode_mean_layers`` is the server's average of W rows' payloads (default: the
    mean of ``decode_layers``; top-k adds its sparse values without a dense ``(W, P)`` buffer).
    ``decode_layers_into`` (decode into a given buffer) and ``subtract_decoded`` (the error update
    ``target -= decode``) let the training step reuse its buffers; their defaults go through
    ``decode_layers``, so a new compressor needs only the row methods.
    """

    name: str = "compressor"

    # --- row API: V is (W, d), one row per worker -------------------------------------------------
    def encode_rows(self, rows: Tensor) -> Payload:
        raise NotImplementedError

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        raise NotImplementedError

    def compress_rows(self, rows: Tensor) -> Tensor:
        return self.decode_rows(self.encode_rows(rows), rows.shape[1])

    def delta(self, d: int) -> float:
        """The delta of Assumption 4 this compressor guarantees on a tensor of ``d`` elements."""
        raise NotImplementedError

    # --- layer API: rows is (W, P), the layers of ``layout`` end to end ------------------------------
    def encode_layers(self, rows: Tensor, layout: Layout) -> List[Payload]:
        """One payload per layer (each with W rows)."""
        return [self.encode_rows(rows[:, s]) for s in layout.slices]

    def decode_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        """The dense ``(W, P)`` tensor the per-layer payloads stand for."""
        return torch.cat([self.decode_rows(p, d) for p, d in zip(payloads, layout.sizes)], dim=1)

    def decode_layers_into(self, payloads: Sequence[Payload], layout: Layout, out: Tensor) -> Tensor:
        """:meth:`decode_layers` written into ``out`` (``(W, P)``), which is returned: lets a caller reuse
        one buffer every step. The default copies; built-in compressors decode in place."""
        return out.copy_(self.decode_layers(payloads, layout))

    def subtract_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor) -> Tensor:
        """``target -= decode_layers(payloads, layout)`` in place (``(W, P)``; the error update of
        Algorithm 1), returned. Top-k subtracts its kept values only; sign decodes into a reused buffer."""
        return target.sub_(self.decode_layers(payloads, layout))

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        """The mean over rows of :meth:`decode_layers`, ``(P,)`` (what the server averages)."""
        return self.decode_layers(payloads, layout).mean(dim=0)

    # --- single-tensor API -------------------------------------------------------------------------
    def encode(self, v: Tensor) -> Payload:
        """The tensors that go on the wire for ``v`` (any shape; treated as a flat vector)."""
        return self.encode_rows(v.reshape(1, -1))

    def decode(self, payload: Payload, shape) -> Tensor:
        """The dense tensor of ``shape`` that ``payload`` stands for."""
        d = math.prod(shape)
        return self.decode_rows(payload, d).reshape(shape)

    def compress(self, v: Tensor) -> Tensor:
        """The dense approximation C(v), same shape and dtype as ``v``."""
        return self.compress_rows(v.reshape(1, -1)).reshape(v.shape)

    @staticmethod
    def bits(payload: Payload) -> int:
        """Exact size of ``payload`` in bits."""
        return payload_bits(payload)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Identity(Compressor):
    """No compression: the payload is the values themselves (32 bits per fp32 element)."""

    name = "identity"

    def encode_rows(self, rows: Tensor) -> Payload:
        return (rows,)

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        return payload[0]

    def compress_rows(self, rows: Tensor) -> Tensor:
        return rows

    def delta(self, d: int) -> float:
        return 1.0


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

    def _native_decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str, divisor: int = 1) -> bool:
        """The compiled decoder writing into, subtracting from or adding to ``out``; False if it cannot."""
        if not native_ready() or not payloads or not payloads[0][1].is_cpu:
            return False
        packed = torch.cat([p[0] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][0]
        scales = torch.stack([p[1] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][1]
        layers = layout.memo(("native-layers",), lambda: NativeLayers(layout.sizes))
        return native_sign_decode(packed, scales, layers, out, mode, divisor)

    def _decode_layers(self, payloads: Sequence[Payload], layout: Layout, out: Tensor = None) -> Tensor:
        """A lookup table per (row, layer) maps each byte straight to its 8 values +-scale, so decoding is
        one gather that writes the output once (unpacking to booleans first took three passes). On the
        CPU the compiled decoder does the same in one pass."""
        if native_ready() and payloads and payloads[0][1].is_cpu:
            target = out if out is not None else cpu_empty((payloads[0][0].shape[0], layout.total), payloads[0][1].dtype)
            if self._native_decode(payloads, layout, target, "write"):
                return target
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
        """The rows decoded with their scales divided by W and summed, in buffers kept by ``layout``: no
        fresh ``(W, P)`` tensor per step. Equal to ``decode_layers(...).mean(0)`` up to rounding (the
        additions may run in another order). The result lives in a buffer: it is valid until the next
        call with the same layout and number of rows."""
        rows = payloads[0][0].shape[0] if payloads else 0
        if rows and native_ready() and payloads[0][1].is_cpu:  # compiled: each row added onto one buffer
            dtype = payloads[0][1].dtype
            total = layout.memo(("sign-mean", dtype), lambda: torch.empty(layout.total, dtype=dtype)).zero_()
            if self._native_decode(payloads, layout, total, "add", rows):
                return total
        if rows < 2 or payloads[0][1].device.type != "cpu":
            return super().decode_mean_layers(payloads, layout)
        share = [(packed, scale / rows) for packed, scale in payloads]
        dtype = share[0][1].dtype
        decoded = layout.memo(("sign-mean-rows", rows, dtype), lambda: torch.empty(rows, layout.total, dtype=dtype))
        self._decode_layers(share, layout, out=decoded)
        if decoded.numel() <= 1 << 20:  # small: one reduction kernel
            return decoded.sum(dim=0)
        total = decoded[0]  # large: added up in place, row after row (a sum over dim 0 was 2.5x slower)
        for r in range(1, rows):
            total.add_(decoded[r])
        return total

    def decode_layers_into(self, payloads: Sequence[Payload], layout: Layout, out: Tensor) -> Tensor:
        return self._decode_layers(payloads, layout, out)

    def subtract_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor) -> Tensor:
        if self._native_decode(payloads, layout, target, "subtract"):
            return target
        buffer = layout.memo(("sign-decoded", tuple(target.shape), target.dtype, target.device), lambda: torch.empty_like(target))
        return target.sub_(self._decode_layers(payloads, layout, out=buffer))


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

    def _native_decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, mode: str, divisor: int = 1) -> bool:
        """The compiled decoder writing into, subtracting from or adding to ``out``; False if it cannot."""
        if not native_ready() or not payloads or not payloads[0][0].is_cpu:
            return False
        values = torch.cat([p[0] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][0]
        packed = torch.cat([p[1] for p in payloads], dim=1) if len(payloads) > 1 else payloads[0][1]
        return native_topk_decode(values, packed, self._native_layers(layout), out, mode, divisor)

    def decode_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        if native_ready() and payloads and payloads[0][0].is_cpu:
            out = cpu_empty((payloads[0][0].shape[0], layout.total), payloads[0][0].dtype)
            if self._native_decode(payloads, layout, out, "write"):
                return out
        if any(d == 0 for d in layout.sizes):
            return super().decode_layers(payloads, layout)
        values, index = self._kept(payloads, layout)
        return values.new_zeros(values.shape[0], layout.total).scatter_(1, index, values)

    def decode_layers_into(self, payloads: Sequence[Payload], layout: Layout, out: Tensor) -> Tensor:
        if self._native_decode(payloads, layout, out, "write"):
            return out
        if any(d == 0 for d in layout.sizes):
            return super().decode_layers_into(payloads, layout, out)
        values, index = self._kept(payloads, layout)
        return out.zero_().scatter_(1, index, values)

    def subtract_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor) -> Tensor:
        """Only the kept entries change (t + (-v) is t - v exactly): no dense decode."""
        if self._native_decode(payloads, layout, target, "subtract"):
            return target
        if any(d == 0 for d in layout.sizes):
            return super().subtract_decoded(payloads, layout, target)
        values, index = self._kept(payloads, layout)
        return target.scatter_add_(1, index, values.neg())

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout) -> Tensor:
        """The rows' kept values added into one dense row, divided by W: no ``(W, P)`` buffer. Equal to
        ``decode_layers(...).mean(0)`` up to rounding (the order of the additions differs). The result
        lives in a buffer kept by ``layout``: it is valid until the next call with the same layout."""
        if any(d == 0 for d in layout.sizes) or payloads[0][0].device.type != "cpu":
            # (scatter_add_ on a GPU adds in no fixed order; the dense mean is deterministic)
            return super().decode_mean_layers(payloads, layout)
        dtype = payloads[0][0].dtype
        total = layout.memo(("topk-mean-buffer", dtype), lambda: torch.empty(layout.total, dtype=dtype))
        if self._native_decode(payloads, layout, total.zero_(), "add", payloads[0][0].shape[0]):
            return total  # the compiled decoder adds the rows in the same order as the scatter below
        values, index = self._kept(payloads, layout)
        # each value divided by W before adding: k values per row instead of P (exact when W is a power of 2)
        return total.zero_().scatter_add_(0, index.view(-1), values.view(-1) / values.shape[0])

    def __repr__(self) -> str:
        return f"TopK(rho={self.rho!r})"


# --- registry ---------------------------------------------------------------------------------------

_REGISTRY: Dict[str, Callable[..., Compressor]] = {}


def register_compressor(name: str, factory: Callable[..., Compressor], *, overwrite: bool = False) -> None:
    """Make ``factory`` available as ``make_compressor(name)`` / ``make_compressor("name:ARG")``.

    ``factory`` is called with no argument, or with the text after the colon as one string argument.

    Example::

        >>> class Half(saef.compressors.Identity):
        ...     name = "half"
        >>> saef.register_compressor("half", Half)
    """
    if not name or ":" in name:
        raise ValueError(f"compressor name must be non-empty and contain no ':', got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"compressor {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def available_compressors() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _parse_rho(arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError(f"topk: rho must be a number in (0, 1], got {arg!r}") from None


register_compressor("identity", Identity)
register_compressor("sign", ScaledSign)
register_compressor("topk", lambda arg=None: TopK(_parse_rho(arg) if arg is not None else 0.01))


def make_compressor(spec) -> Compressor:
    """Build a compressor from a spec string (``"identity"``, ``"sign"``, ``"topk:0.01"``) or pass one
    through. Unknown names raise ``ValueError`` listing the registered ones."""
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"compressor must be a string like 'sign' or 'topk:0.01', got {spec!r}")
    name, sep, arg = spec.partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown compressor {spec!r}; registered: {', '.join(available_compressors())}")
    if not sep:
        return factory()
    try:
        return factory(arg)
    except TypeError:
        raise ValueError(f"compressor {name!r} takes no argument, got {spec!r}") from None
