"""Long-run stability: memory of a long `ipolicy entropy` run and of a long `ipolicy train-grpo` run.

    python benchmarks/bench_stability.py [--samples 300] [--steps 40]

Both commands run as child processes on SmolLM2-135M-Instruct (the embedded model); a sampler reads the child's RSS
every 0.2 s together with its progress (entropy: finished batches in .partial/; training: lines of metrics.jsonl).

* entropy: ``--samples`` MATH-500 problems, each with a short given response (its boxed ground truth), ``--fast``,
  small batches so that there are many. Flat memory means: the peak RSS at the end is within 10 % of the peak after
  the first batches.
* training: ``--steps`` GRPO steps of 2 prompts x 4 responses x 16 tokens. No growth means: RSS after each step
  shows no trend (the fitted slope, in MB per step, after a warm-up of 5 steps).

Writes benchmarks/results/stability.json (the curves and the summary) and stability.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internal_policy.data import load_samples  # noqa: E402


def run_and_sample(command: list[str], progress) -> list[dict]:
    """Run ``command``; every 0.2 s record (seconds, RSS in GB, progress()) until it ends."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    process, started, curve = psutil.Process(child.pid), time.perf_counter(), []
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(child.stderr), daemon=True)
    reader.start()
    while child.poll() is None:
        try:
            rss = process.memory_info().rss / 1e9
        except psutil.NoSuchProcess:
            break
        if rss == 0:  # the process has exited (a zombie reads 0)
            break
        curve.append({"seconds": time.perf_counter() - started, "rss_gb": rss, "progress": progress()})
        time.sleep(0.2)
    if child.wait() != 0:
        raise SystemExit(f"{command} failed:\n{''.join(stderr)[-3000:]}")
    return curve


def entropy_run(samples: int, work: Path) -> dict:
    data = work / "math500-answers.jsonl"
    rows = [{"prompt": s.prompt, "response": f"The answer is \\boxed{{{s.answer}}}."}
            for s in load_samples("math500", limit=samples)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / "entropy"

    def progress():  # finished batches while they are shards; -1 once merged (.partial removed at the end)
        shards = len(list((out / ".partial").glob("batch-*.parquet")))
        return -1 if shards == 0 and (out / "tokens.parquet").is_file() else shards

    curve = run_and_sample([sys.executable, "-m", "ipolicy_cli.main", "entropy", "--data", str(data), "--out", str(out),
                            "--fast", "--batch-tokens", "1024", "-q"], progress)
    batches = max(point["progress"] for point in curve)
    early = max(p["rss_gb"] for p in curve if 1 <= p["progress"] <= 3)
    during = max(p["rss_gb"] for p in curve if p["progress"] >= 1)  # the analysis and the merge of its shards
    final = max(p["rss_gb"] for p in curve)
    return {"samples": samples, "batches": batches, "peak_rss_after_3_batches_gb": early,
            "peak_rss_over_all_batches_gb": max(p["rss_gb"] for p in curve if 1 <= p["progress"] < batches),
            "peak_rss_gb": final, "growth_after_first_batches": final / early - 1, "peak_until_merged_gb": during,
            "seconds": curve[-1]["seconds"], "curve": curve}


def training_run(steps: int, work: Path) -> dict:
    out = work / "train"
    curve = run_and_sample([sys.executable, "-m", "ipolicy_cli.main", "train-grpo", "--data", "arithmetic", "--limit", "64",
                            "--steps", str(steps), "--prompts-per-step", "2", "--group-size", "4",
                            "--max-new-tokens", "16", "--lr", "1e-6", "--save-every", str(steps), "--out", str(out),
                            "-q"],
                           lambda: len((out / "metrics.jsonl").read_text().splitlines())
                           if (out / "metrics.jsonl").is_file() else 0)
    per_step = {}
    for point in curve:  # the RSS at the end of each step: the last reading before the next step's line
        if point["progress"] >= 1:
            per_step[point["progress"]] = point["rss_gb"]
    steps_done = sorted(per_step)
    warm = [s for s in steps_done if s > 5]
    slope = float(np.polyfit(warm, [per_step[s] for s in warm], 1)[0]) * 1e3 if len(warm) > 2 else float("nan")
    return {"steps": steps, "rss_after_step_gb": {str(s): per_step[s] for s in steps_done},
            "slope_mb_per_step_after_warmup": slope,
            "rss_range_after_warmup_gb": [min(per_step[s] for s in warm), max(per_step[s] for s in warm)] if warm else [],
            "seconds": curve[-1]["seconds"], "curve": curve}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    entropy = results["entropy"]["curve"]
    left.plot([p["seconds"] for p in entropy], [p["rss_gb"] for p in entropy], "-", linewidth=1)
    left.set(xlabel="seconds (model load, the batches, then the merge)", ylabel="RSS (GB)",
             title=f"ipolicy entropy, {results['entropy']['samples']} samples (--fast)")
    steps = results["training"]["rss_after_step_gb"]
    right.plot([int(s) for s in steps], list(steps.values()), "o-", markersize=3)
    right.set(xlabel="training step", ylabel="RSS after the step (GB)",
              title=f"ipolicy train-grpo, {results['training']['steps']} steps")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stability.json")
    parser.add_argument("--parts", default="entropy,training", help="which runs (a previous result keeps the others)")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as work:
        if "entropy" in args.parts:
            results["entropy"] = entropy_run(args.samples, Path(work))
        if "training" in args.parts:
            results["training"] = training_run(args.steps, Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    e, t = results["entropy"], results["training"]
    print(f"entropy: {e['batches']} batches, peak RSS {e['peak_rss_after_3_batches_gb']:.3f} GB after 3 batches, "
          f"{e['peak_rss_over_all_batches_gb']:.3f} GB over all batches, {e['peak_rss_gb']:.3f} GB with the final "
          f"merge ({100 * e['growth_after_first_batches']:+.1f} %)")
    print(f"training: {t['steps']} steps, RSS {t['rss_range_after_warmup_gb']} GB after step 5, slope "
          f"{t['slope_mb_per_step_after_warmup']:+.2f} MB/step")


if __name__ == "__main__":
    main()
