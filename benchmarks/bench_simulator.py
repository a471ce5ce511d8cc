"""Simulator overhead: one simulated SAEF step of K workers versus one torch.optim.SGD step of one model
on the same global batch (the same arithmetic, so the floor is 1x).

    python benchmarks/bench_simulator.py                      # 1-D CNN (MNIST-1D) and ResNet-20, K = 4, 8, 16
    python benchmarks/bench_simulator.py --models cnn1d --workers 4 8 --steps 50

Prints one table: median step time over --steps rounds (after warm-up) of SGD and of each simulated
configuration, measured in one run with the same data, and the ratio to SGD. Each round runs every
configuration once, in turn, so that the machine's slow spells hit all of them alike.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import saef
from _timing import interleaved_medians, kernels_in_use
from saef.zoo.models import build_model

SHAPES = {"cnn1d": ((1, 40), 10), "mlp": ((1, 40), 10), "resnet20": ((3, 32, 32), 10), "resnet56": ((3, 32, 32), 100)}


def make_model(name: str, seed: int = 0):
    shape, classes = SHAPES[name]
    torch.manual_seed(seed)
    return build_model(name, SimpleNamespace(input_shape=shape, num_classes=classes))


def bench(name: str, workers, compressors, batch: int, steps: int):
    shape, classes = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, *shape, generator=g)
    targets = torch.randint(0, classes, (batch,), generator=g)

    model = make_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step():
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()

    steps_to_time = {"sgd": sgd_step}
    for k in workers:
        for spec in compressors:
            sim = saef.Simulator(make_model(name), workers=k, method="saef", compressor=spec, momentum=0.9)
            steps_to_time[(k, spec)] = lambda sim=sim: sim.step(inputs, targets, lr=0.01)
    return interleaved_medians(steps_to_time, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn1d", "resnet20"], choices=sorted(SHAPES))
    parser.add_argument("--workers", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--compressors", nargs="+", default=["sign", "topk:0.01"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default: 200 for the MNIST-1D models, 40 for the ResNets)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {kernels_in_use()}, {torch.get_num_threads()} threads, global batch {args.batch}, timed in interleaved blocks of 10 steps")
    print("| model | step | steps timed | median ms | vs SGD |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        steps = args.steps or (40 if name.startswith("resnet") else 200)
        results = bench(name, args.workers, args.compressors, args.batch, steps)
        for key, seconds in results.items():
            label = "torch.optim.SGD, 1 model" if key == "sgd" else f"SAEF {key[1]}, K={key[0]}"
            print(f"| {name} | {label} | {steps} | {1e3 * seconds:.2f} | {seconds / results['sgd']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
