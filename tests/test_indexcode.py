"""The Elias-Fano code of sorted index sets (saef.compress.indexcode): round trips on the edge cases and
at random, its fixed size, and its distance from the information bound log2 C(d, k)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saef.compress.indexcode import coded_bits, decode, encode, explicit_bits, information_bits, low_bits

EDGES = [
    (1, [[0]]),                      # d = 1
    (7, [[6]]),                      # k = 1, the last index
    (1000, [[0]]),                   # k = 1, the first index
    (1000, [[999]]),
    (5, [[0, 1, 2, 3, 4]]),          # k = d
    (64, [list(range(20, 40))]),     # adjacent indices
    (1 << 20, [[0, 1, (1 << 20) - 2, (1 << 20) - 1]]),
    (100, [[3, 4, 90], [0, 50, 99]]),  # two rows
]


@pytest.mark.parametrize("d,idx", EDGES)
def test_edge_cases_round_trip(d, idx):
    """encode then decode gives the indices back, in exactly ceil(coded_bits / 8) bytes."""
    idx = np.array(idx, dtype=np.int64)
    packed = encode(idx, d)
    assert packed.shape == (idx.shape[0], math.ceil(coded_bits(d, idx.shape[1]) / 8))
    assert np.array_equal(decode(packed, d, idx.shape[1]), idx)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda d: st.tuples(st.just(d), st.integers(1, d), st.integers(0, 2**32 - 1))))
def test_random_sets_round_trip(case):
    d, k, seed = case
    rng = np.random.default_rng(seed)
    idx = np.sort(np.stack([rng.choice(d, size=k, replace=False) for _ in range(2)]), axis=1)
    assert np.array_equal(decode(encode(idx, d), d, k), idx)


def test_size_is_the_formula_and_near_the_bound():
    """coded_bits = k L + k + ((d - 1) >> L) + 1, and it is at most k (2 + log2(d / k)) + 1 bits: within
    0.6 k + 1 bits of log2 C(d, k) at 1 % of 10^6 (8.57 bits per entry against 8.08)."""
    d, k = 10**6, 10**4
    L = low_bits(d, k)
    assert L == 6 and coded_bits(d, k) == k * 6 + k + ((d - 1) >> 6) + 1
    for d, k in [(10**6, 10**4), (10**6, 10**3), (10**6, 10**5), (300, 3), (4096, 1)]:
        assert coded_bits(d, k) <= k * (2 + math.log2(d / k)) + 1
    assert coded_bits(10**6, 10**4) - information_bits(10**6, 10**4) < 0.6 * 10**4
    assert explicit_bits(10**6, 10**4) == 20 * 10**4


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        encode(np.array([[3, 3]]), 10)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        encode(np.array([[3, 10]]), 10)
    with pytest.raises(ValueError, match="has 2 bytes, got 5"):
        decode(np.zeros((1, 5), dtype=np.uint8), 10, 2)
    with pytest.raises(ValueError, match="set bits"):
        decode(np.zeros((1, 2), dtype=np.uint8), 10, 2)
