"""Top-k's indices at their information limit: top-k's payload (Elias-Fano indices, saef.compress.indexcode)
against the explicit ceil(log2 d)-bit indices it sent before and the bound log2 C(d, k), per layer, and
its encode + decode time against the top-k of an earlier revision.

    python benchmarks/bench_indexcode.py                     # ResNet-20, ResNet-56 and the 5M MLP at 0.1, 1, 10 %
    python benchmarks/bench_indexcode.py --timing-only --against 227476f

Table 1 (bits): per model, rho and value width, top-k's real payload of every layer (encoded, its size
read from the tensors: byte padding included) and the explicit format's (k ceil(log2 d) bits padded to
bytes, plus the values), each as a ratio to the bound log2 C(d, k) + k * (value bits): the worst layer,
the worst layer of at least 8 kept entries, and the whole model; and the index bits per kept entry.
Table 2 (time): encode + decode of one tensor by topk:0.01 here and at revision ``--against`` (its tree
exported and its compiled kernels built in a temporary directory), each timed in its own process, the
two processes alternating for ``--rounds`` rounds; the median of the rounds' medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

import saef
from _timing import interleaved_medians, kernels_in_use
from saef.compress import Layout, payload_bits
from saef.compress.indexcode import explicit_bits, information_bits
from saef.zoo.models import build_model

MODELS = {"resnet20": ((3, 32, 32), 10), "resnet56": ((3, 32, 32), 10), "mlp5m": ((1, 40), 10)}
ROOT = Path(__file__).resolve().parent.parent


def layer_sizes(name):
    shape, classes = MODELS[name]
    return [p.numel() for p in build_model(name, SimpleNamespace(input_shape=shape, num_classes=classes)).parameters()]


def bits_table(models, rhos):
    print("| model | rho | values | explicit / bound (worst layer) | top-k / bound (worst layer) | top-k / bound (worst layer, k >= 8) "
          "| explicit / bound (model) | top-k / bound (model) | index bits per kept entry: explicit, top-k, bound |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for name in models:
        sizes = layer_sizes(name)
        layers = [torch.randn(1, d, generator=torch.Generator().manual_seed(d)) for d in sizes]
        for rho in rhos:
            for values in ("fp32", "fp16"):
                spec = f"topk:{rho}" + ("" if values == "fp32" else ":fp16")
                top, value_bits = saef.make_compressor(spec), 32 if values == "fp32" else 16
                ks = [saef.make_compressor(f"topk:{rho}").k(d) for d in sizes]
                real = [payload_bits(top.encode_rows(v)) for v in layers]  # this top-k, as sent
                explicit = [8 * -(-explicit_bits(d, k) // 8) + k * value_bits for d, k in zip(sizes, ks)]
                bound = [information_bits(d, k) + k * value_bits for d, k in zip(sizes, ks)]
                worst = lambda payload, least=0: max(p / b for p, b, k in zip(payload, bound, ks) if k >= least)  # noqa: E731
                total = lambda payload: sum(payload) / sum(bound)  # noqa: E731
                kept = sum(ks)
                per_entry = ", ".join(f"{(sum(x) - value_bits * kept) / kept:.2f}" for x in (explicit, real, bound))
                print(f"| {name} | {rho:g} | {values} | {worst(explicit):.3f} | {worst(real):.3f} | {worst(real, 8):.3f} "
                      f"| {total(explicit):.3f} | {total(real):.3f} | {per_entry} |", flush=True)


def time_here(sizes, repeats):
    """{elements: median seconds of topk:0.01 encode + decode} with the saef that this process imports."""
    top = saef.make_compressor("topk:0.01")
    times = {}
    for n in sizes:
        layout = Layout([n], [(n,)])
        v = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
        def both():
            return top.decode_layers(top.encode_layers(v, layout), layout)
        times[n] = interleaved_medians({"topk": both}, repeats if n < 10**7 else max(10, repeats // 5))["topk"]
    return times


def export_revision(revision: str, into: Path) -> Path:
    """The tree of ``revision`` in ``into``, with its compiled kernels built in place; returns its src."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src", "setup.py", "pyproject.toml"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into, check=True, capture_output=True)
    return into / "src"


def timing_table(sizes, repeats, against, rounds):
    print(f"| elements | topk:0.01 encode + decode µs, {against} | the same here | ratio |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"then": export_revision(against, Path(tmp)), "now": ROOT / "src"}
        medians = {name: {n: [] for n in sizes} for name in trees}
        for _ in range(rounds):
            for name, src in trees.items():
                argv = [sys.executable, __file__, "--time-here", "--sizes", *map(str, sizes), "--repeats", str(repeats)]
                out = subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(src)}, check=True, capture_output=True, text=True).stdout
                for n, t in json.loads(out.splitlines()[-1]).items():
                    medians[name][int(n)].append(t)
    for n in sizes:
        then, now = (statistics.median(medians[name][n]) for name in ("then", "now"))
        print(f"| {n:,} | {1e6 * then:.0f} | {1e6 * now:.0f} | {now / then:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10**6, 10**7])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two processes of table 2")
    parser.add_argument("--against", default="227476f", help="the revision whose top-k table 2 times (the last one "
                        "with explicit indices)")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--time-here", action="store_true", help=argparse.SUPPRESS)  # one process of table 2
    args = parser.parse_args()
    if args.time_here:
        print(json.dumps(time_here(args.sizes, args.repeats)))
        return
    print(f"torch {torch.__version__}, {kernels_in_use()}, {torch.get_num_threads()} threads")
    if not args.timing_only:
        bits_table(args.models, args.rhos)
        print()
    timing_table(args.sizes, args.repeats, args.against, args.rounds)


if __name__ == "__main__":
    main()
