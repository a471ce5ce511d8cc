"""Simulator overhead: one simulated SAEF step of K workers versus one torch.optim.SGD step of one model
on the same global batch (the same arithmetic, so the floor is 1x).

    python benchmarks/bench_simulator.py                      # 1-D CNN (MNIST-1D) and ResNet-20, K = 4, 8, 16
    python benchmarks/bench_simulator.py --models cnn1d --workers 4 8 --steps 50

Prints one table: median step time over --steps steps (after warm-up) and the ratio to SGD, for each
compressor. On CPUs where oneDNN's convolution is slow for small 1-D inputs, the oneDNN setting changes the
floor itself, so both settings are measured (--onednn both) and each ratio is taken against SGD in the same
setting; the column "vs best SGD" compares with the fastest SGD of all settings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import saef
from saef.models import build_model

SHAPES = {"cnn1d": ((1, 40), 10), "mlp": ((1, 40), 10), "resnet20": ((3, 32, 32), 10), "resnet56": ((3, 32, 32), 100)}


def median_time(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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

    results = {"sgd": median_time(sgd_step, steps)}
    for k in workers:
        for spec in compressors:
            sim = saef.Simulator(make_model(name), workers=k, method="saef", compressor=spec, momentum=0.9)
            results[(k, spec)] = median_time(lambda: sim.step(inputs, targets, lr=0.01), steps)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn1d", "resnet20"], choices=sorted(SHAPES))
    parser.add_argument("--workers", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--compressors", nargs="+", default=["sign", "topk:0.01"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--onednn", choices=["on", "off", "both"], default="both")
    args = parser.parse_args()
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.onednn]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.steps} steps")
    print(f"| model | oneDNN | step | median ms | vs SGD (same setting) | vs best SGD |")
    print(f"|---|---|---|---:|---:|---:|")
    for name in args.models:
        per_setting = {}
        for enabled in settings:
            torch.backends.mkldnn.enabled = enabled
            per_setting[enabled] = bench(name, args.workers, args.compressors, args.batch, args.steps)
        best_sgd = min(r["sgd"] for r in per_setting.values())
        for enabled, results in per_setting.items():
            base = results["sgd"]
            for key, seconds in results.items():
                label = "torch.optim.SGD, 1 model" if key == "sgd" else f"SAEF {key[1]}, K={key[0]}"
                print(f"| {name} | {'on' if enabled else 'off'} | {label} | {1e3 * seconds:.2f} | {seconds / base:.2f}x | {seconds / best_sgd:.2f}x |")


if __name__ == "__main__":
    main()
