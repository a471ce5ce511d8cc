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
from _timing import interleaved_medians, kernels_in_use


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10**3, 10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {kernels_in_use()}, {torch.get_num_threads()} threads, float32, median of {args.repeats} "
          "(all kernels of one size timed in turns of 10 calls)")
    print("| elements | copy µs | sign encode µs (x copy) | sign decode µs (x copy) | torch.topk 1% µs | topk:0.01 encode µs (x torch.topk) | topk:0.01 decode µs (x copy) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    sign, top = saef.make_compressor("sign"), saef.make_compressor("topk:0.01")
    for n in args.sizes:
        v = torch.randn(1, n)
        out = torch.empty_like(v)
        sign_payload, top_payload, k = sign.encode_rows(v), top.encode_rows(v), top.k(n)
        repeats = args.repeats if n < 10**7 else max(10, args.repeats // 5)  # 1e7: a few seconds per kernel
        t = interleaved_medians({
            "copy": lambda: out.copy_(v),
            "sign_enc": lambda: sign.encode_rows(v),
            "sign_dec": lambda: sign.decode_rows(sign_payload, n),
            "topk": lambda: v.abs().topk(k, dim=1, sorted=False),
            "top_enc": lambda: top.encode_rows(v),
            "top_dec": lambda: top.decode_rows(top_payload, n),
        }, repeats)
        copy, sign_enc, sign_dec, topk, top_enc, top_dec = (1e6 * t[name] for name in ("copy", "sign_enc", "sign_dec", "topk", "top_enc", "top_dec"))
        print(f"| {n:,} | {copy:.1f} | {sign_enc:.1f} ({sign_enc / copy:.1f}x) | {sign_dec:.1f} ({sign_dec / copy:.1f}x) | {topk:.1f} "
              f"| {top_enc:.1f} ({top_enc / topk:.2f}x) | {top_dec:.1f} ({top_dec / copy:.1f}x) |", flush=True)


if __name__ == "__main__":
    main()
