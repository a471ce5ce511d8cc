"""Compressor kernels: encode and decode time against the memory-bandwidth floor (a tensor copy of the
same size) and, for top-k, against torch.topk itself.

    python benchmarks/bench_compressors.py
    python benchmarks/bench_compressors.py --sizes 1000 1000000 --repeats 50
    python benchmarks/bench_compressors.py --table others    # rand-k, QSGD, natural, PowerSGD, 16-bit values

Prints medians (microseconds) and ratios, all measured in one run on the same tensors. The second table
times the layer methods as a training step calls them (with a Context: the draws of random compressors,
PowerSGD's kept Q), on one tensor shaped as a matrix (PowerSGD's view) of about the given size.
"""

from __future__ import annotations

import argparse

import torch

import saef
from _timing import interleaved_medians, kernels_in_use

from saef.compress import Context, Layout

OTHERS = ["randk:0.01", "qsgd:4", "natural", "powersgd:1", "powersgd:4", "topk:0.01:bf16", "identity:bf16"]


def matrix_shape(n: int):
    """(rows, n / rows) with rows the largest divisor of n not above sqrt(n): a layer's matrix view."""
    rows = max(r for r in range(1, int(n**0.5) + 1) if n % r == 0)
    return rows, n // rows


def others(sizes, repeats):
    """Encode and decode of the other compressors through the layer methods, beside a copy."""
    print("| elements (matrix view) | compressor | copy µs | encode µs (x copy) | decode µs (x copy) |")
    print("|---:|---|---:|---:|---:|")
    for n in sizes:
        shape = matrix_shape(n)
        layout = Layout([n], [shape])
        v = torch.randn(1, n)
        out = torch.empty_like(v)
        fns = {"copy": lambda: out.copy_(v)}
        for spec in OTHERS:
            c = saef.make_compressor(spec)
            state = torch.zeros(1, sum(c.state_sizes(layout)))
            context = Context(0, 0, (0,), state, {0: slice(0, state.shape[1])})
            c.init_state(layout, context)
            payload = c.encode_layers(v, layout, **c.context_args(context))
            fns[f"{spec}-enc"] = lambda c=c, context=context: c.encode_layers(v, layout, **c.context_args(context))
            fns[f"{spec}-dec"] = lambda c=c, context=context, payload=payload: c.decode_layers(payload, layout, **c.context_args(context))
        t = interleaved_medians(fns, repeats if n < 10**7 else max(10, repeats // 5))
        copy = 1e6 * t["copy"]
        for spec in OTHERS:
            enc, dec = 1e6 * t[f"{spec}-enc"], 1e6 * t[f"{spec}-dec"]
            print(f"| {n:,} ({shape[0]} x {shape[1]}) | {spec} | {copy:.1f} | {enc:.1f} ({enc / copy:.1f}x) | {dec:.1f} ({dec / copy:.1f}x) |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10**3, 10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--table", choices=["sign-topk", "others", "both"], default="both")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {kernels_in_use()}, {torch.get_num_threads()} threads, float32, median of {args.repeats} "
          "(all kernels of one size timed in turns of 10 calls)")
    if args.table in ("sign-topk", "both"):
        sign_topk(args.sizes, args.repeats)
    if args.table in ("others", "both"):
        others(args.sizes, args.repeats)


def sign_topk(sizes, repeats):
    class args:  # noqa: N801 - the loop below reads args.sizes / args.repeats
        pass
    args.sizes, args.repeats = sizes, repeats
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
