"""Unbiased stochastic quantisers: QSGD (Alistarh et al. 2017) and natural compression (Horváth et al. 2019).

Both round at random so that E C(v) = v (for ``method="direct"``); the draws come from the generators the
:class:`~saef.compress.Context` gives (or torch's global one), and are not needed to decode.

==================  =========================================================  ====================================
name                C(v)                                                        payload (bits per tensor of d)
==================  =========================================================  ====================================
``qsgd:S``          ||v||_2 sign(v_i) l_i / S, l_i = floor(S |v_i| / ||v||)      one norm (32 fp32) + signs packed
                    + Bernoulli(fraction): S levels, unbiased                    (8 ceil(d / 8)) + levels in
                                                                                 b = ceil(log2(S + 1)) bits each
                                                                                 (8 ceil(d b / 8))
``natural``         sign(v_i) 2^e_i, |v_i| rounded to one of the two nearest      sign + 8-bit exponent: 9 bits an
                    powers of two with the probabilities that keep it unbiased   entry, 8 ceil(9 d / 8)
==================  =========================================================  ====================================
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .base import Compressor, Payload
from .packing import pack_bits, pack_fixed, unpack_bits, unpack_fixed

__all__ = ["QSGD", "Natural"]


def _uniform(rows: Tensor, generators: Optional[List[Optional[torch.Generator]]]) -> Tensor:
    """Uniform draws in [0, 1) shaped like ``rows``, row r from ``generators[r]`` (torch's global one if
    None)."""
    if generators is None:
        return torch.rand(rows.shape, dtype=rows.dtype, device=rows.device)
    if len(generators) != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows need {rows.shape[0]} generators, got {len(generators)}")
    out = torch.empty_like(rows)
    for r, g in enumerate(generators):
        out[r].uniform_(0.0, 1.0, generator=g)
    return out


class QSGD(Compressor):
    """QSGD with S levels: payload per row, the l2 norm (dtype of ``v``), the signs packed 8 per byte, and
    the levels 0..S packed in ceil(log2(S + 1)) bits each. Unbiased; variance
    E||C(v) - v||^2 <= min(d / S^2, sqrt(d) / S) ||v||^2.

    Args:
        levels: S >= 1.
    """

    random = True
    unbiased = True

    def __init__(self, levels: int):
        if isinstance(levels, bool) or not isinstance(levels, int) or not (1 <= levels < 2**31):
            raise ValueError(f"qsgd: the number of levels S must be an integer >= 1, got {levels!r}")
        self.levels = levels
        self.level_bits = levels.bit_length()  # ceil(log2(S + 1))
        self.name = f"qsgd:{levels}"

    def encode_rows(self, rows: Tensor, generators=None) -> Payload:
        wide = torch.float64 if rows.dtype in (torch.float32, torch.float16, torch.bfloat16) else rows.dtype
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=wide).to(rows.dtype)  # squares of 1e30 overflow fp32
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        scaled = rows.abs() / safe.unsqueeze(1) * self.levels  # in [0, S]
        low = scaled.floor()
        levels = (low + (_uniform(rows, generators) < scaled - low).to(rows.dtype)).clamp_(max=self.levels)
        return norms, pack_bits(rows < 0), pack_fixed(levels.to(torch.int64), self.level_bits)

    def decode_rows(self, payload: Payload, d: int, generators=None) -> Tensor:
        norms, signs, packed = payload
        levels = unpack_fixed(packed, d, self.level_bits).to(norms.dtype)
        values = levels * (norms / self.levels).unsqueeze(1)
        return torch.where(unpack_bits(signs, d), -values, values)

    def variance(self, d: int) -> float:
        """omega with E||C(v) - v||^2 <= omega ||v||^2."""
        return min(d / self.levels**2, math.sqrt(d) / self.levels)


_SMALLEST = 2.0**-126  # the smallest power of two the 8-bit exponent writes (code 1); code 0 is zero
_LARGEST_CODE = 254  # 2^127: larger magnitudes are clamped to it


class Natural(Compressor):
    """Natural compression: each entry becomes sign(v_i) 2^e, |v_i| rounded up or down to a neighbouring
    power of two with probabilities that keep it unbiased (variance <= ||v||^2 / 8). Payload per row: 9 bits
    an entry -- the sign, and the exponent as fp32 writes it (code e + 127; 0 for zero) -- packed.
    Magnitudes below 2^-126 round to 0 or 2^-126 (still unbiased); above 2^127 (float64 only) they are
    clamped."""

    random = True
    unbiased = True
    sends_floats = False
    name = "natural"

    def encode_rows(self, rows: Tensor, generators=None) -> Payload:
        magnitude = rows.abs()
        mantissa, exponent = torch.frexp(magnitude)  # |v| = m 2^e, m in [0.5, 1)
        u = _uniform(rows, generators)
        tiny = magnitude < _SMALLEST
        # |v| in [2^(e-1), 2^e): up to 2^e with probability 2m - 1; below 2^-126: up to 2^-126 with |v| / 2^-126
        up = torch.where(tiny, u < magnitude / _SMALLEST, u < 2 * mantissa - 1)
        code = torch.where(tiny, up.to(torch.int64), exponent.to(torch.int64) - 1 + up.to(torch.int64) + 127)
        code = code.clamp_(0, _LARGEST_CODE)
        return (pack_fixed(code | ((rows < 0).to(torch.int64) << 8), 9),)

    def decode_rows(self, payload: Payload, d: int, generators=None, dtype: torch.dtype = torch.float32) -> Tensor:
        words = unpack_fixed(payload[0], d, 9)
        code = words & 255
        values = torch.ldexp(torch.ones((), dtype=dtype, device=words.device), (code - 127).to(dtype))
        values = torch.where(code == 0, torch.zeros((), dtype=dtype, device=words.device), values)
        return torch.where((words >> 8) == 1, -values, values)

    def compress_rows(self, rows: Tensor, **draws) -> Tensor:
        return self.decode_rows(self.encode_rows(rows, **draws), rows.shape[1], dtype=rows.dtype)

    def variance(self, d: int) -> float:
        return 1.0 / 8
