"""The step overlapped with backward, against the same step without overlap and a step with no
communication, on a rate-limited loopback.

    sudo python benchmarks/bench_overlap.py                   # ResNet-20, K = 4, 100 Mbit/s, sign and top-k 1 %
    sudo python benchmarks/bench_overlap.py --models resnet20 mlp5m --bucket-mb 0.25 1 4 --steps 10
    sudo python benchmarks/bench_overlap.py --workers 2 4 --variants saef-fp16 saef-sign saef-fp32 --rounds 2
        # saef-fp16 (16-bit values both ways) and saef-fp32 (nothing compressed) give overlap more to hide

Needs root (a network namespace whose loopback is limited by tc tbf, as bench_network.py makes; deleted
afterwards, also when interrupted). Rows, each the median over --rounds runs (every row once per round,
in turn) of a run's median of --steps timed steps after 3 warm-up steps, with a global batch of 128:

* compute-only, 1 process: one process's forward, backward and local SGD step on its local batch of
  128 / K, alone on the machine (the issue's "no-communication step");
* compute-only, K processes: the same in K processes at once, with no communication (on a machine with
  fewer cores than K they share the cores, so this is the compute a rank of the real run can have);
* each saef variant without overlap: its step, and the part after backward (compression, both exchanges,
  decoding, the update: the communication that the overlap can hide);
* the same variant with --overlap for each bucket size; DDP fp32 (which overlaps its all-reduce) for scale.

On a machine with fewer cores than K, compute-only in K processes is the compute a rank really has.

The last two columns are the step over max(compute, communication), with compute from the 1-process row
or from the K-process row, and communication the variant's after-backward time without overlap (the
target is 1.2x). ``--table FILE.json`` prints the table of an earlier run again.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from _timing import kernels_in_use
from bench_network import NAMESPACE, WORKER, in_namespaces, rank0_result


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


def configurations(model, k, args):
    """(row label, variant, processes, extra worker flags, the no-overlap row it is compared with)."""
    rows = [("compute-only, 1 process", "compute-only", 1, ("--local-workers", str(k)), None),
            (f"compute-only, {k} processes", "compute-only", k, (), None), ("ddp-fp32", "ddp-fp32", k, (), None)]
    for variant in args.variants:
        rows.append((f"{variant}, no overlap", variant, k, (), None))
        rows += [(f"{variant}, overlap {mb:g} MB", variant, k, ("--overlap-mb", str(mb)), f"{variant}, no overlap")
                 for mb in args.bucket_mb]
    return rows


def measure(rate, args):
    """Every row of every model and K, --rounds times in turn (a slow spell of the machine then meets every
    row alike); a row's value is the median over the rounds of each run's median step."""
    plan = [(model, k, *row) for model in args.models for k in args.workers for row in configurations(model, k, args)]
    runs = {i: [] for i in range(len(plan))}
    for round_ in range(args.rounds):
        for i, (model, k, label, variant, world, extra, _) in enumerate(plan):
            result = run(variant, model, world, args, *extra)
            runs[i].append(result)
            print(f"# round {round_ + 1}: {rate} {model} K={k} {label}: {1e3 * result['step_s']:.1f} ms/step", file=sys.stderr, flush=True)
    rows = []
    for i, (model, k, label, variant, world, extra, compared) in enumerate(plan):
        steps = [r["step_s"] for r in runs[i]]
        row = {"rate": rate, "model": model, "workers": k, "row": label, "step_s": statistics.median(steps),
               "step_s_min": min(steps), "step_s_max": max(steps), "rounds": steps}
        after = [r["after_backward_s"] for r in runs[i] if "after_backward_s" in r]
        if after and compared is None:
            row["after_backward_s"] = statistics.median(after)
        if compared is not None:
            row["compared_with"] = compared
        rows.append(row)
    for row in rows:  # the communication an overlapped row can hide: its plain row's after-backward time
        if "compared_with" in row:
            plain = next(r for r in rows if (r["model"], r["workers"], r["row"]) == (row["model"], row["workers"], row["compared_with"]))
            row["communication_s"] = plain["after_backward_s"]
    return rows


def table(rows):
    print("| rate | model | K | step | median s/step (min-max over rounds) | after backward (s) "
          "| step / max(compute 1 process, comm.) | step / max(compute K processes, comm.) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        same = [c for c in rows if (c["rate"], c["model"], c["workers"]) == (r["rate"], r["model"], r["workers"])]
        alone = next(c["step_s"] for c in same if c["row"] == "compute-only, 1 process")
        shared = next(c["step_s"] for c in same if c["row"] == f"compute-only, {r['workers']} processes")
        comm = r.get("communication_s", r.get("after_backward_s"))
        ratios = [f"{r['step_s'] / max(c, comm):.2f}x" if comm is not None else "–" for c in (alone, shared)]
        after = f"{r['after_backward_s']:.3f}" if "after_backward_s" in r and "communication_s" not in r else "–"
        spread = f" ({r['step_s_min']:.3f}-{r['step_s_max']:.3f})" if "step_s_min" in r else ""
        print(f"| {r['rate']} | {r['model']} | {r['workers']} | {r['row']} | {r['step_s']:.3f}{spread} | {after} | {ratios[0]} | {ratios[1]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", nargs="+", default=["100mbit"])
    parser.add_argument("--workers", nargs="+", type=int, default=[4])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--variants", nargs="+", default=["saef-sign", "saef-topk"])
    parser.add_argument("--bucket-mb", nargs="+", type=float, default=[0.25, 1.0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after 3 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every row, in turn")
    parser.add_argument("--json", default="benchmarks/results/overlap.json", help="where to write the raw results")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--table", metavar="FILE.json", help="print the table of an earlier run's raw results and exit")
    args = parser.parse_args()
    if args.table:
        table(json.loads(Path(args.table).read_text()))
        return
    rows = []
    in_namespaces("bench_overlap.py", args.rates, lambda rate: rows.extend(measure(rate, args)))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"saef: {kernels_in_use()}")
    table(rows)


if __name__ == "__main__":
    main()
