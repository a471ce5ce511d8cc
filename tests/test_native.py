"""The compiled encoders (saef.compress._native) against the numpy and torch kernels, and their edge cases."""

import numpy as np
import pytest
import torch

import saef
from saef.compress import indexcode, kernels, packing
from saef.compress import Layout

pytestmark = pytest.mark.skipif(kernels.NATIVE is None, reason="saef.compress._native was not built (no C compiler at install)")


def on_path(path, monkeypatch, method, *args):
    """``method(*args)`` on one kernel path: native, numpy or torch."""
    monkeypatch.setattr(kernels, "USE_NATIVE", path == "native")
    monkeypatch.setattr(kernels, "USE_NUMPY", path != "torch")
    try:
        return method(*args)
    finally:
        monkeypatch.setattr(kernels, "USE_NATIVE", True)
        monkeypatch.setattr(kernels, "USE_NUMPY", True)


def encode_with(path, c, v, layout, monkeypatch):
    return on_path(path, monkeypatch, c.encode_layers, v, layout)


def decode_with(path, c, payloads, layout, monkeypatch):
    return on_path(path, monkeypatch, c.decode_layers, payloads, layout)


LAYOUTS = [[1000], [125, 25, 3125, 1, 7, 8, 9], [0, 16, 0, 3], [70000, 13], [200003, 2048, 5]]


@pytest.mark.parametrize("sizes", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 3])
def test_native_sign_equals_numpy_and_torch(sizes, dtype, rows, monkeypatch):
    """Same bytes for the signs (sign(0) = sign(-0) = +1), scales equal to rounding, and the numpy and
    torch decoders read the compiled payload. The compiled scale is within 1e-6 of the float64 mean of |v|; the
    layer-wise float32 sums of the numpy and torch paths (index_add_, one running sum per layer) drift
    by ~3e-6 on 70,000 entries and ~1e-5 on 200,003."""
    c, layout = saef.make_compressor("sign"), Layout(sizes)
    v = torch.randn(rows, layout.total, dtype=dtype, generator=torch.Generator().manual_seed(3))
    v[0, : min(4, layout.total)] = torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=dtype)[: min(4, layout.total)]
    exact = [v[:, s].double().abs().mean(dim=1) if s.stop > s.start else torch.zeros(rows, dtype=torch.float64)
             for s in layout.slices]
    native = encode_with("native", c, v, layout, monkeypatch)
    for (_, scale), reference in zip(native, exact):
        assert scale.dtype == dtype and torch.allclose(scale.double(), reference, rtol=1e-6, atol=0)
    for path in ("numpy", "torch"):
        other = encode_with(path, c, v, layout, monkeypatch)
        for (bits, scale), (bits_o, scale_o) in zip(native, other):
            assert torch.equal(bits, bits_o)
            assert scale.shape == scale_o.shape and scale_o.dtype == dtype
            assert torch.allclose(scale, scale_o, rtol=1e-4, atol=0)
        dense = decode_with(path, c, native, layout, monkeypatch)
        assert torch.allclose(dense, decode_with(path, c, other, layout, monkeypatch), rtol=1e-4, atol=0)


@pytest.mark.parametrize("sizes", LAYOUTS)
@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.3", "topk:1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_topk_equals_numpy_and_torch(sizes, spec, dtype, monkeypatch):
    """The same kept entries (distinct magnitudes, so the set is unique) in the same payload bytes: every
    path writes the entries in index order, coded or explicit as (d, k) says. Every decoder reads every
    path's payload back exactly."""
    c, layout = saef.make_compressor(spec), Layout(sizes)
    v = torch.randn(2, layout.total, dtype=dtype, generator=torch.Generator().manual_seed(4))
    native = encode_with("native", c, v, layout, monkeypatch)
    expected = decode_with("torch", c, encode_with("torch", c, v, layout, monkeypatch), layout, monkeypatch)
    for path in ("native", "numpy", "torch"):
        other = encode_with(path, c, v, layout, monkeypatch)
        assert all(torch.equal(a, b) for p, q in zip(native, other) for a, b in zip(p, q))
        assert torch.equal(decode_with(path, c, native, layout, monkeypatch), expected)
        singles = [on_path(path, monkeypatch, c.encode_rows, v[:, s].contiguous()) for s in layout.slices]
        assert all(torch.equal(a, b) for p, q in zip(native, singles) for a, b in zip(p, q))  # one layer at a time too


