"""End-to-end on a slow network: saef against DDP (fp32, fp16 hook, PowerSGD hook) in one run.

    sudo python benchmarks/bench_network.py                           # 100 Mbit/s and 1 Gbit/s, K = 2 and 4
    sudo python benchmarks/bench_network.py --rates 100mbit --workers 2 --models mlp5m --epochs 4
    sudo python benchmarks/bench_network.py --rates 100mbit --workers 2 --models mlp5m --epochs 10 \
        --variants ddp-powersgd saef-sign saef-topk --target-acc 0.6485     # longer, for the fast variants
    sudo python benchmarks/bench_network.py --rates 100mbit --workers 2 4 --models gpt --epochs 2   # Adam on the GPT
    sudo python benchmarks/bench_network.py --rates 100mbit 10mbit --workers 4 --models gpt --epochs 1 \
        --variants ddp-adamw-fp32 saef-diloco saef-loco --variant-lr saef-diloco=3e-4   # communicating rarely

Needs root: it makes a network namespace whose loopback is rate-limited with tc (tbf), runs K processes
inside it on 127.0.0.1 (gloo), and deletes the namespace afterwards -- also when interrupted. Prints, per
rate, worker count and model, the median time per training step of every variant and its speed-up over
DDP fp32; with --epochs, also the training time each variant needs to reach DDP fp32's final test accuracy.
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

NAMESPACE = "saefbench"
VARIANTS = ["ddp-fp32", "ddp-fp16", "ddp-powersgd", "saef-ef-sign", "saef-sign", "saef-topk", "saef-topk-fp16"]
# the GPT trains with Adam: torch.optim.AdamW under DDP (fp32, 16-bit and PowerSGD hooks), 1-bit Adam, SAEF-Adam.
# PyTorch's bf16 hook needs CUDA and NCCL, so on gloo the fp16 hook stands for DDP's 16-bit all-reduce.
GPT_VARIANTS = ["ddp-adamw-fp32", "ddp-adamw-fp16", "ddp-adamw-powersgd", "saef-1bit-adam", "saef-adam"]
# saef's DDP communication hook (EF, single-way) under DDP with torch's optimizers, beside PowerSGD's hook
HOOK_VARIANTS = ["ddp-saef-hook-topk", "ddp-saef-hook-sign", "ddp-adamw-saef-hook-topk", "ddp-adamw-saef-hook-sign",
                 "ddp-saef-hook-overlap-topk", "ddp-saef-hook-overlap-sign"]
# the GPT communicating rarely: DiLoCo (fp32, bf16), SparseLoCo-style EF and SAEF-LoCo, 16 AdamW steps a round
LOCO_VARIANTS = ["saef-diloco", "saef-diloco-bf16", "saef-sparseloco", "saef-loco"]
ALL_VARIANTS = VARIANTS + GPT_VARIANTS + ["ddp-adamw-bf16"] + HOOK_VARIANTS + LOCO_VARIANTS
WORKER = str(Path(__file__).with_name("_net_worker.py"))


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def make_namespace(rate: str) -> None:
    delete_namespace()
    sh("ip", "netns", "add", NAMESPACE)
    sh("ip", "netns", "exec", NAMESPACE, "ip", "link", "set", "lo", "up")
    sh("ip", "netns", "exec", NAMESPACE, "ip", "link", "set", "lo", "mtu", "9000")
    sh("ip", "netns", "exec", NAMESPACE, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")


def delete_namespace() -> None:
    sh("ip", "netns", "del", NAMESPACE, check=False)


def in_namespaces(script: str, rates, work) -> None:
    """``work(rate)`` for each rate, inside a fresh namespace whose loopback has that rate; the namespace
    is deleted afterwards, also on SIGINT or SIGTERM. Exits with a message without root."""
    if os.geteuid() != 0:
        sys.exit(f"{script} needs root to create a network namespace (ip netns add)")

    def interrupted(signum, frame):
        delete_namespace()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        for rate in rates:
            make_namespace(rate)
            work(rate)
    finally:
        delete_namespace()


def run_variant(variant, model, workers, args):
    with socket.socket() as s:  # any free port number; the namespace has its own port space
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    src = str(Path(__file__).parent.parent / "src")
    for rank in range(workers):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(workers), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = ["ip", "netns", "exec", NAMESPACE, sys.executable, WORKER, "--variant", variant, "--model", model,
                "--timing-steps", str(args.steps), "--epochs", str(args.epochs), "--lr", str(lr_of(variant, model, args)),
                "--warmup", str(args.warmup if model == "gpt" else 0), "--evals-per-epoch", str(args.evals_per_epoch)]
        # Only rank 0's output is read; the others' must not fill an unread pipe and block.
        quiet = subprocess.DEVNULL
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE if rank == 0 else quiet,
                                      stderr=subprocess.PIPE if rank == 0 else quiet, text=True))
    return rank0_result(procs, args.timeout, f"{variant} {model} K={workers}")


def lr_of(variant: str, model: str, args) -> float:
    """The variant's lr: its own from --variant-lr, else --gpt-lr for the GPT and --lr for the others."""
    for given in args.variant_lr or []:
        name, _, value = given.partition("=")
        if name == variant:
            return float(value)
    return args.gpt_lr if model == "gpt" else args.lr


