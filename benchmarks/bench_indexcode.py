"""Top-k's indices at their information limit: the Elias-Fano code (saef.compress.indexcode) against today's
explicit ceil(log2 d)-bit indices and the bound log2 C(d, k), per layer, and its cost in time.

    python benchmarks/bench_indexcode.py                  # ResNet-20, ResNet-56 and the 5M MLP at 0.1, 1, 10 %
    python benchmarks/bench_indexcode.py --timing-only

Table 1 (bits, computed from the formulas, checked against real codes on every layer): per model, rho and
value width, the payload of today's top-k and of top-k with the shorter of the two index codes chosen per
layer, each as a ratio to the bound log2 C(d, k) + k * (value bits), the worst layer and the whole model.
Table 2 (time): today's top-k encode + decode of one tensor beside the same plus sorting the kept indices
and coding them with Elias-Fano both ways (an upper bound of the coded top-k: the explicit index packing it
would replace is still counted), medians of interleaved rounds. Bits here are bit-exact per layer (no byte
padding), for the three payloads alike.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import torch

import saef
from _timing import interleaved_medians, kernels_in_use
from saef.compress import Layout
from saef.compress.indexcode import coded_bits, decode, encode, explicit_bits, information_bits
from saef.zoo.models import build_model

MODELS = {"resnet20": ((3, 32, 32), 10), "resnet56": ((3, 32, 32), 10), "mlp5m": ((1, 40), 10)}


def layer_sizes(name):
    shape, classes = MODELS[name]
    return [p.numel() for p in build_model(name, SimpleNamespace(input_shape=shape, num_classes=classes)).parameters()]


def bits_table(models, rhos):
    rng = np.random.default_rng(0)
    print("| model | rho | values | today / bound (worst layer) | today / bound (model) | coded / bound (worst layer) | coded / bound (model) | index bits per kept entry: today, coded, bound |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for name in models:
        sizes = layer_sizes(name)
        for rho in rhos:
            ks = [saef.make_compressor(f"topk:{rho}").k(d) for d in sizes]
            for d, k in zip(sizes, ks):  # the formula is the code's real size, on every layer
                idx = np.sort(rng.choice(d, size=k, replace=False))[None]
                packed = encode(idx, d)
                assert packed.shape[1] == -(-coded_bits(d, k) // 8) and np.array_equal(decode(packed, d, k), idx)
            for value_bits in (32, 16):
                today = [explicit_bits(d, k) + k * value_bits for d, k in zip(sizes, ks)]
                coded = [min(explicit_bits(d, k), coded_bits(d, k)) + k * value_bits for d, k in zip(sizes, ks)]
                bound = [information_bits(d, k) + k * value_bits for d, k in zip(sizes, ks)]
                worst = lambda payload: max(p / b for p, b in zip(payload, bound))  # noqa: E731
                total = lambda payload: sum(payload) / sum(bound)  # noqa: E731
                kept = sum(ks)
                per_entry = (f"{sum(explicit_bits(d, k) for d, k in zip(sizes, ks)) / kept:.2f}, "
                             f"{sum(min(explicit_bits(d, k), coded_bits(d, k)) for d, k in zip(sizes, ks)) / kept:.2f}, "
                             f"{sum(information_bits(d, k) for d, k in zip(sizes, ks)) / kept:.2f}")
                print(f"| {name} | {rho:g} | fp{value_bits} | {worst(today):.3f} | {total(today):.3f} | {worst(coded):.3f} "
                      f"| {total(coded):.3f} | {per_entry} |", flush=True)


def timing_table(sizes, repeats):
    print("| elements | topk:0.01 encode + decode µs | + sort + Elias-Fano encode + decode µs | ratio |")
    print("|---:|---:|---:|---:|")
    top = saef.make_compressor("topk:0.01")
    for n in sizes:
        layout = Layout([n], [(n,)])
        v = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
        k = top.k(n)

        def today():
            return top.decode_layers(top.encode_layers(v, layout), layout)

        chosen = top.select(v)[1].numpy()  # the kept indices, as the encoder chooses them

        def coded():  # the extra work of the code: sort the kept indices, code them, decode them
            decode(encode(np.sort(chosen, axis=1), n), n, k)
            return today()

        t = interleaved_medians({"today": today, "coded": coded}, repeats if n < 10**7 else max(10, repeats // 5))
        print(f"| {n:,} | {1e6 * t['today']:.0f} | {1e6 * t['coded']:.0f} | {t['coded'] / t['today']:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10**6, 10**7])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {kernels_in_use()}, {torch.get_num_threads()} threads")
    if not args.timing_only:
        bits_table(args.models, args.rhos)
        print()
    timing_table(args.sizes, args.repeats)


if __name__ == "__main__":
    main()
