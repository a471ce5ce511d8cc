"""Rand-k, QSGD, natural compression, PowerSGD and 16-bit values: payload sizes against their formulas,
decode(encode(v)) against compress(v), unbiasedness and contraction checked statistically (tolerances from
the draws' distribution: Hoeffding's bound, binomial and sample standard errors), and the context's draws (the same on every party, different per layer and sender)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saef
from saef.compress import SERVER, Context, Layout, PowerSGD, payload_bits

sys.path.insert(0, str(Path(__file__).parent))
from _strategies import tensors, topk_index_bits  # noqa: E402

NEW = ["randk:0.1", "randk:0.3:unbiased", "qsgd:1", "qsgd:4", "qsgd:255", "natural", "powersgd:1", "powersgd:3",
       "topk:0.1:bf16", "identity:fp16", "sign:bf16", "randk:0.3:bf16", "qsgd:4:fp16", "powersgd:2:bf16"]


def _pair(seed):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", NEW)
@settings(max_examples=80, deadline=None)
@given(v=tensors(), seed=st.integers(0, 2**31))
def test_decode_of_encode_equals_compress(spec, v, seed):
    """decode(encode(v)) with a generator in the same state equals compress(v): finite, v's shape and dtype."""
    c = saef.make_compressor(spec)
    g1, g2 = _pair(seed)
    dense = c.compress(v, generator=torch.Generator().manual_seed(seed))
    assert dense.shape == v.shape and dense.dtype == v.dtype and torch.isfinite(dense).all()
    assert torch.equal(c.decode(c.encode(v, generator=g1), v.shape, generator=g2), dense)


def _bits(spec, shape):
    """The documented payload size of one tensor of ``shape``, in bits."""
    d = math.prod(shape)
    name, _, rest = spec.partition(":")
    value_bits = 16 if spec.endswith(("bf16", "fp16")) else 32
    k = 0 if d == 0 else min(d, max(1, math.floor(float(rest.split(":")[0] or 0) * d * (1 + 1e-12)))) if name in ("randk", "topk") else 0
    if name == "randk":
        return value_bits * k
    if name == "topk":
        return value_bits * k + topk_index_bits(d, k)
    if name == "qsgd":
        s = int(rest.split(":")[0])
        return value_bits + 8 * math.ceil(d / 8) + 8 * math.ceil(d * s.bit_length() / 8)
    if name == "natural":
        return 8 * math.ceil(9 * d / 8)
    if name == "powersgd":
        r = int(rest.split(":")[0])
        n, m = (shape[0], d // shape[0]) if len(shape) >= 2 and shape[0] else (0, 0)
        return value_bits * r * (n + m) if len(shape) >= 2 and r * (n + m) < n * m else value_bits * d
    if name == "sign":
        return 8 * math.ceil(d / 8) + value_bits
    return value_bits * d  # identity


@pytest.mark.parametrize("spec", NEW)
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (257,), (10, 3), (64, 27), (16, 3, 3, 3), (3, 100)])
def test_payload_bits_equal_the_formula(spec, shape):
    """The payload's real size equals the documented formula (values only for rand-k; 9 bits an entry for
    natural; (n + m) R values for PowerSGD; 16-bit values with a :bf16/:fp16 suffix)."""
    c = saef.make_compressor(spec)
    payload = c.encode(torch.randn(shape), generator=torch.Generator().manual_seed(0))
    assert payload_bits(payload) == _bits(spec, shape), (spec, shape)
    floats = [t for t in payload if t.is_floating_point()]
    if spec.endswith(("bf16", "fp16")):
        assert floats and all(t.dtype in (torch.bfloat16, torch.float16) for t in floats)


def _samples(spec, v, n):
    c = saef.make_compressor(spec)
    return torch.stack([c.compress(v, generator=torch.Generator().manual_seed(i)).double() for i in range(n)])


def _spread(spec, v):
    """Width of the two values each coordinate of C(v) can take (rand-k: 0 or (d/k) v_i; QSGD: two adjacent
    levels, ||v|| / S apart; natural: two adjacent powers of two, at most |v_i| apart)."""
    v = v.double()
    if spec.startswith("randk"):
        return v.abs() * v.numel() / saef.make_compressor(spec).k(v.numel())
    if spec.startswith("qsgd"):
        return torch.full_like(v, v.norm().item() / int(spec.split(":")[1]))
    return v.abs()


@pytest.mark.parametrize("spec", ["randk:0.2:unbiased", "qsgd:1", "qsgd:4", "natural"])
def test_unbiased_compressors_are_unbiased(spec):
    """The mean of 4000 draws of C(v) is v: every coordinate within Hoeffding's bound for the width of its
    two possible values (failure probability 1e-9 per coordinate), and the variance within the documented
    bound omega ||v||^2 (to 5 standard errors of the measured mean)."""
    torch.manual_seed(0)
    v = torch.randn(40) * torch.logspace(-2, 2, 40)
    n = 4000
    draws = _samples(spec, v, n)
    tolerance = _spread(spec, v) * math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert ((draws.mean(0) - v.double()).abs() <= tolerance + 1e-12).all(), spec
    c = saef.make_compressor(spec)
    omega = c.variance(v.numel()) if hasattr(c, "variance") else v.numel() / c.k(v.numel()) - 1
    spread = (draws - v.double()).square().sum(1)
    assert spread.mean() <= omega * v.double().square().sum() + 5 * spread.std() / math.sqrt(len(draws))


