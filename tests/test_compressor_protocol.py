"""The compressor protocol: a compressor that writes only the two required row methods runs through the
algorithm's step and the simulator; and what the flags of a wrapped compressor claim is true."""

import pytest
import torch

import saef
from saef.compress import Compressor, payload_bits


class EveryOther(Compressor):
    """Keeps the entries at even positions: only ``encode_rows``, ``decode_rows`` and ``name``."""

    name = "every-other"

    def encode_rows(self, rows):
        return (rows[:, ::2].clone(),)

    def decode_rows(self, payload, d):
        out = payload[0].new_zeros(payload[0].shape[0], d)
        out[:, ::2] = payload[0]
        return out


def _keep_even(v):
    out = torch.zeros_like(v)
    out[..., ::2] = v[..., ::2]
    return out


SHAPES = [(3, 4), (5,)]
TARGETS = [torch.linspace(-1, 1, 17, dtype=torch.float64), torch.linspace(2, -2, 17, dtype=torch.float64)]


def _grad(k, x):
    """Worker k's gradient of 0.5 ||x - target_k||^2 at the layers ``x``."""
    flat = torch.cat([t.reshape(-1) for t in x])
    g = flat - TARGETS[k]
    return [g[:12].view(3, 4), g[12:]]


def test_a_compressor_of_two_row_methods_runs_algorithm_1_in_the_simulator():
    """saef.simulate with EveryOther (EF, double-way, momentum 0.9, K = 2) gives the x_T of Algorithm 1
    written out here with the same C layer by layer (float64, to rounding)."""
    x0 = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    got = saef.simulate(_grad, x0, workers=2, steps=20, lr=0.1, method="ef", compressor=EveryOther(),
                        momentum=0.9, double_way=True)
    compress = lambda v: torch.cat([_keep_even(v[..., :12]), _keep_even(v[..., 12:])], dim=-1)  # noqa: E731
    x = torch.zeros(17, dtype=torch.float64)
    momentum, error, server_error = torch.zeros(2, 17, dtype=torch.float64), torch.zeros(2, 17, dtype=torch.float64), torch.zeros(17, dtype=torch.float64)
    for _ in range(20):
        grads = torch.stack([torch.cat([g.reshape(-1) for g in _grad(k, [x[:12].view(3, 4), x[12:]])]) for k in range(2)])
        momentum = 0.9 * momentum + grads
        delta = error + 0.1 * momentum
        sent = compress(delta)
        error = delta - sent
        server_delta = server_error + sent.mean(0)
        applied = compress(server_delta)
        server_error = server_delta - applied
        x = x - applied
    assert torch.allclose(torch.cat([t.reshape(-1) for t in got]), x, rtol=0, atol=1e-12)


def test_a_compressor_of_two_row_methods_keeps_the_error_feedback_invariant_and_its_bits():
    """One Algorithm step over InProcessTransport with EveryOther: every worker's D_k equals what it
    sent plus its new error (e_k = D_k - C(D_k)), and the bits counted are those of its payload
    (32 bits for each kept fp32 entry: 6 of layer (3, 4) and 3 of layer (5,))."""
    config = saef.AlgorithmConfig(method="saef", compressor=EveryOther(), momentum=0.0)
    ef = saef.Algorithm(SHAPES, config, saef.InProcessTransport(2))
    x = torch.zeros(17)
    state = ef.init_state(x)
    grads = torch.randn(2, 17, generator=torch.Generator().manual_seed(0))
    ef.step(state, x, grads, lr=0.5)
    delta = 0.5 * grads  # e_k was 0: D_k = lr m_k = lr g_k
    sent = torch.cat([_keep_even(delta[:, :12]), _keep_even(delta[:, 12:])], dim=1)
    assert torch.equal(state.worker_error, delta - sent)
    assert ef.transport.ledger.per_worker()["bits_up"] == payload_bits(EveryOther().encode(torch.zeros(12))) + 3 * 32 == 9 * 32


@pytest.mark.parametrize("spec", ["qsgd:4", "randk:0.5:unbiased"])
@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_a_16_bit_suffix_on_an_unbiased_compressor_is_not_unbiased(spec, wire):
    """Rounding to nearest biases an unbiased compressor, and the wrapper says so: the inner compressor
    reports unbiased, SPEC:bf16/fp16 does not. The bias is real: rand-k (rho 1/2, scaled by 2) of 16 equal
    values 1 + 2^-12 sums exactly to the input's sum in every draw, while its 16-bit payload rounds every kept
    2 + 2^-11 to 2, so every draw sums to 16 -- short of the input's sum by 2^-8."""
    inner, wrapped = saef.make_compressor(spec), saef.make_compressor(f"{spec}:{wire}")
    assert inner.unbiased and not wrapped.unbiased
    with pytest.raises(ValueError, match="not contractive"):
        wrapped.delta(16)
    v = torch.full((16,), 1 + 2.0**-12)
    randk, randk16 = saef.make_compressor("randk:0.5:unbiased"), saef.make_compressor(f"randk:0.5:unbiased:{wire}")
    for seed in range(5):
        assert randk.compress(v, torch.Generator().manual_seed(seed)).sum() == v.sum()
        assert randk16.compress(v, torch.Generator().manual_seed(seed)).sum() == 16.0 != v.sum()
