"""Value precision: ``SPEC:bf16`` / ``SPEC:fp16`` sends a compressor's floating-point values in 16 bits.

The wrapped compressor runs as it is; every floating-point tensor of its payload is cast to the wire dtype
when encoded (saturated at the wire dtype's largest finite value: 65504 for fp16) and back to the
parameters' dtype when decoded, so what is sent (and counted) is 16 bits a value, and the rounding is part
of C(v) -- error feedback sees it like any other compression error.
``identity:bf16`` is what DDP's bf16 compression hook sends.

The cast rounds to nearest, so it is deterministic and biased: a value moves by up to 2^-8 of itself in bf16
(8 significant bits) and 2^-11 in fp16. On an unbiased compressor (``qsgd:S``, ``randk:RHO:unbiased``) that
bias survives the expectation over the compressor's draws (``E C(v) != v``), so the wrapped compressor
reports ``unbiased = False``; its delta is still the inner compressor's (refused for an unbiased one: use it
with ``method="direct"``, knowing it is biased by the rounding).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .base import Compressor, Context, Layout, Payload, replayable

__all__ = ["Precision", "WIRE_DTYPES"]

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision(Compressor):
    """``inner`` with its payload's floating-point values sent as ``wire`` (bf16 or fp16), rounded to nearest.

    Random and stateful as ``inner`` is; never unbiased (see the module docstring: rounding to nearest
    biases an unbiased compressor).

    Args:
        inner: a compressor whose payload holds floats (``sends_floats``), not itself a :class:`Precision`.
        wire: ``"bf16"`` or ``"fp16"``.
    """

    unbiased = False  # rounding to nearest is biased, whatever the inner compressor is

    def __init__(self, inner: Compressor, wire: str):
        self._wrap(inner, wire, WIRE_DTYPES, "value precision")
        self.dtype = WIRE_DTYPES[wire]

    def _wrap(self, inner: Compressor, wire: str, suffixes, what: str) -> None:
        """Check and keep ``inner`` and the suffix ``wire`` (one of ``suffixes``): the name, the draws and the
        state are the inner compressor's."""
        if wire not in suffixes:
            raise ValueError(f"{what} must be one of {sorted(suffixes)}, got {wire!r}")
        if not inner.sends_floats:
            raise ValueError(f"{inner.name} sends no floating-point values: a :{wire} suffix does not apply")
        if isinstance(inner, Precision):
            raise ValueError(f"{inner.name} already has a value precision")
        self.inner, self.wire = inner, wire
        self.name = f"{inner.name}:{wire}"
        self.random, self.stateful = inner.random, inner.stateful

    # --- casting ---------------------------------------------------------------------------------------
    def _down(self, payload: Payload) -> Payload:
        """Floats cast to the wire dtype, saturated at its largest finite value (fp16's is 65504): an
        overflow never becomes an Inf, and error feedback keeps what saturation cut."""
        top = torch.finfo(self.dtype).max
        return tuple(t.clamp(-top, top).to(self.dtype) if t.is_floating_point() else t for t in payload)

    def _up(self, payloads: Sequence[Payload], dtype: torch.dtype) -> List[Payload]:
        return [tuple(t.to(dtype) if t.is_floating_point() else t for t in payload) for payload in payloads]

    @staticmethod
    def _dtype(like: Optional[Tensor]) -> torch.dtype:
        return like.dtype if like is not None and like.is_floating_point() else torch.float32

    # --- row API ---------------------------------------------------------------------------------------
    def encode_rows(self, rows: Tensor, **draws) -> Payload:
        return self._down(self.inner.encode_rows(rows, **draws))

    def decode_rows(self, payload: Payload, d: int, **draws) -> Tensor:
        return self.inner.decode_rows(self._up([payload], torch.float32)[0], d, **draws)

    def compress_rows(self, rows: Tensor, generators=None) -> Tensor:
        if not self.inner.random:
            return self.inner.decode_rows(self._up([self.encode_rows(rows)], rows.dtype)[0], rows.shape[1])
        encoder, decoder = replayable(generators, rows.shape[0], rows.device)  # decode(encode(v)), one set of draws
        payload = self._up([self.encode_rows(rows, generators=encoder)], rows.dtype)[0]
        return self.inner.decode_rows(payload, rows.shape[1], generators=decoder)

    def state_sizes(self, layout: Layout) -> List[int]:
        return self.inner.state_sizes(layout)

    def init_state(self, layout: Layout, context: Context) -> None:
        self.inner.init_state(layout, context)

    def delta(self, d: int) -> float:
        if self.inner.unbiased:
            raise ValueError(f"{self.name} is not contractive ({self.inner.name} is unbiased, and rounding to "
                             f"{self.wire} makes it biased): it has no delta (use it with method='direct')")
        return self.inner.delta(d)

    # --- layer API: the inner compressor's (vectorised) methods on payloads cast back -----------------
    def encode_layers(self, rows: Tensor, layout: Layout, context: Optional[Context] = None) -> List[Payload]:
        return [self._down(p) for p in self.inner.encode_layers(rows, layout, **self.inner.context_args(context))]

    def decode_layers(self, payloads, layout, context=None):
        return self.inner.decode_layers(self._up(payloads, torch.float32), layout, **self.inner.context_args(context))

    def decode_layers_into(self, payloads, layout, out, context=None):
        return self.inner.decode_layers_into(self._up(payloads, out.dtype), layout, out, **self.inner.context_args(context))

    def subtract_decoded(self, payloads, layout, target, context=None):
        return self.inner.subtract_decoded(self._up(payloads, target.dtype), layout, target, **self.inner.context_args(context))

    def add_decoded(self, payloads, layout, target, context=None):
        return self.inner.add_decoded(self._up(payloads, target.dtype), layout, target, **self.inner.context_args(context))

    def decode_mean_layers(self, payloads, layout, context=None):
        return self.inner.decode_mean_layers(self._up(payloads, torch.float32), layout, **self.inner.context_args(context))

    # --- single-tensor API (PowerSGD's matrix view lives there) ---------------------------------------
    def encode(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Payload:
        return self._down(self.inner.encode(v, generator))

    def decode(self, payload: Payload, shape, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.inner.decode(self._up([payload], torch.float32)[0], shape, generator)

    def compress(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        encoder, decoder = replayable([generator], 1, v.device) if self.inner.random else ([None], [None])
        return self.inner.decode(self._up([self.encode(v, encoder[0])], v.dtype)[0], v.shape, decoder[0])
