"""The compressors of the communicate-rarely regime: top-k per chunk (topk:RHO:chunk=N) and low-bit values
(SPEC:int8 / int4 / int2, nearest or stochastic rounding): payload sizes against their formulas, round
trips against definitions written out here, unbiasedness by Monte Carlo where it is claimed, and the
algorithm running over them."""

import math

import pytest
import torch

import saef
from saef.compress import Context, Layout, payload_bits
from saef.compress.lowbit import CHUNK


def per_chunk_topk(v, rho, n):
    """The definition: each chunk of n entries keeps its max(1, floor(rho n)) largest magnitudes."""
    out = torch.zeros_like(v)
    k = max(1, math.floor(rho * min(n, v.numel())))
    n = min(n, v.numel())
    for start in range(0, v.numel(), n):
        part = v[start:start + n]
        keep = part.abs().topk(min(k, part.numel())).indices
        out[start + keep] = part[keep]
    return out


@pytest.mark.parametrize("d,rho,chunk", [(10000, 0.01, 4096), (1000, 0.05, 64), (7, 0.3, 64), (130, 0.02, 64), (65, 0.5, 2)])
def test_chunked_topk_keeps_each_chunks_largest_and_counts_its_bits(d, rho, chunk):
    """C(v) is the per-chunk top-k of the definition (ties aside: random values), for layers smaller than a
    chunk and with a short last chunk; bits = 32 C k values + C k indices of ceil(log2 n) bits, in whole bytes."""
    torch.manual_seed(d)
    v = torch.randn(d)
    c = saef.make_compressor(f"topk:{rho}:chunk={chunk}")
    assert c.name == f"topk:{rho:g}:chunk={chunk}"
    assert torch.equal(c.compress(v), per_chunk_topk(v, rho, chunk))
    n = min(chunk, d)
    chunks, k = math.ceil(d / n), max(1, math.floor(rho * n))
    assert payload_bits(c.encode(v)) == 32 * chunks * k + 8 * math.ceil(chunks * k * max(1, (n - 1).bit_length()) / 8)
    assert c.delta(d) == k / n


def test_a_short_last_chunk_with_fewer_entries_than_k_loses_nothing():
    """d = 70, chunks of 64 keeping 16: the last chunk has 6 entries, all kept, and no padding leaks out."""
    v = torch.randn(70)
    out = saef.make_compressor("topk:0.25:chunk=64").compress(v)
    assert torch.equal(out[64:], v[64:]) and (out[:64] != 0).sum() == 16


def lowbit_definition(values, bits):
    """Nearest rounding to 2^(bits-1) - 1 symmetric levels of each chunk's largest magnitude."""
    q = (1 << (bits - 1)) - 1
    out = torch.empty_like(values)
    for start in range(0, values.numel(), CHUNK):
        part = values[start:start + CHUNK]
        scale = part.abs().max() / q
        out[start:start + CHUNK] = torch.round(part / scale) * scale if scale > 0 else 0
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("inner", ["identity", "topk:0.1"])
def test_low_bit_values_round_to_the_nearest_level_and_count_their_bits(bits, inner):
    """SPEC:intB rounds the inner compressor's values to the nearest of 2^(B-1) - 1 levels per chunk of 64
    (allclose 1e-6 to the definition); bits = B per value (whole bytes) + 32 per chunk scale + 32 per shape
    dimension, in place of 32 per value; the indices of top-k are sent as they were."""
    torch.manual_seed(bits)
    v = torch.randn(1000) * torch.logspace(-3, 1, 1000)
    c = saef.make_compressor(f"{inner}:int{bits}")
    plain = saef.make_compressor(inner)
    values = plain.encode(v)[0]
    n = values.numel()
    expected = plain.decode((lowbit_definition(values.reshape(-1), bits).reshape(values.shape), *plain.encode(v)[1:]), v.shape)
    assert torch.allclose(c.compress(v), expected, rtol=0, atol=1e-6)
    wire = 8 * math.ceil(n * bits / 8) + 32 * math.ceil(n / CHUNK) + 32 * (values.dim() - 1)
    assert payload_bits(c.encode(v)) == payload_bits(plain.encode(v)) - 32 * n + wire
    assert not c.unbiased and not c.random


@pytest.mark.parametrize("spec,claim", [("identity:int2sr", True), ("randk:0.25:unbiased:int4sr", True),
                                        ("identity:int2", False), ("topk:0.5:int8sr", False)])
def test_low_bit_unbiasedness_is_what_the_compressor_says(spec, claim):
    """unbiased is claimed for stochastic rounding of an unbiased compressor only. Where claimed, the mean of
    4000 draws is v: every coordinate within Hoeffding's bound for the width of its possible values
    (failure probability 1e-9 per coordinate). Nearest rounding is deterministic, and its bias is visible."""
    torch.manual_seed(0)
    v = torch.randn(40) * torch.logspace(-2, 1, 40)
    c = saef.make_compressor(spec)
    assert c.unbiased == claim
    if not claim:  # nearest rounding: the same every time, whatever the generator
        assert torch.equal(c.compress(v, generator=torch.Generator().manual_seed(1)), c.compress(v, generator=torch.Generator().manual_seed(2))) \
            or c.random
        return
    n = 4000
    draws = torch.stack([c.compress(v, generator=torch.Generator().manual_seed(i)) for i in range(n)]).double()
    # a value is one of two levels a scale apart, times d / k for rand-k: the width of what one draw can be
    widest = v.abs().max().item() * (4 if "randk" in spec else 1) * 2
    tolerance = widest * math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert ((draws.mean(0) - v.double()).abs() <= tolerance).all()


