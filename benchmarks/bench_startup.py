"""CLI start-up: how long `ipolicy --help`, `ipolicy entropy --help` and a mistyped flag take to answer.

    python benchmarks/bench_startup.py [--repeats 7]

Each command runs as a fresh process (the console script of the active environment), `--repeats` times; the median
wall time is reported. The CLI imports torch and the model stack only inside a command that needs them, so these
answer without loading them. Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"ipolicy --help": ["--help"], "ipolicy entropy --help": ["entropy", "--help"],
            "ipolicy entropy --no-such-flag": ["entropy", "--no-such-flag"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = parser.parse_args()
    executable = shutil.which("ipolicy", path=str(Path(sys.executable).parent)) or "ipolicy"
    results = {}
    for label, argv in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            done = subprocess.run([executable, *argv], capture_output=True, text=True)
            times.append(time.perf_counter() - started)
        assert done.returncode in (0, 2), done.stderr
        results[label] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                          "exit_code": done.returncode}
        print(f"{label:36s} {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
