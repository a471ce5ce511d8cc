"""The network benchmark's per-step table on two hosts: fast inside each host, a slow link between them.

    sudo python benchmarks/bench_two_hosts.py                     # 100 Mbit/s and 1 Gbit/s, mlp5m and resnet20
    sudo python benchmarks/bench_two_hosts.py --rates 100mbit --models mlp5m --steps 3   # a quick check
    sudo python benchmarks/run_all.py --only network_two_hosts    # the same, and the table in results/*.md

Needs root. Two network namespaces joined by a veth pair, each end rate-limited with tc (tbf), stand for
two hosts (benchmarks/_hosts.py); two ranks run on each (K = 2 x 2), so a rank's traffic to its neighbour
stays on the host's loopback (memory speed) and the rest crosses the slow link. Every variant of
bench_network.py runs in turn (bench_network.py's _net_worker.py, launched with RANK, WORLD_SIZE and
MASTER_ADDR = host 0's veth address; gloo binds to each host's veth end). Prints, per rate and model, the
median time per training step of every variant and its speed-up over DDP fp32; each JSON row carries the
topology ("2x2") and the link's rate. The namespaces are removed afterwards, also when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _hosts import TwoHosts
from _timing import kernels_in_use
from bench_network import GPT_VARIANTS, VARIANTS, WORKER, ddp_fp32, rank0_result

PORT = 29500  # each run has fresh namespaces, so every port is free


def launch(hosts, rank, world, per_host, variant, model, steps):
    """Rank ``rank`` of the network benchmark on host ``rank // per_host``; only rank 0's output is read
    (the others' must not fill an unread pipe and block)."""
    host = rank // per_host
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % per_host),
               MASTER_ADDR=hosts.addresses[0], MASTER_PORT=str(PORT), OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).parent.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **hosts.gloo_env(host))
    argv = [sys.executable, WORKER, "--variant", variant, "--model", model, "--timing-steps", str(steps)]
    out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
    return subprocess.Popen(hosts.command(host, argv), env=env, stdout=out, stderr=out, text=True, start_new_session=True)


def run_variant(hosts, variant, model, args):
    """One variant on the two hosts: the rank-0 worker's JSON result."""
    world = 2 * args.per_host
    procs = [launch(hosts, rank, world, args.per_host, variant, model, args.steps) for rank in range(world)]
    return rank0_result(procs, args.timeout, f"{variant} {model} 2x{args.per_host}")


def measure(args):
    """Every rate, model and variant; a failed variant is reported in its row and the others go on."""
    results = []
    topology = f"2x{args.per_host}"
    for rate in args.rates:
        with TwoHosts(rate) as hosts:
            for model in args.models:
                for variant in args.variants or (GPT_VARIANTS if model == "gpt" else VARIANTS):
                    try:
                        r = run_variant(hosts, variant, model, args)
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:
                        r = {"variant": variant, "model": model, "workers": 2 * args.per_host, "step_s": None,
                             "error": str(error).splitlines()[-1][:200]}
                    r.update(rate=rate, topology=topology, hosts=2, per_host=args.per_host)
                    results.append(r)
                    shown = "failed: " + r["error"] if r["step_s"] is None else f"{1e3 * r['step_s']:.1f} ms/step"
                    print(f"# {rate} {topology} {model} {variant}: {shown}", file=sys.stderr, flush=True)
    return results


def print_table(results):
    print(f"saef: {kernels_in_use()}")
    print("| rate (between hosts) | hosts x ranks | model | K | variant | median s/step | speed-up vs DDP fp32 |")
    print("|---|---|---|---:|---|---:|---:|")
    for r in results:
        head = f"| {r['rate']} | {r['topology']} | {r['model']} | {r['workers']} | {r['variant']} |"
        if r["step_s"] is None:
            print(f"{head} failed: {r.get('error')} | – |")
            continue
        base = ddp_fp32(results, r)
        speedup = "–" if base is None or base["step_s"] is None else f"{base['step_s'] / r['step_s']:.1f}x"
        print(f"{head} {r['step_s']:.3f} | {speedup} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"], help="of the link between the hosts")
    parser.add_argument("--models", nargs="+", default=["mlp5m", "resnet20"])
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS + GPT_VARIANTS,
                        help="default: bench_network.py's momentum-SGD variants, or for --models gpt the Adam ones")
    parser.add_argument("--per-host", type=int, default=2, help="ranks on each of the two hosts")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 3 warm-up steps)")
    parser.add_argument("--json", default="benchmarks/results/network_two_hosts.json", help="where to write the raw results")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_two_hosts.py needs root to create network namespaces (ip netns add)")
    try:
        results = measure(args)
    except KeyboardInterrupt:  # (the namespaces are already removed)
        print("bench_two_hosts.py: interrupted", file=sys.stderr)
        sys.exit(130)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
