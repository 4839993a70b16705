"""GRPO vs BuPO on the embedded SmolLM2-135M-Instruct, on a CPU: every run, evaluation and interval of the README's
Results, regenerated from scratch (and resumed: a finished run or evaluation is not redone).

    python figures/experiments.py [--stage learn|compare|sweep|all] [--seeds 5] [--runs runs/experiments]

Task: the built-in ladder's one-digit addition and subtraction (``add-sub-1``; held-out problems ``add-sub-1:test``
never seen in training), reward ``last-number``. Recipe (docs/definitions.md §4-5): lr 1e-5, 8 prompts x 8 responses x
32 tokens a step, temperature 1, one PPO epoch, token-mean loss, float32. Evaluation: Avg@4 and pass@k on the 28
held-out problems (n = 4, 32 tokens).

* learn:   GRPO, ``--steps`` steps, seed 1: is the trained checkpoint above the base model? (paired bootstrap over
           problems)
* compare: GRPO and BuPO (K = 5 of 30, S = 2) with the same budget, ``--seeds`` seeds each (data order and rollouts
           differ by seed); BuPO - GRPO with a bootstrap interval over seeds and problems.
* sweep:   BuPO with S in {2, 6} and K in {5, 15}, 3 seeds (S = 0 is GRPO and K = 5, S = 2 is BuPO, both from
           compare).
* dynamics: GRPO and BuPO (K = 5, S = 2), seed 1, a checkpoint every step; internal policy entropy of every
           checkpoint on 16 held-out prompts (responses of the base model), with the refinement of layer 5.

A finished run keeps its checkpoints' weights but not their optimizer state (``trainer_state.safetensors``, twice the
model's size, only needed to resume training): 12 GB instead of 60 for the whole set.

Writes ``figures/experiments.json`` (every number, with its interval) and prints a table. Each run costs about 25 s a
step here (2-core CPU); on a GPU the same script is dominated by model loading.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

import internal_policy as ip

ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(data="add-sub-1", reward="last-number", lr=1e-5, prompts_per_step=8, group_size=8, max_new_tokens=32,
              micro_batch_size=16)
HELD_OUT = "add-sub-1:test"


def train(runs: Path, name: str, steps: int, seed: int, save_every: int | None = None, **bupo) -> Path:
    """One training run (resumed from its last checkpoint if interrupted, skipped if done); returns its folder.
    ``save_every`` defaults to half the steps."""
    out, run = runs / name, ip.RunFolder(runs / name)
    if not (run.checkpoints() and run.checkpoints()[-1].name == f"step-{steps}"):
        if run.is_run() and not run.checkpoints():  # interrupted before its first checkpoint: start it again
            shutil.rmtree(out)
        config = ip.TrainConfig(**RECIPE, steps=steps, seed=seed, save_every=save_every or max(1, steps // 2), **bupo)
        ip.train(config, out=out, resume=run.is_run(), progress=True)
    for state in out.glob("checkpoints/step-*/trainer_state.safetensors"):  # finished: the optimizer is not needed
        state.unlink()
    return out


def evaluate(runs: Path, model: str, name: str) -> pd.DataFrame:
    """Per-problem accuracy (the terms of Avg@4) and pass@4 of one model on the held-out problems, in problem order;
    an evaluation already in ``runs/eval/name`` is reused."""
    ip.evaluate(models=[model], datasets=[HELD_OUT], n=4, k=(1, 4), max_new_tokens=32, reward="last-number",
                out=runs / "eval" / name)
    return pd.read_csv(runs / "eval" / name / "problems.csv").sort_values("problem")[["accuracy", "pass@4"]]


def bootstrap(values: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile interval of the mean of ``values`` [problems] or [seeds, problems] (both axes
    resampled)."""
    rng = np.random.default_rng(seed)
    values = np.atleast_2d(values)
    means = []
    for _ in range(draws):
        rows = values[rng.integers(0, values.shape[0], values.shape[0])]
        means.append(rows[:, rng.integers(0, values.shape[1], values.shape[1])].mean())
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def learn(runs: Path, steps: int) -> dict:
    run = train(runs, "learn-grpo-seed1", steps, seed=1)
    base = evaluate(runs, "smollm2-135m-instruct", "base")["accuracy"].to_numpy()
    trained = evaluate(runs, str(run / "checkpoints" / f"step-{steps}"), "learn-grpo-seed1")["accuracy"].to_numpy()
    return {"steps": steps, "base_avg@4": bootstrap(base), "grpo_avg@4": bootstrap(trained),
            "grpo_minus_base": bootstrap(trained - base)}


