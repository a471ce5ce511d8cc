"""The step overlapped with backward, against the same step without overlap and a step with no
communication, on a rate-limited loopback.

    sudo python benchmarks/bench_overlap.py                   # ResNet-20, K = 4, 100 Mbit/s, sign and top-k 1 %
    sudo python benchmarks/bench_overlap.py --models resnet20 mlp5m --bucket-mb 0.25 1 4 --steps 10

Needs root (a network namespace whose loopback is limited by tc tbf, as bench_network.py makes; deleted
afterwards, also when interrupted). Rows, each the median of --steps timed steps after 3 warm-up steps,
with a global batch of 128:

* compute-only, 1 process: one process's forward, backward and local SGD step on its local batch of
  128 / K, alone on the machine (the issue's "no-communication step");
* compute-only, K processes: the same in K processes at once, with no communication (on a machine with
  fewer cores than K they share the cores, so this is the compute a rank of the real run can have);
* each saef variant without overlap: its step, and the part after backward (compression, both exchanges,
  decoding, the update: the communication that the overlap can hide);
* the same variant with --overlap for each bucket size; DDP fp32 (which overlaps its all-reduce) for scale.

The last two columns are the step over max(compute, communication), with compute from the 1-process row
or from the K-process row, and communication the variant's after-backward time without overlap (the
target is 1.2x). ``--table FILE.json`` prints the table of an earlier run again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from _timing import kernels_in_use
from bench_network import NAMESPACE, WORKER, delete_namespace, make_namespace, rank0_result


def run(variant, model, world, args, *extra):
    """rank 0's JSON result of ``world`` ranks of the network worker inside the namespace."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).parent.parent / "src")
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = ["ip", "netns", "exec", NAMESPACE, sys.executable, WORKER, "--variant", variant, "--model", model,
                "--timing-steps", str(args.steps), *extra]
        quiet = subprocess.DEVNULL  # only rank 0's output is read
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE if rank == 0 else quiet,
                                      stderr=subprocess.PIPE if rank == 0 else quiet, text=True))
    return rank0_result(procs, args.timeout, f"{variant} {model} K={world} {' '.join(extra)}")


def measure(rate, model, k, args):
    rows = []

    def add(label, result, **more):
        rows.append({**result, "rate": rate, "model": model, "workers": k, "row": label, **more})
        print(f"# {rate} {model} K={k} {label}: {1e3 * result['step_s']:.1f} ms/step", file=sys.stderr, flush=True)

    add("compute-only, 1 process", run("compute-only", model, 1, args, "--local-workers", str(k)))
    add(f"compute-only, {k} processes", run("compute-only", model, k, args))
    add("ddp-fp32", run("ddp-fp32", model, k, args))
    for variant in args.variants:
        plain = run(variant, model, k, args)
        add(f"{variant}, no overlap", plain)
        for mb in args.bucket_mb:
            add(f"{variant}, overlap {mb:g} MB", run(variant, model, k, args, "--overlap-mb", str(mb)),
                communication_s=plain["after_backward_s"])
    return rows


def table(rows):
    print("| rate | model | K | step | median s/step | after backward (s) | step / max(compute 1 process, comm.) "
          "| step / max(compute K processes, comm.) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        same = [c for c in rows if (c["rate"], c["model"], c["workers"]) == (r["rate"], r["model"], r["workers"])]
        alone = next(c["step_s"] for c in same if c["row"] == "compute-only, 1 process")
        shared = next(c["step_s"] for c in same if c["row"] == f"compute-only, {r['workers']} processes")
        comm = r.get("communication_s", r.get("after_backward_s"))
        ratios = [f"{r['step_s'] / max(c, comm):.2f}x" if comm is not None else "–" for c in (alone, shared)]
        after = f"{r['after_backward_s']:.3f}" if "after_backward_s" in r and "communication_s" not in r else "–"
        print(f"| {r['rate']} | {r['model']} | {r['workers']} | {r['row']} | {r['step_s']:.3f} | {after} | {ratios[0]} | {ratios[1]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", nargs="+", default=["100mbit"])
    parser.add_argument("--workers", nargs="+", type=int, default=[4])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--variants", nargs="+", default=["saef-sign", "saef-topk"])
    parser.add_argument("--bucket-mb", nargs="+", type=float, default=[0.25, 1.0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (after 3 warm-up steps)")
    parser.add_argument("--json", default="benchmarks/results/overlap.json", help="where to write the raw results")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--table", metavar="FILE.json", help="print the table of an earlier run's raw results and exit")
    args = parser.parse_args()
    if args.table:
        table(json.loads(Path(args.table).read_text()))
        return
    if os.geteuid() != 0:
        sys.exit("bench_overlap.py needs root to create a network namespace (ip netns add)")

    def interrupted(signum, frame):
        delete_namespace()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    rows = []
    try:
        for rate in args.rates:
            make_namespace(rate)
            for model in args.models:
                for k in args.workers:
                    rows += measure(rate, model, k, args)
    finally:
        delete_namespace()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"saef: {kernels_in_use()}")
    table(rows)


if __name__ == "__main__":
    main()
