"""Compressor properties, checked for every registered compressor."""

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saef

sys.path.insert(0, str(Path(__file__).parent))
from _strategies import tensors, topk_index_bits  # noqa: E402
from saef.compress import TopK, index_bits, indexcode, pack_bits, payload_bits, unpack_bits

SPECS = ["identity", "sign", "topk:0.01", "topk:0.1", "topk:0.5", "topk:1"]  # topk:1 warns (pointless) but must work


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=150, deadline=None)
@given(v=tensors())
def test_decode_of_encode_equals_compress(spec, v):
    """decode(encode(v)) is exactly the dense C(v), which is finite and has v's shape and dtype."""
    c = saef.make_compressor(spec)
    dense = c.compress(v)
    assert dense.shape == v.shape and dense.dtype == v.dtype
    assert torch.equal(c.decode(c.encode(v), v.shape), dense)
    assert torch.isfinite(dense).all()


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=150, deadline=None)
@given(v=tensors())
def test_delta_approximation(spec, v):
    """||C(v) - v||^2 <= (1 - delta) ||v||^2 with the documented delta (1, 1/d, k/d)."""
    c = saef.make_compressor(spec)
    d = v.numel()
    v64 = v.double()
    err = (c.compress(v).double() - v64).square().sum().item()
    bound = (1 - c.delta(d)) * v64.square().sum().item()
    assert err <= bound * (1 + 1e-5) + 1e-300


@settings(max_examples=150, deadline=None)
@given(v=tensors(), rho=st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0]))
def test_topk_keeps_exactly_k_largest(v, rho):
    """Top-k sends k = max(1, floor(rho d)) distinct indices, and they hold the k largest magnitudes."""
    c = TopK(rho)
    d = v.numel()
    values, packed = c.encode(v)
    k = values.shape[1]
    assert k == (0 if d == 0 else max(1, math.floor(round(rho * d, 9))))
    if d == 0:
        return
    b = index_bits(d)
    if indexcode.is_coded(d, k):
        idx = torch.from_numpy(indexcode.decode(packed.numpy(), d, k))[0]
    else:
        idx = (unpack_bits(packed, k * b).view(k, b).long() << torch.arange(b)).sum(-1) if b else torch.zeros(k, dtype=torch.long)
    assert len(set(idx.tolist())) == k
    assert idx.tolist() == sorted(idx.tolist())  # the kept entries in index order
    flat = v.reshape(-1)
    kept = flat.abs()[idx]
    rest = torch.ones(d, dtype=torch.bool)
    rest[idx] = False
    if rest.any():
        assert kept.min() >= flat.abs()[rest].max()
    assert torch.equal(values[0], flat[idx])


@pytest.mark.parametrize("d", [0, 1, 7, 8, 9, 256, 257, 1000, 70000])
def test_bits_match_payload_size_and_format(d):
    """The reported bits are the payload's real size and equal the documented formula."""
    v = torch.randn(d)
    for spec in ["identity", "sign", "topk:0.01"]:
        c = saef.make_compressor(spec)
        payload = c.encode(v)
        real = sum(t.numel() * t.element_size() * 8 for t in payload)
        assert c.bits(payload) == real == payload_bits(payload)
    assert saef.make_compressor("identity").bits(saef.make_compressor("identity").encode(v)) == 32 * d
    assert saef.make_compressor("sign").bits(saef.make_compressor("sign").encode(v)) == 8 * math.ceil(d / 8) + 32
    top = TopK(0.01)
    k = top.k(d)
    assert top.bits(top.encode(v)) == 32 * k + topk_index_bits(d, k)


def test_sign_of_zero_is_plus_one_and_scale_is_mean_abs():
    """Scaled sign by hand: v = (0, -3, 1, 2) -> scale 6/4 = 1.5, C(v) = (1.5, -1.5, 1.5, 1.5)."""
    c = saef.make_compressor("sign")
    assert torch.equal(c.compress(torch.tensor([0.0, -3.0, 1.0, 2.0])), torch.tensor([1.5, -1.5, 1.5, 1.5]))


def test_pack_bits_layout():
    """Bit i of byte j holds element 8j + i; unpacking restores the bits."""
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.tolist() == [[129, 1]]
    assert torch.equal(unpack_bits(packed, 9), bits)


