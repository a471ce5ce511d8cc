"""The GPT workload: one simulated step of K workers against one model's step on the same global batch, by
the simulator's path (a loop over workers, vmap), and fp32 against bf16 autocast.

    python benchmarks/bench_gpt.py                       # the default GPT (2 layers, width 128, context 64), K = 4
    python benchmarks/bench_gpt.py --workers 4 8 --steps 30

Prints one table of median step times (interleaved rounds, one run) and their ratio to torch.optim.AdamW on
one model in fp32. The simulated steps run SAEF-Adam with scaled sign after a one-step warm-up (the
compressed phase: what a run spends its time in).
"""

from __future__ import annotations

import argparse
import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import saef
from _timing import interleaved_medians
from saef.zoo.models import build_model


def make_model(args, seed=0):
    torch.manual_seed(seed)
    info = SimpleNamespace(num_classes=256, input_shape=(args.context,), name="text")
    return build_model("gpt", info, width=args.width, layers=args.layers, heads=args.heads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", nargs="+", type=int, default=[4])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (args.batch, args.context), generator=g)
    targets = torch.randint(0, 256, (args.batch, args.context), generator=g)
    steps = {}
    for precision in ("fp32", "bf16"):
        model = make_model(args)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

        def adamw(model=model, opt=opt, cast=cast):
            opt.zero_grad()
            with cast:
                outputs = model(inputs)
            F.cross_entropy(outputs.float(), targets).backward()
            opt.step()

        steps[("torch.optim.AdamW, 1 model", precision)] = adamw
        for k in args.workers:
            for path, vectorize in (("loop", False), ("vmap", "vmap")):
                sim = saef.Simulator(make_model(args), workers=k, method="saef", optimizer="adam", compressor="sign",
                                     eps=1e-3, warmup_steps=1, vectorize=vectorize, precision=precision)
                sim.step(inputs, targets, lr=1e-3)  # the warm-up step: what follows is compressed
                steps[(f"SAEF-Adam sign, K={k}, {path}", precision)] = lambda sim=sim: sim.step(inputs, targets, lr=1e-3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "no batching rule" notice
        medians = interleaved_medians(steps, args.steps, block=5)
    base = medians[("torch.optim.AdamW, 1 model", "fp32")]
    params = sum(p.numel() for p in make_model(args).parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, GPT {params:,} parameters, "
          f"global batch {args.batch} x {args.context} bytes, {args.steps} steps timed per row")
    print("| step | precision | median ms | vs AdamW fp32 |")
    print("|---|---|---:|---:|")
    for (label, precision), seconds in medians.items():
        print(f"| {label} | {precision} | {1e3 * seconds:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
