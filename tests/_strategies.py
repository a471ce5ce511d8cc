"""Hypothesis strategies shared by the compressor tests."""

import math

import torch
from hypothesis import strategies as st


@st.composite
def tensors(draw):
    """Tensors of 0 to 3 dimensions (0 and 1 elements included) with zeros, tiny and huge magnitudes."""
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
    n = math.prod(shape)
    magnitude = st.one_of(st.just(0.0), st.floats(1e-30, 1e-20), st.floats(1e-3, 1e3), st.floats(1e20, 1e30))
    values = draw(st.lists(st.tuples(magnitude, st.booleans()), min_size=n, max_size=n))
    flat = torch.tensor([m if positive else -m for m, positive in values], dtype=torch.float32)
    return flat.reshape(shape)


def topk_index_bits(d: int, k: int) -> int:
    """Top-k's documented index section, by hand: the smaller of the Elias-Fano code (k L bits with
    L = floor(log2(d / k)), plus a k + ((d - 1) >> L) + 1 bit vector) and k ceil(log2 d) explicit bits,
    padded to whole bytes."""
    if d == 0 or k == 0:
        return 0
    low = int(math.floor(math.log2(d / k))) if k < d else 0
    coded = k * low + k + ((d - 1) >> low) + 1
    return 8 * math.ceil(min(coded, k * (d - 1).bit_length()) / 8)
