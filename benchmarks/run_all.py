"""Run every benchmark, one after the other, and keep each one's table in benchmarks/results/.

    python benchmarks/run_all.py              # simulator, compressor kernels, bytes on the wire
    sudo python benchmarks/run_all.py --network   # and the rate-limited network benchmark (needs root)

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
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", action="store_true", help="also run the network benchmark (root only)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these")
    args = parser.parse_args()
    names = args.only or [n for n in BENCHMARKS if n != "network" or args.network]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    for name in names:
        start = time.monotonic()
        print(f"== {name}", flush=True)
        result = subprocess.run([sys.executable, str(HERE / BENCHMARKS[name][0])], capture_output=True, text=True)
        sys.stdout.write(result.stdout)
        if result.returncode != 0:
            sys.stderr.write(result.stderr)
            sys.exit(f"benchmark {name} failed")
        header = f"<!-- {name}: {time.strftime('%Y-%m-%d')}, {platform.platform()}, {time.monotonic() - start:.0f} s -->\n"
        (out / f"{name}.md").write_text(header + result.stdout)


if __name__ == "__main__":
    main()