def compare(runs: Path, steps: int, seeds: int, configs: dict[str, dict], save_every: int | None = None) -> dict:
    """Every configuration for seeds 1..``seeds`` (seed by seed, so that an interrupted stage has complete pairs),
    each final checkpoint evaluated; returns Avg@4 per configuration and each one's difference to GRPO."""
    table: dict[str, list[np.ndarray]] = {name: [] for name in configs}
    passes: dict[str, list[np.ndarray]] = {name: [] for name in configs}
    for s in range(1, seeds + 1):
        for name, bupo in configs.items():
            run = train(runs, f"{name}-seed{s}", steps, seed=s, save_every=save_every, **bupo)
            problems = evaluate(runs, str(run / "checkpoints" / f"step-{steps}"), f"{name}-seed{s}")
            table[name].append(problems["accuracy"].to_numpy())
            passes[name].append(problems["pass@4"].to_numpy())
    table = {name: np.stack(rows) for name, rows in table.items()}
    passes = {name: np.stack(rows) for name, rows in passes.items()}
    out = {name: {"avg@4": bootstrap(acc), "per_seed": acc.mean(axis=1).tolist(),
                  "pass@4": bootstrap(passes[name]), "pass@4_per_seed": passes[name].mean(axis=1).tolist(),
                  "final_entropy_per_seed": [final_entropy(runs / f"{name}-seed{s}") for s in range(1, seeds + 1)]}
           for name, acc in table.items()}
    grpo = table.pop("grpo", None)
    for name, acc in table.items():
        if grpo is not None:
            out[name]["minus_grpo"] = bootstrap(acc - grpo)
            out[name]["pass@4_minus_grpo"] = bootstrap(passes[name] - passes["grpo"])
    return out


def final_entropy(run: Path) -> float:
    """The entropy of the model's own policy on its rollouts at the last step (metrics.jsonl), nats."""
    return float(ip.RunFolder(run).metrics()["entropy"].iloc[-1])


def sweep_figure(sweep: dict, path: Path) -> None:
    """Held-out Avg@4 of each configuration: one dot per seed, the mean with its bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sweep)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.6))
    for i, name in enumerate(names):
        mean, low, high = sweep[name]["avg@4"]
        ax.errorbar(i, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="black", capsize=4)
        ax.scatter([i] * len(sweep[name]["per_seed"]), sweep[name]["per_seed"], color="tab:blue", alpha=0.5, s=18)
    labels = {"grpo": "GRPO", "bupo": "BuPO\nK=5, S=2"}
    ax.set_xticks(range(len(names)), [labels.get(n, n.replace("bupo-k", "BuPO\nK=").replace("-s", ", S=")) for n in names])
    ax.set(ylabel="held-out Avg@4", title="GRPO and BuPO's internal phase (3 seeds; 95 % bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.savefig(path.with_suffix(".pdf"))


def dynamics(runs: Path, steps: int, configs: dict[str, dict]) -> dict:
    """Seed-1 runs with a checkpoint every step, and the internal policy entropy of every checkpoint (and of the base
    model) on the same held-out prompts and base-model responses, with the refinement of layer 5."""
    out = {}
    for name, bupo in configs.items():
        run = train(runs, f"dyn-{name}-seed1", steps, seed=1, save_every=1, **bupo)
        ip.compare([str(run)], data=HELD_OUT, limit=16, max_new_tokens=32, refine_layer=5,
                   out=runs / f"dyn-{name}-seed1-entropy", progress=True)
        out[name] = {"run": run.name, "entropy": f"{run.name}-entropy"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["learn", "compare", "sweep", "dynamics", "all"], default="all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "experiments")
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "experiments.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.stage in ("learn", "all"):
        results["learn"] = learn(args.runs, args.steps)
    if args.stage in ("compare", "all"):
        results["compare"] = compare(args.runs, args.steps, args.seeds,
                                     {"grpo": {}, "bupo": dict(internal_layer=5, internal_steps=2)})
    if args.stage in ("sweep", "all"):
        configs = {"grpo": {}, "bupo": dict(internal_layer=5, internal_steps=2),  # "bupo" is K = 5, S = 2
                   **{f"bupo-k{k}-s{s}": dict(internal_layer=k, internal_steps=s) for k, s in ((5, 6), (15, 2), (15, 6))}}
        results["sweep"] = compare(args.runs, args.steps, 3, configs, save_every=args.steps)
        sweep_figure(results["sweep"], args.out.parent / "sweep_avg_at_4.png")
    if args.stage in ("dynamics", "all"):
        results["dynamics"] = dynamics(args.runs, args.steps, {"grpo": {}, "bupo-k5-s2": dict(internal_layer=5, internal_steps=2)})
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