def test_rows_equal_single_tensor_calls():
    """Compressing W rows at once equals compressing each row on its own."""
    rows = torch.randn(5, 333)
    for spec in SPECS:
        c = saef.make_compressor(spec)
        together = c.compress_rows(rows)
        for w in range(5):
            assert torch.equal(together[w], c.compress(rows[w]))


@pytest.mark.parametrize("spec", ["topk:0", "topk:-0.1", "topk:1.5", "topk:2", "topk:nan", "topk:abc", "nope", "sign:3"])
def test_bad_compressor_specs_raise(spec):
    """Bad specs raise ValueError naming the problem (rho and its range, or the unknown name)."""
    with pytest.raises(ValueError) as info:
        saef.make_compressor(spec)
    msg = str(info.value)
    assert ("rho" in msg and "(0, 1]" in msg) or "compressor" in msg


def test_registry_accepts_user_compressors():
    """A user-registered compressor is built from its name and used by the algorithm."""

    class Halve(saef.compress.Compressor):
        name = "halve"

        def encode_rows(self, rows):
            return (rows / 2,)

        def decode_rows(self, payload, d):
            return payload[0]

        def delta(self, d):
            return 0.75

    saef.register_compressor("halve", Halve, overwrite=True)
    assert "halve" in saef.available_compressors()
    x = saef.simulate(lambda k, x: [torch.ones(3)], [torch.zeros(3)], workers=2, steps=1, lr=1.0, compressor="halve", double_way=False)
    assert torch.equal(x[0], torch.full((3,), -0.5))
    with pytest.raises(ValueError, match="already registered"):
        saef.register_compressor("halve", Halve)


@pytest.mark.parametrize("sizes", [[125, 25, 3125, 1, 7, 8, 9], [16, 24, 8, 10], [64, 3], [25, 300, 25, 1, 300, 25, 1, 2]])
@pytest.mark.parametrize("spec", ["identity", "sign", "topk:0.1", "topk:0.01", "topk:0.5"])
def test_layer_batched_path_equals_per_layer(spec, sizes):
    """Compressing all layers of a flat (W, P) tensor at once gives each layer's payload exactly as
    encode_rows does (scales to rounding), and decodes to the same dense values."""
    c = saef.make_compressor(spec)
    layout = saef.compress.Layout(sizes)
    rows = torch.randn(3, layout.total, generator=torch.Generator().manual_seed(0))
    payloads = c.encode_layers(rows, layout)
    for payload, s in zip(payloads, layout.slices):
        single = c.encode_rows(rows[:, s])
        assert len(payload) == len(single)
        for a, b in zip(payload, single):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=0)  # scales: summed in another order
    dense = c.decode_layers(payloads, layout)
    assert torch.equal(dense, torch.cat([c.decode_rows(p, d) for p, d in zip(payloads, sizes)], dim=1))