def rank0_result(procs, timeout: float, what: str) -> dict:
    """The JSON line rank 0 prints last, once every rank has exited (rank 0 within ``timeout`` seconds, the
    others a minute after it); ranks still running then are killed (with their children, for a process
    started in a session of its own). RuntimeError with rank 0's error output if it failed."""
    try:
        out, err = procs[0].communicate(timeout=timeout)
        for p in procs[1:]:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
                p.wait()
    if procs[0].returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def ddp_fp32(results, r):
    """The DDP fp32 row of r's rate, model and worker count, with r's optimizer family (AdamW for the Adam
    variants, momentum SGD for the others), or else either; None if there is none."""
    adam = "adam" in r["variant"]
    same = [b for b in results if (b["rate"], b["model"], b["workers"]) == (r["rate"], r["model"], r["workers"])
            and b["variant"] in ("ddp-fp32", "ddp-adamw-fp32")]
    return next((b for b in same if ("adam" in b["variant"]) == adam), same[0] if same else None)


def time_to(curve, target, lower=False):
    """The training seconds at the first evaluation that reaches ``target`` (at or above it; at or below
    for a loss), or None."""
    for seconds, value in curve:
        if (value <= target) if lower else (value >= target):
            return seconds
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["mlp5m", "resnet20"])
    parser.add_argument("--variants", nargs="+", default=None, choices=ALL_VARIANTS,
                        help="default: the momentum-SGD variants, or for --models gpt the Adam ones")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 3 warm-up steps)")
    parser.add_argument("--epochs", type=int, default=0, help="also train this many epochs for time-to-accuracy (MNIST-1D models)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--gpt-lr", type=float, default=3e-4, help="the GPT's Adam lr (saef reproduce adam's)")
    parser.add_argument("--variant-lr", nargs="+", default=None, metavar="VARIANT=LR",
                        help="a variant's own lr (e.g. the one its study chose: saef-diloco=3e-4)")
    parser.add_argument("--evals-per-epoch", type=int, default=1, help="evaluations per epoch of the time-to-accuracy runs")
    parser.add_argument("--warmup", type=int, default=32, help="the GPT: full-precision steps of 1-bit Adam and SAEF-Adam "
                        "(and PowerSGD's start_powerSGD_iter)")
    parser.add_argument("--target-acc", type=float, default=None,
                        help="time-to-accuracy target (fraction); default: DDP fp32's final test accuracy in this run")
    parser.add_argument("--json", default="benchmarks/results/network.json", help="where to write the raw results")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    for given in args.variant_lr or []:
        name, _, value = given.partition("=")
        try:
            float(value)
        except ValueError:
            parser.error(f"--variant-lr {given}: give VARIANT=LR")
        if name not in ALL_VARIANTS:
            parser.error(f"--variant-lr {given}: no variant {name!r}")
    results = []

    def at(rate):
        for model in args.models:
            for k in args.workers:
                for variant in args.variants or (GPT_VARIANTS if model == "gpt" else VARIANTS):
                    epochs = args.epochs if not model.startswith("resnet") else 0
                    try:
                        r = run_variant(variant, model, k, argparse.Namespace(**{**vars(args), "epochs": epochs}))
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:  # report it, go on
                        r = {"variant": variant, "model": model, "workers": k, "step_s": None, "error": str(error).splitlines()[-1][:200]}
                    r["rate"] = rate
                    results.append(r)
                    shown = "failed: " + r["error"] if r["step_s"] is None else f"{1e3 * r['step_s']:.1f} ms/step"
                    print(f"# {rate} {model} K={k} {variant}: {shown}", file=sys.stderr, flush=True)

    in_namespaces("bench_network.py", args.rates, at)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"saef: {kernels_in_use()}")
    print("| rate | model | K | variant | median s/step | speed-up vs DDP fp32 | s/round (H steps) |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in results:
        base = ddp_fp32(results, r)
        if r["step_s"] is None:
            print(f"| {r['rate']} | {r['model']} | {r['workers']} | {r['variant']} | failed: {r.get('error')} | – | – |")
            continue
        speedup = "–" if base is None or base["step_s"] is None else f"{base['step_s'] / r['step_s']:.1f}x"
        per_round = f"{r['round_s']:.3f} ({r['local_steps']})" if r.get("local_steps", 1) > 1 else "–"
        print(f"| {r['rate']} | {r['model']} | {r['workers']} | {r['variant']} | {r['step_s']:.3f} | {speedup} | {per_round} |")
    curves = [r for r in results if "curve" in r]
    if curves:
        print()
        goal = "DDP fp32's final value" if args.target_acc is None else f"{100 * args.target_acc:.2f} %"
        print(f"| rate | model | K | variant | final test acc. (GPT: val. bits/byte) | training s to reach {goal} |")
        print("|---|---|---:|---|---:|---:|")
        for r in curves:
            if args.target_acc is not None:
                target = args.target_acc
            else:
                base = ddp_fp32(curves, r)
                if base is None:  # DDP fp32 was not among the variants run: no target (give --target-acc)
                    print(f"| {r['rate']} | {r['model']} | {r['workers']} | {r['variant']} | {r['curve'][-1][1]:.4g} | – (no DDP fp32 run) |")
                    continue
                target = base["curve"][-1][1]
            loss = r["model"] == "gpt"  # validation bits per byte: lower is better
            reached = time_to(r["curve"], target, lower=loss)
            shown = (lambda v: f"{v:.3f} bits/byte") if loss else (lambda v: f"{100 * v:.2f} %")
            print(f"| {r['rate']} | {r['model']} | {r['workers']} | {r['variant']} | {shown(r['curve'][-1][1])} "
                  f"| {'not reached' if reached is None else f'{reached:.0f}'} (target {shown(target)}) |")


if __name__ == "__main__":
    main()
