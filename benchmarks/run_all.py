"""Run every benchmark, one after the other, and keep each one's table in benchmarks/results/.

    python benchmarks/run_all.py              # simulator, compressor kernels, bytes on the wire
    sudo python benchmarks/run_all.py --network   # and the rate-limited network benchmarks (needs root, ~45 min)

Each table is printed as it is produced and saved as benchmarks/results/<name>.md; BENCHMARKS.md records
the tables with the machine and the date.
"""

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = {
    "simulator": ["bench_simulator.py"],
    "compressors": ["bench_compressors.py"],
    "wire": ["bench_wire.py"],
    "network": ["bench_network.py"],
    # time-to-accuracy at 100 Mbit/s: every variant for 4 epochs, then the fast ones for 10
    "network_tta4": ["bench_network.py", "--rates", "100mbit", "--workers", "2", "--models", "mlp5m", "--epochs", "4",
                     "--json", "benchmarks/results/network_tta4.json"],
    "network_tta10": ["bench_network.py", "--rates", "100mbit", "--workers", "2", "--models", "mlp5m", "--epochs", "10",
                      "--variants", "ddp-powersgd", "saef-sign", "saef-topk", "saef-topk-fp16", "--target-acc", "0.6485",
                      "--evals-per-epoch", "4", "--json", "benchmarks/results/network_tta10.json"],
    "gpt": ["bench_gpt.py"],
    "indexcode": ["bench_indexcode.py"],
    # the GPT with Adam at 100 Mbit/s: per step, and the time to DDP-AdamW-fp32's validation loss after 1 epoch
    # (216 steps of 128; 32 full-precision steps, 15 %, as in saef reproduce adam; 8 evaluations)
    "network_gpt": ["bench_network.py", "--rates", "100mbit", "--workers", "2", "4", "--models", "gpt", "--epochs", "1",
                    "--warmup", "32", "--gpt-lr", "3e-4", "--evals-per-epoch", "8", "--json", "benchmarks/results/network_gpt.json"],
    # two hosts (network namespaces) joined by a rate-limited veth pair, 2 ranks each: per step, 100 Mbit/s and 1 Gbit/s
    "network_two_hosts": ["bench_two_hosts.py"],
    # the step overlapped with backward, without, and with no communication: ResNet-20 at 100 and 10 Mbit/s, K = 4
    "network_overlap": ["bench_overlap.py", "--rates", "100mbit", "10mbit"],
}
NETWORK = ("network", "network_tta4", "network_tta10", "network_gpt", "network_two_hosts", "network_overlap")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", action="store_true", help="also run the network benchmarks (root only)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these")
    args = parser.parse_args()
    names = args.only or [n for n in BENCHMARKS if n not in NETWORK or args.network]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    for name in names:
        start = time.monotonic()
        print(f"== {name}", flush=True)
        script, *options = BENCHMARKS[name]
        result = subprocess.run([sys.executable, str(HERE / script), *options], capture_output=True, text=True, cwd=HERE.parent)
        sys.stdout.write(result.stdout)
        if result.returncode != 0:
            sys.stderr.write(result.stderr)
            sys.exit(f"benchmark {name} failed")
        header = f"<!-- {name}: {time.strftime('%Y-%m-%d')}, {platform.platform()}, {time.monotonic() - start:.0f} s -->\n"
        (out / f"{name}.md").write_text(header + result.stdout)


if __name__ == "__main__":
    main()