def test_stochastic_rounding_is_reproducible_from_the_context():
    """The rounding's draws come from the step's context: the same (seed, step, layer, sender) gives the same
    payload, another step another; the receiver decodes without them."""
    c = saef.make_compressor("topk:0.2:chunk=16:int2sr")
    layout = Layout([40, 24])
    rows = torch.randn(2, 64)
    a = c.encode_layers(rows, layout, context=Context(7, 3, (0, 1)))
    b = c.encode_layers(rows, layout, context=Context(7, 3, (0, 1)))
    other = c.encode_layers(rows, layout, context=Context(7, 4, (0, 1)))
    assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    assert not all(torch.equal(x, y) for p, q in zip(a, other) for x, y in zip(p, q))
    decoded = c.decode_layers(a, layout, context=Context(7, 3, (0, 1)))
    assert decoded.shape == (2, 64) and torch.equal(decoded, c.decode_layers(a, layout))


@pytest.mark.parametrize("spec", ["topk:0.1:chunk=16", "topk:0.1:chunk=16:int2", "identity:int8sr", "sign:int4", "dcttopk:0.25:chunk=8"])
def test_the_algorithm_runs_over_the_new_compressors(spec):
    """EF / direct over each of them trains a quadratic (the residual falls below a fifth: EF at lr 0.05, which
    1 kept entry in 16 allows; at lr 0.1 with momentum 0.5 EF diverges here, as with plain top-k keeping 2 of
    30), and the in-place layer methods
    the step uses give what the dense decode gives."""
    from saef.core import flatten

    g = torch.Generator().manual_seed(0)
    target = [torch.randn(5, 6, generator=g), torch.randn(9, generator=g)]
    method = "direct" if spec.endswith("sr") else "ef"
    x = saef.simulate(lambda k, x: [xi - t for xi, t in zip(x, target)], [torch.zeros(5, 6), torch.zeros(9)], workers=2,
                      steps=600, lr=0.05, method=method, compressor=spec)
    assert (flatten(x) - flatten(target)).norm() < 0.2 * flatten(target).norm()
    c = saef.make_compressor(spec)
    layout = Layout([30, 9])
    rows = torch.randn(3, 39)
    context = Context(0, 0, (0, 1, 2))
    payloads = c.encode_layers(rows, layout, **c.context_args(context))
    dense = c.decode_layers(payloads, layout, **c.context_args(context))
    target_rows = torch.randn(3, 39)
    assert torch.allclose(c.subtract_decoded(payloads, layout, target_rows.clone(), **c.context_args(context)), target_rows - dense)
    assert torch.allclose(c.decode_mean_layers(payloads, layout, **c.context_args(context)), dense.mean(0), atol=1e-6)


@pytest.mark.parametrize("spec,message", [("topk:0.1:chunk=1", "chunk must be an integer >= 2"),
                                          ("topk:0.1:chunks=8", "only be chunk=N"), ("topk:0.1:chunk=x", "chunk size"),
                                          ("sign:int3", "takes no argument|int8, :int4"),
                                          ("topk:0.1:bf16:int8", "already has a value precision")])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        saef.make_compressor(spec)


@pytest.mark.parametrize("d,rho,chunk", [(1000, 0.1, 64), (70, 0.25, 64), (5, 0.5, 64), (300, 0.05, 128)])
def test_dct_topk_keeps_each_chunks_largest_coefficients(d, rho, chunk):
    """dcttopk:RHO:chunk=N: each chunk (the last zero-padded) is rotated by the orthonormal DCT-II -- scipy's
    dct(norm="ortho") --, keeps its k largest coefficients and is rotated back (allclose 1e-5 to that
    definition); ||C(v) - v||^2 <= (1 - k/n) ||v||^2; the payload is top-k per chunk's over the coefficients."""
    from scipy.fft import dct, idct

    torch.manual_seed(d)
    v = torch.randn(d, dtype=torch.float64)
    c = saef.make_compressor(f"dcttopk:{rho}:chunk={chunk}")
    n = min(chunk, d)
    chunks, k = math.ceil(d / n), max(1, math.floor(rho * n))
    padded = torch.zeros(chunks * n, dtype=torch.float64)
    padded[:d] = v
    want = []
    for part in padded.view(chunks, n).numpy():
        coefficients = dct(part, norm="ortho")
        keep = abs(coefficients).argsort()[-k:]
        kept = coefficients * 0
        kept[keep] = coefficients[keep]
        want.append(torch.from_numpy(idct(kept, norm="ortho")))
    want = torch.cat(want)[:d]
    got = c.compress(v)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert (got - v).square().sum() <= (1 - k / n) * v.square().sum() + 1e-9
    assert payload_bits(c.encode(v.float())) == 32 * chunks * k + 8 * math.ceil(chunks * k * max(1, (n - 1).bit_length()) / 8)


def test_dct_topk_compacts_a_smooth_signal():
    """On a smooth signal (a slow sine) the DCT puts the energy in few coefficients: keeping 1 in 16 leaves a
    far smaller error than top-k per chunk at the same payload."""
    v = torch.sin(torch.linspace(0, 6, 4096)) + 0.01 * torch.randn(4096, generator=torch.Generator().manual_seed(0))
    dct_error = (saef.make_compressor("dcttopk:0.0625:chunk=64").compress(v) - v).norm()
    plain_error = (saef.make_compressor("topk:0.0625:chunk=64").compress(v) - v).norm()
    assert dct_error < 0.2 * plain_error
