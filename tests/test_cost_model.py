"""The cost model's formulas (benchmarks/cost_model.py) against hand-computed values and the real payloads."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import cost_model as cm  # noqa: E402


def test_layer_lists_have_the_stated_sizes():
    """ResNet-50 has 25,557,032 parameters in 161 tensors; the 24-layer width-2048 decoder has
    24 (12 w^2 + 13 w) + (50257 + 2048) w + 2 w."""
    assert sum(map(cm.numel, cm.resnet50_shapes())) == 25_557_032
    assert len(cm.resnet50_shapes()) == 161
    w = 2048
    assert sum(map(cm.numel, cm.transformer_shapes())) == 24 * (12 * w * w + 13 * w) + (50257 + 2048) * w + 2 * w


@pytest.mark.parametrize("spec", ["sign", "topk:0.01", "topk:0.01:fp16", "topk:0.1", "topk:0.02:chunk=4096:int2",
                                  "topk:0.1:chunk=16", "topk:0.1:chunk=16:int4"])
def test_payload_bits_equal_the_compressors_payloads(spec):
    """The model's bit formulas give what saef's compressors really produce (coded top-k indices: the
    library's format; per chunk, with low-bit values), layer by layer, including a 1-element layer, sizes
    that are no multiple of 8 and a last chunk of one entry."""
    from saef.compress import Layout, make_compressor, payload_bits

    sizes = [1, 7, 8, 10, 1000, 4096, 4097, 100_003]
    templates = make_compressor(spec).payload_templates(Layout(sizes))
    parts = spec.split(":")
    if spec == "sign":
        expected = [cm.sign_bits(d) for d in sizes]
    elif "chunk=" in spec:
        chunk, low = int(parts[2].split("=")[1]), int(parts[3][3:]) if len(parts) > 3 else 0
        expected = [cm.chunked_topk_bits(d, float(parts[1]), chunk, 32, low) for d in sizes]
    else:
        rho, wire = float(spec.split(":")[1]), 16 if spec.endswith("fp16") else 32
        expected = [cm.topk_bits(d, rho, wire, "coded") for d in sizes]
    assert [payload_bits(t) for t in templates] == expected


def test_local_steps_pay_one_exchange_per_round():
    """With H local steps a step pays 1 / H of the exchange and none of it overlaps: DiLoCo H = 16 is DDP's
    all-reduce volume and latency over 16 on top of the whole compute; SAEF-LoCo's codec is paid per round too.
    By hand: the chunked top-k int2 payload of a 4096-entry layer at 2 % is 81 values: 168 bits of levels, 64 of
    scales, 32 of shape, 81 x 12 of indices."""
    work = cm.Workload("toy", [(64, 64), (4096,)], 0, 0.5, "")
    rates = {"topk:0.02:chunk=4096:int2": {"encode": 1e-9, "decode": 1e-9, "mean_1": 1e-9, "mean_row": 1e-9}}
    ddp = cm.scaled_step(work, "ddp-adamw-fp32", 8, 1e-5, rates, 1.0)
    diloco = cm.scaled_step(work, "diloco-h16", 8, 1e-5, rates, 1.0)
    assert diloco.overlap is None and diloco.fixed == 0.5
    assert diloco.volume == pytest.approx(ddp.volume / 16) and diloco.latency == pytest.approx(ddp.latency / 16)
    assert cm.chunked_topk_bits(4096, 0.02, 4096, 32, 2) == 168 + 64 + 32 + 8 * math.ceil(81 * 12 / 8)
    loco = cm.scaled_step(work, "saef-loco", 8, 1e-5, rates, 1.0)
    per_step = cm.VARIANTS["saef-loco"]
    every_step = cm.Variant(**{**per_step.__dict__, "local_steps": 1})
    cm.VARIANTS["_every_step"] = every_step
    try:
        once = cm.scaled_step(work, "_every_step", 8, 1e-5, rates, 1.0)
    finally:
        del cm.VARIANTS["_every_step"]
    assert loco.volume == pytest.approx(once.volume / 16) and loco.latency == pytest.approx(once.latency / 16)
    assert loco.fixed - 0.5 == pytest.approx((once.fixed - 0.5) / 16)


def test_explicit_topk_bits_by_hand():
    """Top-k 1 % of 100,000 with explicit indices: 1000 fp32 values and 1000 indices of 17 bits,
    32,000 + 8 ceil(17,000 / 8) = 49,000 bits."""
    assert cm.topk_bits(100_000, 0.01, 32, "explicit") == 32_000 + 17_000


def test_ring_allreduce_on_the_shared_loopback():
    """DDP fp32 on 5M parameters, K = 2, 100 Mbit/s shared: 2 (K - 1) 20 MB = 40 MB cross the one link
    (framed, less the token bucket's burst) at 12.5 MB/s: about 3.2 s."""
    n = 4 * 5_000_000
    collective = cm.Collective("all_reduce", cm.ring_traffic(2, n), "gradients")
    [seconds] = cm.transfer_s([collective], cm.SharedMedium(2, 100e6), idle_s=1.0)
    assert seconds == pytest.approx((2 * n * cm.FRAMING - cm.TBF_BURST) / 12.5e6)
    assert 3.1 < seconds < 3.3


def test_sharded_exchange_by_hand():
    """Two sign layers of 16 and 8 elements on K = 2: rank 0 owns the first (2 + 4 bytes), rank 1 the
    second (1 + 4 bytes); the uplink sends 5 bytes 0 -> 1 and 6 bytes 1 -> 0, the downlink the reverse.
    Shared medium: 11 bytes per all-to-all; switched: the busiest link carries 6."""
    variant = cm.VARIANTS["saef-sign"]
    collectives, owned = cm.server_collectives(variant, [(16,), (8,)], 2)
    vote, uplink, downlink = collectives
    assert owned.tolist() == [16, 8]
    assert uplink.traffic.tolist() == [[0, 5], [6, 0]]
    assert downlink.traffic.tolist() == [[0, 6], [5, 0]]
    assert cm.SharedMedium(2, 8.0).loads(uplink.traffic).tolist() == [11]
    assert cm.transfer_s([uplink], cm.Switched(2, 8.0)) == [6.0]


def test_two_hosts_ring_crosses_each_direction_once():
    """A ring all-reduce of n bytes on 2 hosts x 2 ranks: ranks 1 -> 2 and 3 -> 0 cross, each carrying
    2 (K - 1) / K n = 1.5 n; traffic within a host stays off the slow links."""
    loads = cm.TwoHosts(2, 2, 8.0).loads(cm.ring_traffic(4, 100.0))
    assert loads.tolist() == [150.0, 150.0]


def test_powersgd_elements_by_hand():
    """A 2208 x 40 matrix at rank 4 is compressed (2 (2208 + 40) 4 < 2208 x 40): P 2208 x 4, Q 40 x 4;
    a 1-D bias is sent as it is."""
    assert cm.powersgd_elements([(2208, 40), (2208,)], 4) == (2208, 2208 * 4, 40 * 4)


def test_message_rounds():
    """All-to-all: K - 1 rounds; all-reduce: min(2 (K - 1), 2 ceil(log2 K)); broadcast: ceil(log2 K)."""
    assert cm.alpha_latency("all_to_all", 1024, 1.0) == 1023
    assert cm.alpha_latency("all_reduce", 1024, 1.0) == 20
    assert cm.alpha_latency("all_reduce", 2, 1.0) == 2
    assert cm.alpha_latency("broadcast", 100, 1.0) == 7


def test_saef_codec_critical_path_by_hand():
    """P = 4 owned 3 + 1 on K = 2, rates (s per element) encode 1, decode 2, mean 3 + 5 per further row:
    4 + max((3 + 5 + 1) [3, 1]) + 2 max(4 - [3, 1]) = 4 + 27 + 6."""
    rates = {"encode": 1.0, "decode": 2.0, "mean_1": 3.0, "mean_row": 5.0}
    assert cm.saef_codec_s(rates, np.array([3.0, 1.0]), 2) == 37.0


def test_crossover_of_two_lines():
    """saef 1 s + 8e9 / B against a base of 8e10 / B (both in s, B in bit/s): equal at B = 7.2e10."""
    saef = cm.Scaled(1.0, 0.0, 1e9)
    base = cm.Scaled(0.0, 0.0, 1e10, (0.0, 0.0, 0.0))
    kind, where = cm.crossover(saef, base)
    assert kind == "below" and where == pytest.approx(7.2e10, rel=0.03)
    assert math.isclose(float(saef.time(7.2e10)), float(base.time(7.2e10)))