def kept_set(c, v):
    values, idx = c.select(v.reshape(1, -1))
    assert torch.equal(values[0], v[idx[0]])  # the values are those at the indices
    dense = c.decode(c.encode(v), v.shape)  # the wire format carries the same choice
    assert torch.equal(dense, torch.zeros_like(v).index_put_((idx[0],), values[0]))
    return set(idx[0].tolist())


def true_top(v, k):
    return set(v.abs().topk(k).indices.tolist())


@pytest.mark.parametrize("d", [1000, 5000, 100_000, 1_000_003])
def test_native_topk_selects_the_largest(d):
    v = torch.randn(d, generator=torch.Generator().manual_seed(d))
    c = saef.make_compressor("topk:0.01")
    assert kept_set(c, v) == true_top(v, c.k(d))


def test_native_topk_unlucky_sample_falls_back_to_the_whole_row():
    """Every 32nd entry (the sample) is large: the sample's threshold admits fewer than k entries, so the
    whole row is ranked."""
    d = 200_000
    v = torch.rand(d, generator=torch.Generator().manual_seed(5))
    v[::32] += 10.0
    c = saef.make_compressor("topk:0.1")  # k = 20000 > the 6250 sampled entries
    assert kept_set(c, v) == true_top(v, c.k(d))


def test_native_topk_candidate_overflow_falls_back_to_the_whole_row():
    """The sample is small while the rest is large: nearly every entry passes the threshold, more than
    the candidate buffer holds."""
    d = 200_000
    v = torch.rand(d, generator=torch.Generator().manual_seed(6)) + 10.0
    v[::32] = torch.rand(len(v[::32]), generator=torch.Generator().manual_seed(7))
    c = saef.make_compressor("topk:0.01")
    assert kept_set(c, v) == true_top(v, c.k(d))


@pytest.mark.parametrize("nonzeros", [300, 1200])
def test_native_topk_mostly_zero_row(nonzeros):
    """A zero threshold (dead units, a fresh server error): with fewer than k nonzero entries all of them
    are kept, then zeros; with more, the largest k of them."""
    d = 100_000
    v = torch.zeros(d)
    nonzero = torch.randperm(d, generator=torch.Generator().manual_seed(8))[:nonzeros]
    v[nonzero] = torch.randn(nonzeros, generator=torch.Generator().manual_seed(9))
    c = saef.make_compressor("topk:0.01")  # k = 1000
    kept = kept_set(c, v)
    assert len(kept) == 1000
    if nonzeros < 1000:
        assert set(nonzero.tolist()) <= kept
    else:
        assert kept == true_top(v, 1000)


def test_native_topk_ties_and_nan():
    """Equal magnitudes: any k of them, distinct. NaN ranks above everything (as in numpy and torch), and
    the selection terminates."""
    d = 5000
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(10)).float() * 2 - 1
    c = saef.make_compressor("topk:0.01")
    kept = kept_set(c, signs)
    assert len(kept) == 50
    v = torch.randn(d, generator=torch.Generator().manual_seed(11))
    v[[3, 700, 4999]] = float("nan")
    values, idx = c.select(v.reshape(1, -1))
    assert {3, 700, 4999} <= set(idx[0].tolist()) and len(set(idx[0].tolist())) == 50