def test_biased_randk_contracts_in_expectation():
    """Biased rand-k: E||C(v) - v||^2 = (1 - k/d) ||v||^2, within 5 standard errors over 4000 draws; every
    draw keeps exactly k coordinates, unchanged."""
    v = torch.randn(50)
    draws = _samples("randk:0.2", v, 4000)
    err = (draws - v.double()).square().sum(1)
    expected = (1 - 10 / 50) * v.double().square().sum()
    assert abs(err.mean() - expected) <= 5 * err.std() / math.sqrt(len(err))
    kept = draws != 0
    assert (kept.sum(1) == 10).all() and torch.equal(draws[kept], v.double().expand_as(draws)[kept])


@pytest.mark.parametrize("d, k", [(40, 2), (40, 20)])
def test_randk_keeps_every_index_equally_often(d, k):
    """Each index is kept in k/d of the draws (both ways of drawing: a stream of draws for k << d, a
    permutation otherwise): every count within 6 standard deviations of Binomial(n, k/d)."""
    c = saef.make_compressor(f"randk:{k / d}")
    n = 8000
    counts = torch.zeros(d)
    for i in range(n):
        counts += c.compress(torch.ones(d), generator=torch.Generator().manual_seed(i)) != 0
    p = k / d
    assert ((counts - n * p).abs() <= 6 * math.sqrt(n * p * (1 - p))).all()


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    """Repeated steps on one matrix with the state kept (one power iteration each) reach the best rank-R
    approximation's error (Eckart-Young: the tail of the singular values) to 1e-4 relative; a fresh Q (the
    single-tensor API) does no better than that bound."""
    torch.manual_seed(0)
    m = torch.randn(30, 20, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 20, dtype=torch.float64)) @ torch.randn(20, 20, dtype=torch.float64)
    c = PowerSGD(2)
    layout = Layout([m.numel()], [m.shape])
    state = torch.zeros(1, sum(c.state_sizes(layout)), dtype=torch.float64)
    slices = {0: slice(0, state.shape[1])}
    c.init_state(layout, Context(0, -1, (0,), state, slices))
    for t in range(60):
        payload = c.encode_layers(m.reshape(1, -1), layout, Context(0, t, (0,), state, slices))
    approx = c.decode_layers(payload, layout).view_as(m)
    best = torch.linalg.svdvals(m)[2:].square().sum().sqrt()
    assert abs((m - approx).norm() - best) <= 1e-4 * best
    assert (m - c.compress(m, generator=torch.Generator().manual_seed(1))).norm() >= best * (1 - 1e-9)


def test_context_draws_are_shared_by_parties_and_differ_by_layer_step_and_sender():
    """A receiver decoding rows of its choosing (with_senders) redraws the encoder's indices; a sub-layout of
    owned layers draws as the whole does (the layer id, not the position); another step, layer or sender
    draws differently."""
    c = saef.make_compressor("randk:0.25")
    layout = Layout([40, 40, 40])
    rows = torch.randn(3, 120)
    ctx = Context(5, 9, (0, 1, 2))
    payloads = c.encode_layers(rows, layout, ctx)
    dense = c.decode_layers(payloads, layout, ctx.with_senders((0, 1, 2)))
    assert torch.equal(dense, c.decode_layers(payloads, layout, Context(5, 9, (0, 1, 2))))
    sub = layout.subset([2])
    assert torch.equal(c.decode_layers([payloads[2]], sub, ctx), dense[:, 80:])
    kept = [set(torch.nonzero(dense[r, s]).flatten().tolist()) for r in range(3) for s in layout.slices]
    assert len({frozenset(k) for k in kept}) == len(kept)  # 9 different draws (3 senders x 3 layers)
    other = c.decode_layers(c.encode_layers(rows, layout, Context(5, 10, (0, 1, 2))), layout, Context(5, 10, (0, 1, 2)))
    assert not torch.equal((other != 0), (dense != 0))
    server = Context(5, 9, (SERVER,))
    assert not torch.equal(c.decode_layers(c.encode_layers(rows[:1], layout, server), layout, server) != 0, dense[:1] != 0)


def test_randk_decode_without_the_draws_is_refused():
    c = saef.make_compressor("randk:0.5")
    payload = c.encode(torch.randn(10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator="):
        c.decode(payload, (10,))
    with pytest.raises(ValueError, match="context="):
        c.encode_layers(torch.randn(1, 10), Layout([10]))


@pytest.mark.parametrize("spec", ["natural:bf16", "randk", "randk:2", "randk:0.1:biased", "qsgd:0", "qsgd:1.5",
                                  "powersgd:0", "powersgd:x", "topk:0.1:bf16:fp16", "identity:fp8"])
def test_bad_specs_name_the_problem(spec):
    with pytest.raises(ValueError, match=r"randk|qsgd|powersgd|natural|already|unknown|bf16"):
        saef.make_compressor(spec)


def test_unbiased_compressors_have_no_delta():
    for spec in ("qsgd:4", "natural", "randk:0.1:unbiased"):
        with pytest.raises(ValueError, match="unbiased"):
            saef.make_compressor(spec).delta(10)
