"""Bytes on the wire per step and worker, from real payloads, against fp32 and a floor (explicit, or the information limit).

    python benchmarks/bench_wire.py

For each model and compressor: the uplink payload one worker produces in one step (every layer encoded
as Algorithm 1 encodes it; the distributed tests check that exactly these bytes are handed to
torch.distributed), the fp32 dense payload (4 bytes per parameter, what an all-reduce is handed), and the
floor of an explicit coding: 1 bit per element for sign; for top-k the information limit, 32 bits per kept
value plus log2 C(d, k) for the set of k kept positions among d (the layer size); for the other compressors, their formula without byte padding (rand-k: the values; QSGD:
the norm, a sign and b level bits per element; natural: 9 bits per element; PowerSGD: (n + m) R values),
with 16-bit values under a :bf16/:fp16 suffix. Ratios: fp32 / payload (compression) and payload / floor
(overhead over the floor).

    python benchmarks/bench_wire.py --models resnet20 --compressors randk:0.01 qsgd:4 natural powersgd:1
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import torch

import saef
from saef.compress.indexcode import information_bits
from saef.zoo.models import build_model

MODELS = {"cnn1d": ((1, 40), 10), "resnet20": ((3, 32, 32), 10), "resnet56": ((3, 32, 32), 100)}


def floor_bits(compressor, shape) -> int:
    d = math.prod(shape)
    value = 32
    if isinstance(compressor, saef.compress.Precision):
        compressor, value = compressor.inner, 16
    if isinstance(compressor, saef.compress.ScaledSign):
        return d
    if isinstance(compressor, saef.compress.TopK):
        return math.ceil(compressor.k(d) * value + information_bits(d, compressor.k(d)))
    if isinstance(compressor, saef.compress.RandK):
        return compressor.k(d) * value
    if isinstance(compressor, saef.compress.QSGD):
        return value + d * (1 + compressor.level_bits)
    if isinstance(compressor, saef.compress.Natural):
        return 9 * d
    if isinstance(compressor, saef.compress.PowerSGD) and compressor.matrix(shape) is not None:
        n, m = compressor.matrix(shape)
        return value * compressor.rank * (n + m)
    return value * d


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--compressors", nargs="+", default=["identity", "sign", "topk:0.1", "topk:0.01", "topk:0.001"])
    args = parser.parse_args()
    print("| model | parameters | compressor | payload bytes/step | fp32 bytes | fp32 / payload | floor bytes | payload / floor |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        shape, classes = MODELS[name]
        torch.manual_seed(0)
        params = [p.detach() for p in build_model(name, SimpleNamespace(input_shape=shape, num_classes=classes)).parameters()]
        total = sum(p.numel() for p in params)
        for spec in args.compressors:
            c = saef.make_compressor(spec)
            payload = sum(c.bits(c.encode(torch.randn_like(p))) for p in params)
            floor = sum(floor_bits(c, tuple(p.shape)) for p in params)
            print(f"| {name} | {total:,} | {spec} | {payload / 8:,.0f} | {4 * total:,} | {32 * total / payload:.1f}x "
                  f"| {floor / 8:,.0f} | {payload / floor:.3f}x |")


if __name__ == "__main__":
    main()
