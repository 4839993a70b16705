"""What an `ipolicy entropy` run costs: time and peak memory against response length and number of samples.

    python benchmarks/bench_scaling.py [--lengths 128 256 512 1024 2048 4096] [--samples 4 16] [--sample-tokens 256]

Each cell is one real `ipolicy entropy` run on the embedded SmolLM2-135M-Instruct, in a fresh process, exact and
`--fast`, on given responses (the text of MATH-500 problems cut to the length, after a one-line prompt): the wall
time of the whole command, the manifest's load and analysis times, and the process's peak resident memory. Writes
``benchmarks/results/scaling.{json,csv,png}``; each finished cell is kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IPOLICY = Path(sys.executable).parent / "ipolicy"


def write_samples(folder: Path, lengths: list[int], counts: list[int], sample_tokens: int) -> dict[str, Path]:
    """One JSONL file per cell, written by a child process (which loads the tokenizer) so that this process stays
    small: a child's peak memory as wait4 reports it is at least the parent's size at fork."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from internal_policy.data import load_samples
from internal_policy.models import model_files
tokenizer = model_files("smollm2-135m-instruct").tokenizer
text = " ".join(m[-1]["content"] for m in (s.prompt for s in load_samples("math500", limit=500)))
ids = tokenizer(text, add_special_tokens=False)["input_ids"]
def rows(n, count):
    return [{{"id": f"s{{i}}", "prompt": "Restate these problems.",
             "response": tokenizer.decode(ids[i * 7919 % 20000:][:n])}} for i in range(count)]
cells = {{**{{f"len{{n}}": rows(n, 1) for n in {lengths!r}}}, **{{f"n{{c}}": rows({sample_tokens}, c) for c in {counts!r}}}}}
for name, cell in cells.items():
    open({str(folder)!r} + "/" + name + ".jsonl", "w").write("".join(json.dumps(r) + "\\n" for r in cell))
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return {p.stem: p for p in folder.glob("*.jsonl")}


def run_cell(data: Path, fast: bool, out: Path) -> dict:
    """One `ipolicy entropy` process; its wall time, peak RSS (GB) and manifest timings."""
    command = [str(IPOLICY), "entropy", "--data", str(data), "--out", str(out), "-q"] + (["--fast"] if fast else [])
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    timings = manifest["timings"]
    return {"n_samples": manifest["n_samples"], "n_tokens": manifest["n_tokens"], "mode": "fast" if fast else "exact",
            "wall_s": wall, "load_s": timings["load_s"], "analyse_s": timings["analyse_s"],
            "tokens_per_second": timings["tokens_per_second"], "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    single = table[table["n_samples"] == 1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    sns.lineplot(data=single, x="n_tokens", y="analyse_s", hue="mode", marker="o", ax=left)
    sns.lineplot(data=single, x="n_tokens", y="peak_rss_gb", hue="mode", marker="o", ax=right)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
    left.set(yscale="log", xlabel="response tokens (one sample)", ylabel="analysis time (s)")
    right.set(xlabel="response tokens (one sample)", ylabel="peak memory (GB)", ylim=(0, None))
    fig.suptitle("ipolicy entropy on SmolLM2-135M-Instruct, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 16],
                        help="numbers of samples (the single sample is --lengths' --sample-tokens cell)")
    parser.add_argument("--sample-tokens", type=int, default=256, help="response tokens of each sample in --samples")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    args = parser.parse_args()

    import pandas as pd

    done = json.loads(args.out.read_text())["cells"] if args.out.is_file() else {}
    work = Path(tempfile.mkdtemp())
    files = write_samples(work, args.lengths, args.samples, args.sample_tokens)
    for name, data in sorted(files.items(), key=lambda item: item[1].stat().st_size):
        for fast in (False, True):
            key = f"{name}-{'fast' if fast else 'exact'}"
            if key in done:
                continue
            done[key] = run_cell(data, fast, work / key)
            print(json.dumps({"cell": key, **done[key]}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "cpus": os.cpu_count(), "cells": done}, indent=2) + "\n")
    table = pd.DataFrame(done.values()).drop_duplicates(subset=["n_samples", "n_tokens", "mode"])
    table = table.sort_values(["mode", "n_samples", "n_tokens"])
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    plot(table, args.out.with_suffix(".png"))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