@pytest.mark.parametrize("spec", ["sign", "topk:0.05"])
def test_native_reads_strided_rows(spec):
    """A column block of a wider tensor (rows not adjacent) encodes as its contiguous copy does."""
    c = saef.make_compressor(spec)
    wide = torch.randn(3, 5000, generator=torch.Generator().manual_seed(12))
    block = wide[:, 100:3100]
    assert not block.is_contiguous() and kernels.native_stride(block) == 5000
    for a, b in zip(c.encode_rows(block), c.encode_rows(block.contiguous())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d", [2, 3, 255, 256, 257, 65537, 1 << 20])
def test_native_index_stream_round_trip(d):
    """The packed indices unpack to the kept indices, in index order, by the compiled and by the numpy
    unpacker, in the section of the documented size (Elias-Fano, or explicit where that is shorter)."""
    c = saef.make_compressor("topk:0.3")
    v = torch.randn(2, d, generator=torch.Generator().manual_seed(d))
    k = c.k(d)
    values, packed, local = kernels.native_topk_encode(v, k=k, indices=True)
    layers = kernels.one_layer(d, k)
    assert torch.equal(kernels.native_topk_indices(packed, layers), local)
    assert torch.equal(local, local.sort(dim=1).values) and torch.equal(values, v.gather(1, local))
    if indexcode.is_coded(d, k):
        assert np.array_equal(indexcode.decode(packed.numpy(), d, k), local.numpy())
    else:
        assert np.array_equal(packing.unpack_index_bits(packed.numpy(), k, kernels.index_bits(d)), local.numpy())
    assert packed.shape[1] == -(-indexcode.section_bits(d, k) // 8)


def test_native_rejects_mismatched_sizes():
    """The compiled kernels trust their sizes, so the wrappers check them first."""
    v = torch.randn(2, 100)
    with pytest.raises(ValueError, match="do not hold layers of 101 elements"):
        kernels.native_sign_encode(v, kernels.NativeLayers([50, 51]))
    with pytest.raises(ValueError, match="kept counts"):
        kernels.NativeLayers([10, 20], [11, 1])
    layers = kernels.NativeLayers([100], [10])
    with pytest.raises(ValueError, match="bytes per row"):
        kernels.native_topk_indices(torch.zeros(2, 3, dtype=torch.uint8), layers)
    assert kernels.native_sign_encode(torch.randn(2, 100, dtype=torch.float16)) is None  # not readable: None
    assert kernels.native_sign_encode(torch.randn(100, 2).t()) is None


def decode_all(c, payloads, layout, rows, dtype):
    """decode_layers, decode_layers_into, subtract_decoded and decode_mean_layers on the current path."""
    into = torch.full((rows, layout.total), float("nan"), dtype=dtype)
    c.decode_layers_into(payloads, layout, into)
    target = torch.linspace(-1, 1, rows * layout.total, dtype=dtype).view(rows, layout.total)
    c.subtract_decoded(payloads, layout, target)
    return c.decode_layers(payloads, layout), into, target, c.decode_mean_layers(payloads, layout).clone()


@pytest.mark.parametrize("sizes", LAYOUTS)
@pytest.mark.parametrize("spec", ["sign", "topk:0.01", "topk:0.3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 3])
def test_native_decoders_equal_the_torch_decoders(sizes, spec, dtype, rows, monkeypatch):
    """Decode, decode into a buffer, subtract (the error update) and the server mean give exactly what the
    torch kernels give (the mean to rounding: its additions may run in another order)."""
    c, layout = saef.make_compressor(spec), Layout(sizes)
    v = torch.randn(rows, layout.total, dtype=dtype, generator=torch.Generator().manual_seed(13))
    payloads = c.encode_layers(v, layout)
    native = decode_all(c, payloads, layout, rows, dtype)
    monkeypatch.setattr(kernels, "USE_NUMPY", False)
    reference = decode_all(c, payloads, layout, rows, dtype)
    monkeypatch.setattr(kernels, "USE_NUMPY", True)
    for a, b in zip(native[:3], reference[:3]):
        assert a.dtype == dtype and torch.equal(a, b)
    assert torch.allclose(native[3], reference[3], rtol=1e-6, atol=1e-6)
    assert torch.allclose(native[3], reference[0].mean(dim=0), rtol=1e-6, atol=1e-6)
    if spec != "sign":  # the scatter of the numpy path adds the rows in the same order: bit-identical
        monkeypatch.setattr(kernels, "USE_NATIVE", False)
        assert torch.equal(native[3], c.decode_mean_layers(payloads, layout))


def test_native_decoders_write_into_a_row_of_a_larger_buffer():
    """The distributed downlink decodes straight into a slice of its update vector."""
    c, layout = saef.make_compressor("topk:0.1"), Layout([300, 20])
    v = torch.randn(1, layout.total, generator=torch.Generator().manual_seed(14))
    update = torch.full((1000,), 7.0)
    c.decode_layers_into(c.encode_layers(v, layout), layout, update[100:420].unsqueeze(0))
    assert torch.equal(update[100:400], c.compress_rows(v[:, :300])[0])
    assert torch.equal(update[400:420], c.compress_rows(v[:, 300:])[0])
    assert bool((update[:100] == 7).all() and (update[420:] == 7).all())


def test_native_topk_decode_rejects_an_index_beyond_its_layer_and_writes_nothing():
    c = saef.make_compressor("topk:0.34")  # d = 3, k = 1: one explicit index of 2 bits (the code needs 4)
    assert not indexcode.is_coded(3, 1)
    packed = torch.from_numpy(packing.pack_index_bits(np.array([[3]]), 2))
    target = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="beyond its layer size"):
        c.subtract_decoded([(torch.ones(1, 1), packed)], Layout([3]), target)
    assert bool((target == 0).all())


@pytest.mark.parametrize("corrupt", ["extra set bit", "missing set bit", "index beyond d", "repeated index"])
def test_native_topk_decode_rejects_a_corrupt_code_and_writes_nothing(corrupt):
    """d = 100, k = 5: the indices in Elias-Fano (4 low bits each, a 12-bit high vector). A high vector
    with another number of set bits, or one that decodes to an index >= d or to indices not increasing,
    is refused before anything is written."""
    c, d, k = saef.make_compressor("topk:0.05"), 100, 5
    assert indexcode.is_coded(d, k) and indexcode.low_bits(d, k) == 4
    idx = {"index beyond d": [[1, 2, 3, 4, 99]]}.get(corrupt, [[1, 2, 3, 4, 90]])
    packed = indexcode.encode(np.array(idx), d)
    bits = np.unpackbits(packed, bitorder="little")
    high = np.flatnonzero(bits[20:32]) + 20
    if corrupt == "extra set bit":
        bits[[b for b in range(20, 32) if b not in high][0]] = 1
    elif corrupt == "missing set bit":
        bits[high[-1]] = 0
    elif corrupt == "index beyond d":  # 99 = 6 << 4 | 3: its low bits raised to 15 give 111
        bits[16:20] = 1
    else:  # the low bits of the second index made equal to the first's (both in high part 0)
        bits[4:8] = bits[0:4]
    target = torch.zeros(1, d)
    with pytest.raises(ValueError, match="corrupt|set bits|increasing|beyond"):
        c.subtract_decoded([(torch.ones(1, k), torch.from_numpy(np.packbits(bits, bitorder="little")[None]))], Layout([d]), target)
    assert bool((target == 0).all())


def test_native_decoders_refuse_rows_that_share_memory():
    """An expanded buffer (rows on the same memory) is left to torch, which refuses to write it."""
    layers = kernels.NativeLayers([100])
    packed, scales = kernels.native_sign_encode(torch.randn(2, 100), layers)
    shared = torch.zeros(1, 100).expand(2, 100)
    assert not kernels.native_sign_decode(packed, scales, layers, shared, "subtract")
    assert bool((shared == 0).all())


def test_native_leaves_unsafe_inputs_to_the_checked_paths():
    """Negative layer sizes are refused before any kernel walks them; a lazily negated view encodes by its
    values, not its memory; buffers that autograd guards are left to torch's checked in-place ops."""
    with pytest.raises(ValueError, match="layer sizes must be >= 0"):
        Layout([-8, 16])
    with pytest.raises(ValueError, match="layer sizes must be >= 0"):
        kernels.NativeLayers([-8, 16])
    c = saef.make_compressor("sign")
    negated = torch.tensor([[1 + 2j], [3 - 4j], [5 + 0.5j]]).conj().imag  # [[-2], [4], [-0.5]], negative bit set
    assert negated.is_neg()
    assert torch.equal(c.encode_rows(negated)[0], c.encode_rows(negated.resolve_neg())[0])
    layout = Layout([6])
    payloads = c.encode_layers(torch.randn(1, 6), layout)
    leaf = torch.zeros(1, 6, requires_grad=True)  # written silently if the compiled decoder took it
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        c.decode_layers_into(payloads, layout, leaf)
    with torch.inference_mode():
        frozen = torch.zeros(1, 6)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        c.subtract_decoded(payloads, layout, frozen)
    plain = torch.zeros(1, 6)
    version = plain._version
    c.subtract_decoded(payloads, layout, plain)  # compiled: the version counter moves as for sub_
    assert plain._version > version and torch.equal(plain, -c.decode_layers(payloads, layout))


def test_native_topk_plan_is_per_compressor_class():
    class KeepTwo(saef.compress.TopK):
        def k(self, d):
            return 2

    layout = Layout([10, 10])
    v = torch.randn(1, 20, generator=torch.Generator().manual_seed(15))
    saef.compress.TopK(0.1).encode_layers(v, layout)  # same rho, same layout, cached first
    assert [p[0].shape[1] for p in KeepTwo(0.1).encode_layers(v, layout)] == [2, 2]