def test_fast_bit_packing_equals_the_definition():
    """The multiply-based packing equals bit i of byte j = element 8j + i, for every length."""
    for n in range(0, 70):
        bits = torch.rand(2, n) > 0.5
        packed = pack_bits(bits)
        expected = torch.zeros(2, -(-n // 8), dtype=torch.uint8)
        for j in range(n):
            expected[:, j // 8] |= bits[:, j].to(torch.uint8) << (j % 8)
        assert torch.equal(packed, expected), n


def test_pointless_settings_warn():
    """Legal but pointless settings warn: rho = 1 (no compression), p = 1 with a single worker."""
    with pytest.warns(UserWarning, match="keeps every entry"):
        saef.make_compressor("topk:1")
    with pytest.warns(UserWarning, match="does nothing"):
        saef.Algorithm([(3,)], saef.AlgorithmConfig(average_every=1), saef.InProcessTransport(1))


def test_largest_on_long_rows_equals_topk():
    """The sampled-threshold selection for long rows keeps exactly the k largest entries of every row, both
    when the sampled threshold admits enough candidates and when it does not (the fallback)."""
    from saef.compress import largest

    g = torch.Generator().manual_seed(0)
    d, k = 1 << 17, 1000
    rows = torch.rand(2, d, generator=g)
    rows[1, ::32] = torch.arange(d // 32, dtype=torch.float32) + 10.0  # sample far above the rest: too few candidates
    got = largest(rows, k)
    assert got.shape == (2, k)
    for row, idx in zip(rows, got):
        assert set(idx.tolist()) == set(row.topk(k).indices.tolist())


def test_largest_on_long_mostly_zero_rows():
    """Rows that are mostly exact zeros (dead ReLU units): the k largest are kept, with zeros filling up
    when fewer than k entries are positive."""
    from saef.compress import largest

    g = torch.Generator().manual_seed(0)
    d, k = 1 << 17, 1000
    rows = torch.zeros(2, d)
    rows[0, torch.randperm(d, generator=g)[:5000]] = torch.rand(5000, generator=g) + 0.1  # more than k positive
    rows[1, torch.randperm(d, generator=g)[:300]] = torch.rand(300, generator=g) + 0.1  # fewer than k positive
    got = largest(rows, k)
    for row, idx in zip(rows, got):
        assert len(set(idx.tolist())) == k
        kept = row[idx].sort(descending=True).values
        assert torch.equal(kept, row.topk(k).values)  # the same multiset of values as torch.topk


@pytest.mark.parametrize("spec", ["identity", "sign", "topk:0.1"])
def test_decode_mean_equals_mean_of_decode(spec):
    """decode_mean_layers (the server's average) equals the mean over rows of decode_layers."""
    c = saef.make_compressor(spec)
    layout = saef.compress.Layout([25, 300, 25, 1, 7])
    payloads = c.encode_layers(torch.randn(3, layout.total, generator=torch.Generator().manual_seed(0)), layout)
    assert torch.allclose(c.decode_mean_layers(payloads, layout), c.decode_layers(payloads, layout).mean(dim=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sizes", [[125, 25, 3125, 1, 7, 8, 9], [16, 24, 8, 10], [70000, 13]])
@pytest.mark.parametrize("spec", ["identity", "sign", "topk:0.1", "topk:0.01"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_into_and_subtract_equal_the_dense_decode(spec, sizes, rows):
    """decode_layers_into writes exactly decode_layers into the given buffer; subtract_decoded (the error
    update) is exactly target - decode_layers; decode_mean_layers is the mean of the rows to rounding."""
    c = saef.make_compressor(spec)
    layout = saef.compress.Layout(sizes)
    v = torch.randn(rows, layout.total, generator=torch.Generator().manual_seed(1))
    payloads = c.encode_layers(v, layout)
    dense = c.decode_layers(payloads, layout)
    out = torch.full_like(v, float("nan"))
    assert c.decode_layers_into(payloads, layout, out) is out
    assert torch.equal(out, dense)
    target = v.clone()
    c.subtract_decoded(payloads, layout, target)
    assert torch.equal(target, v - dense)
    assert torch.allclose(c.decode_mean_layers(payloads, layout), dense.mean(dim=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", ["sign", "topk:0.01", "topk:0.3"])
@pytest.mark.parametrize("d", [1000, 70000, 200003])
def test_numpy_kernels_equal_the_torch_kernels(spec, d, monkeypatch):
    """On the CPU the compressors run numpy/BLAS kernels; the torch kernels (a GPU's path) give the same
    payload sizes and decode to the same values (sign bits exactly; scales and kept sets to rounding)."""
    c = saef.make_compressor(spec)
    layout = saef.compress.Layout([d, 37, 8])
    v = torch.randn(2, layout.total, generator=torch.Generator().manual_seed(2))
    v[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.0])  # sign(0) = sign(-0) = +1 on both paths
    fast = c.encode_layers(v, layout)
    monkeypatch.setattr(saef.compress.kernels, "USE_NUMPY", False)
    slow = c.encode_layers(v, layout)
    for a, b in zip(fast, slow):
        assert [t.shape for t in a] == [t.shape for t in b]
    if spec == "sign":
        assert all(torch.equal(a[0], b[0]) for a, b in zip(fast, slow))
    dense_slow = c.decode_layers(slow, layout)
    monkeypatch.setattr(saef.compress.kernels, "USE_NUMPY", True)
    assert torch.allclose(c.decode_layers(fast, layout), dense_slow, rtol=1e-5, atol=0)
