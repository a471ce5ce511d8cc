"""Compressor kernels: encode and decode time against the memory-bandwidth floor (a tensor copy of the
same size) and, for top-k, against torch.topk itself.

    python benchmarks/bench_compressors.py
    python benchmarks/bench_compressors.py --sizes 1000 1000000 --repeats 50

Prints medians (microseconds) and ratios, all measured in one run on the same tensors.
"""

from __future__ import annotations

import argparse

import torch

import saef
from _timing import median_time


def median_us(fn, repeats: int) -> float:
    return 1e6 * median_time(fn, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10**3, 10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {args.repeats}")
    print("| elements | copy µs | sign encode µs (x copy) | sign decode µs (x copy) | torch.topk 1% µs | topk:0.01 encode µs (x torch.topk) | topk:0.01 decode µs (x copy) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    sign, top = saef.make_compressor("sign"), saef.make_compressor("topk:0.01")
    for n in args.sizes:
        v = torch.randn(1, n)
        out = torch.empty_like(v)
        copy = median_us(lambda: out.copy_(v), args.repeats)
        sign_payload = sign.encode_rows(v)
        sign_enc = median_us(lambda: sign.encode_rows(v), args.repeats)
        sign_dec = median_us(lambda: sign.decode_rows(sign_payload, n), args.repeats)
        k = top.k(n)
        topk = median_us(lambda: v.abs().topk(k, dim=1, sorted=False), args.repeats)
        top_payload = top.encode_rows(v)
        top_enc = median_us(lambda: top.encode_rows(v), args.repeats)
        top_dec = median_us(lambda: top.decode_rows(top_payload, n), args.repeats)
        print(f"| {n:,} | {copy:.1f} | {sign_enc:.1f} ({sign_enc / copy:.1f}x) | {sign_dec:.1f} ({sign_dec / copy:.1f}x) | {topk:.1f} "
              f"| {top_enc:.1f} ({top_enc / topk:.2f}x) | {top_dec:.1f} ({top_dec / copy:.1f}x) |", flush=True)


if __name__ == "__main__":
    main()
