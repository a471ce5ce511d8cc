"""Low-bit values: ``SPEC:int8``, ``SPEC:int4``, ``SPEC:int2`` send a compressor's floating-point values as
b-bit integers with one fp32 scale per chunk of :data:`CHUNK` values; ``SPEC:int8sr`` (``int4sr``,
``int2sr``) rounds stochastically instead of to nearest.

Every floating-point tensor of the wrapped compressor's payload is cut, row by row, into chunks of
:data:`CHUNK` values; a chunk's scale is its largest magnitude over q = 2^(b-1) - 1 (127, 7, 1: symmetric
levels, so int2 is ternary, -1, 0, +1 times the scale), and each value is sent as the level nearest to
value / scale, or, with stochastic rounding, one of the two levels around it with the probabilities that
keep it unbiased (E level * scale = value). On the wire: the levels packed in b bits each, the scales as
fp32, and the tensor's shape (one int32 per dimension) -- all counted. The rounding is part of C(v), so
error feedback sees it like any other compression error.

Nearest rounding is deterministic and biased; stochastic rounding is unbiased, so the wrapped compressor is
unbiased exactly when the inner one is and the rounding is stochastic (``unbiased`` says so). Stochastic
draws come from the step's :class:`~saef.compress.Context` (a stream of their own per layer and sender), so a
run is reproducible; the receiver needs none of them.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .base import Compressor, Context, Identity, Layout, Payload, replayable
from .packing import pack_fixed, unpack_fixed
from .precision import Precision

__all__ = ["LowBit", "LOW_BITS", "CHUNK"]

LOW_BITS = {f"int{b}{sr}": (b, bool(sr)) for b in (8, 4, 2) for sr in ("", "sr")}  # suffix -> (bits, stochastic)
CHUNK = 64  # values per fp32 scale: 0.5 bits a value on top of the b
_STREAM = 1 << 40  # added to a layer's id: the rounding's draws, apart from the inner compressor's


class LowBit(Precision):
    """``inner`` with its payload's floating-point values sent as b-bit integers and a scale per chunk.

    Args:
        inner: a compressor whose payload holds floats (``sends_floats``), without a value precision.
        wire: a key of :data:`LOW_BITS` (``int8``, ``int4``, ``int2``; ``...sr`` for stochastic rounding).
    """

    def __init__(self, inner: Compressor, wire: str):
        self._wrap(inner, wire, LOW_BITS, "low-bit values")
        self.bits, self.stochastic = LOW_BITS[wire]
        self.levels = (1 << (self.bits - 1)) - 1
        self.random = inner.random or self.stochastic
        self.unbiased = self.stochastic and (inner.unbiased or type(inner) is Identity)  # (identity: E C(v) = v too)

    # --- the values on the wire -------------------------------------------------------------------------
    def _quantise(self, t: Tensor, generators: Optional[Sequence[Optional[torch.Generator]]]) -> Payload:
        rows = t.shape[0]
        flat = t.reshape(rows, -1).float()
        n = flat.shape[1]
        chunks = max(1, math.ceil(n / CHUNK))
        padded = flat.new_zeros(rows, chunks * CHUNK)
        padded[:, :n] = flat
        padded = padded.view(rows, chunks, CHUNK)
        scale = padded.abs().amax(dim=2) / self.levels  # (rows, chunks)
        u = padded / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(2)
        if self.stochastic:
            q = torch.floor(u + _uniform(u, generators))
        else:
            q = torch.round(u)
        codes = (q.clamp_(-self.levels, self.levels) + self.levels).to(torch.int64).view(rows, -1)[:, :n]
        shape = torch.tensor([list(t.shape[1:])] * rows, dtype=torch.int32, device=t.device).view(rows, -1)
        return pack_fixed(codes, self.bits).to(t.device), scale, shape

    def _restore(self, codes: Tensor, scale: Tensor, shape: Tensor, dtype: torch.dtype) -> Tensor:
        rows = codes.shape[0]
        dims = [int(v) for v in shape[0].tolist()]
        n = math.prod(dims)
        levels = unpack_fixed(codes, n, self.bits).to(scale.device) - self.levels
        chunks = scale.shape[1]
        padded = levels.new_zeros(rows, chunks * CHUNK)
        padded[:, :n] = levels
        values = (padded.view(rows, chunks, CHUNK).to(scale.dtype) * scale.unsqueeze(2)).view(rows, -1)[:, :n]
        return values.reshape(rows, *dims).to(dtype)

    def _down(self, payload: Payload, generators=None) -> Payload:
        out = []
        for t in payload:
            out.extend(self._quantise(t, generators) if t.is_floating_point() else (t,))
        return tuple(out)

    def _up(self, payloads: Sequence[Payload], dtype: torch.dtype) -> List[Payload]:
        restored = []
        for payload in payloads:
            parts, i = [], 0
            while i < len(payload):  # (packed levels, scales, shape) stand for one float tensor: the scales are
                if i + 2 < len(payload) and payload[i + 1].is_floating_point():  # the only floats left
                    parts.append(self._restore(payload[i], payload[i + 1], payload[i + 2], dtype))
                    i += 3
                else:
                    parts.append(payload[i])
                    i += 1
            restored.append(tuple(parts))
        return restored

    # --- encoders: the rounding's draws ------------------------------------------------------------------
    def encode_rows(self, rows: Tensor, generators=None) -> Payload:
        inner = self.inner.encode_rows(rows, generators=generators) if self.inner.random else self.inner.encode_rows(rows)
        return self._down(inner, generators)  # (the inner's draws come first in each generator's stream)

    def decode_rows(self, payload: Payload, d: int, generators=None) -> Tensor:
        restored = self._up([payload], torch.float32)[0]
        return self.inner.decode_rows(restored, d, generators=generators) if self.inner.random else self.inner.decode_rows(restored, d)

    def encode_layers(self, rows: Tensor, layout: Layout, context: Optional[Context] = None) -> List[Payload]:
        payloads = self.inner.encode_layers(rows, layout, **self.inner.context_args(context))
        if not self.stochastic or context is None:
            return [self._down(p) for p in payloads]
        return [self._down(p, context.generators(layout.ids[i] + _STREAM, rows.device)) for i, p in enumerate(payloads)]

    def compress_rows(self, rows: Tensor, generators=None) -> Tensor:
        encoder, decoder = replayable(generators, rows.shape[0], rows.device)  # decode(encode(v)), one set of draws
        payload = self._up([self.encode_rows(rows, generators=encoder)], rows.dtype)[0]
        if self.inner.random:
            return self.inner.decode_rows(payload, rows.shape[1], generators=decoder)
        return self.inner.decode_rows(payload, rows.shape[1])

    def compress(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.compress_rows(v.reshape(1, -1), None if generator is None else [generator]).reshape(v.shape).to(v.dtype)

    def encode(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Payload:
        return self.encode_rows(v.reshape(1, -1), generators=None if generator is None else [generator])

    def decode(self, payload: Payload, shape, generator: Optional[torch.Generator] = None) -> Tensor:
        d = math.prod(shape)
        return self.decode_rows(payload, d, generators=None if generator is None else [generator]).reshape(shape)

    def delta(self, d: int) -> float:
        raise ValueError(f"{self.name} guarantees no delta: rounding to {self.bits}-bit levels can break the wrapped "
                         "compressor's bound (and stochastic rounding is unbiased, not contractive)")


def _uniform(like: Tensor, generators: Optional[Sequence[Optional[torch.Generator]]]) -> Tensor:
    """Uniform draws in [0, 1) shaped like ``like`` (rows, ...), row r from ``generators[r]`` (torch's global
    generator without them)."""
    if generators is None or any(g is None for g in generators):
        return torch.rand(like.shape, dtype=like.dtype, device=like.device)
    out = torch.empty_like(like)
    for r, g in enumerate(generators):
        out[r] = torch.rand(like.shape[1:], generator=g, dtype=like.dtype, device=like.device)
    return out
