"""GRPO vs BuPO on the embedded SmolLM2-135M-Instruct, on a CPU: every run, evaluation and interval of the README's
Results, regenerated (and resumed: a finished run or evaluation is not redone; the paper-ratio stage's finished
evaluations are kept in the repository, figures/data/paper-ratio/, and reused: move it aside to redo them).

    python figures/experiments.py [--stage STAGE] [--seeds 5] [--runs runs/experiments] [--out experiments.json]

STAGE: learn, compare, sweep, dynamics, seed-tests, paper-ratio, paper-ratio-summary, paper-ratio-dynamics or all.

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

* paper-ratio: the paper's budget ratio on a task neither method saturates (``add-sub-2x1``, held-out split of 379
           problems, the first 100 evaluated): GRPO, BuPO K = 5 and K = 15 with S = 3 of T = 30 steps, two
           mini-batches a step, ``--seeds`` seeds; every final checkpoint (and GRPO's step 27, the control with BuPO's
           full-policy budget) evaluated with n = 64 responses a problem: Avg@64 and pass@{1,4,16,64}. Each finished
           evaluation and run's metrics are kept in figures/data/paper-ratio/ (tracked), so the stage resumes on
           another machine without the checkpoints; ``protocol.json`` there records the settings they were made with,
           and the stage refuses to add to them under others. Cost with the 2-core CPU free (seeds 3-4): 13-15 min
           for a 30-step run (756-801 s of steps) and 4-12 min for an evaluation (6400 responses); a seed is 3 runs
           and 4 evaluations, 65-80 min.
* paper-ratio-summary: experiments.json's ``paper_ratio`` from the kept evaluations alone (the complete seeds; while
           none is, every finished evaluation's means), its figure, and the Results page's tables (printed last).
* paper-ratio-dynamics: seed 1 of each method, a checkpoint every 3 steps: internal policy entropy of every checkpoint
           in both norm modes, the refinement of the internal layer (tables kept in figures/data/paper-ratio/dynamics/,
           so the figures are redrawn from them without a run), and the figures (figures/paper-ratio/).

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
from internal_policy.models import resolve_device
from internal_policy.stats import bootstrap_mean as bootstrap, seed_level_test

ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(data="add-sub-1", reward="last-number", lr=1e-5, prompts_per_step=8, group_size=8, max_new_tokens=32,
              micro_batch_size=16)
HELD_OUT = "add-sub-1:test"
KEPT = ROOT / "figures" / "data" / "paper-ratio"  # tracked: each finished paper-ratio evaluation and run's metrics


def train(runs: Path, name: str, steps: int, seed: int, save_every: int | None = None, recipe: dict = RECIPE,
          **bupo) -> Path:
    """One training run (resumed from its last checkpoint if interrupted, skipped if done); returns its folder.
    ``save_every`` defaults to half the steps."""
    out, run = runs / name, ip.RunFolder(runs / name)
    if not (run.checkpoints() and run.checkpoints()[-1].name == f"step-{steps}"):
        if run.is_run() and not run.checkpoints():  # interrupted before its first checkpoint: start it again
            shutil.rmtree(out)
        config = ip.TrainConfig(**recipe, steps=steps, seed=seed, save_every=save_every or max(1, steps // 2), **bupo)
        ip.train(config, out=out, resume=run.is_run(), progress=True)
    for state in out.glob("checkpoints/step-*/trainer_state.safetensors"):  # finished: the optimizer is not needed
        state.unlink()
    return out


def evaluate(runs: Path, model: str, name: str) -> pd.DataFrame:
    """Per-problem accuracy (the terms of Avg@4) and pass@4 of one model on the held-out problems, in problem order;
    an evaluation already in ``runs/eval/name`` is reused."""
    if not (runs / "eval" / name / "problems.csv").is_file():
        ip.evaluate(model=[model], data=[HELD_OUT], n=4, k=(1, 4), max_new_tokens=32, reward="last-number",
                    out=runs / "eval" / name)
    return pd.read_csv(runs / "eval" / name / "problems.csv").sort_values("problem")[["accuracy", "pass@4"]]


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
            out[name]["minus_grpo_seed_test"] = seed_level_test(acc.mean(axis=1) - grpo.mean(axis=1))
    return out


def add_seed_tests(results: dict) -> dict:
    """A seed-level paired test next to every stored BuPO - GRPO comparison of the compare and sweep stages, from the
    per-seed Avg@4 they hold (the training run is the unit that repeats; the two-way bootstrap mostly reflects the
    problems). Needs no runs."""
    for stage in ("compare", "sweep"):
        table = results.get(stage, {})
        grpo = np.asarray(table.get("grpo", {}).get("per_seed", []))
        for name, row in table.items():
            if name != "grpo" and len(grpo) and len(row["per_seed"]) == len(grpo):
                row["minus_grpo_seed_test"] = seed_level_test(np.asarray(row["per_seed"]) - grpo)
    return results


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


# ---------------------------------------------------------------------------------------------------------------
# GRPO vs BuPO at the paper's budget ratio (S = 10 % of T), on a task neither saturates, with pass@k up to k = 64.
PAPER_RATIO = dict(
    task="add-sub-2x1",  # a two-digit number +- a one-digit one: SmolLM2 starts near 0.05 (README, Results)
    steps=30, internal_steps=3, layers=(5, 15),  # T = 30, S = 3 (10 %), K = 5 and 15 of 30 layers
    mini_batch_prompts=4,  # two mini-batches a step: the second is off-policy, so the clipped ratio acts
    save_every=3, n=64, ks=(1, 4, 16, 64), problems=100, max_new_tokens=32,
)


def paper_ratio_methods() -> dict[str, dict]:
    c = PAPER_RATIO
    return {"grpo": {}, **{f"bupo-k{k}": dict(internal_layer=k, internal_steps=c["internal_steps"]) for k in c["layers"]}}


def evaluate_at_64(root: Path, model: str, name: str) -> pd.DataFrame:
    """n = 64 responses on each of the first 100 held-out problems (in the seed-0 order, the same for every model):
    per-problem accuracy (the terms of Avg@64) and unbiased pass@k, in problem order. Kept in ``KEPT/name``
    (tracked, so that a later session or machine resumes without the checkpoints) and reused when there."""
    c = PAPER_RATIO
    kept = KEPT / name / "problems.csv"
    if not kept.is_file():
        ip.evaluate(model=[model], data=[f"{c['task']}:test"], n=c["n"], k=c["ks"], limit=c["problems"],
                    max_new_tokens=c["max_new_tokens"], reward="last-number", batch_size=256, out=root / "eval" / name)
        keep(root / "eval" / name, kept.parent, ["summary.json", "problems.csv"])
    return read_kept(name)


def read_kept(name: str) -> pd.DataFrame:
    columns = ["problem", "accuracy", *(f"pass@{k}" for k in PAPER_RATIO["ks"])]
    return pd.read_csv(KEPT / name / "problems.csv").sort_values("problem")[columns].reset_index(drop=True)


def keep(source: Path, kept: Path, files: list[str]) -> None:
    """Copy ``files`` of a finished run or evaluation into ``kept``, the last one last (its presence means done)."""
    kept.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy(source / file, kept / f".{file}.tmp")
        (kept / f".{file}.tmp").replace(kept / file)


def prune(run: Path, keep: set[int]) -> None:
    """Drop the checkpoints of a finished run that no analysis reads (each is 0.5 GB): keep the steps in ``keep``."""
    for checkpoint in ip.RunFolder(run).checkpoints():
        if int(checkpoint.name[5:]) not in keep:
            shutil.rmtree(checkpoint)


def paper_ratio_recipe() -> dict:
    """The training recipe of the paper-ratio stage: the README's, on its task, with two mini-batches a step."""
    return dict(RECIPE, data=PAPER_RATIO["task"], mini_batch_prompts=PAPER_RATIO["mini_batch_prompts"])


def paper_ratio_protocol(device: str) -> dict:
    """What the kept paper-ratio results depend on: the stage's settings, the training recipe and where the numbers
    were computed (``device``: "cpu" or "cuda", where ``dtype="auto"`` means float32 or bfloat16)."""
    return {"paper_ratio": json.loads(json.dumps(PAPER_RATIO)), "recipe": paper_ratio_recipe(), "device": device}


def check_protocol(device: str | None) -> None:
    """Refuse to add to, or summarise, kept results made under another protocol than this one (``KEPT/protocol.json``).
    ``device``: where the stage is about to compute ("cpu" or "cuda"); with nothing kept yet it records this protocol.
    ``device=None`` (the summary, which only reads) checks the settings and writes nothing."""
    path = KEPT / "protocol.json"
    mine = paper_ratio_protocol(device or "cpu")
    nothing_kept = not any(KEPT.glob("*/*.csv")) and not any(KEPT.glob("*/metrics.jsonl"))
    if nothing_kept:  # nothing to mix with: this run's protocol becomes the record
        if device:
            KEPT.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(mine, indent=2) + "\n")
        return
    if not path.is_file():
        raise SystemExit(f"error: the kept paper-ratio results in {KEPT} have no {path.name}, so how they were made is "
                         f"unknown. Fix: restore it (git checkout -- {path}), or move the folder aside "
                         "to start the experiment afresh.")
    kept = json.loads(path.read_text())
    changed = []
    for section in ("paper_ratio", "recipe", *(("device",) if device else ())):
        was, now = kept.get(section), mine[section]
        if isinstance(was, dict):
            changed += [f"{section}.{k} {json.dumps(was.get(k))} (now {json.dumps(now.get(k))})"
                        for k in sorted(was | now) if was.get(k) != now.get(k)]
        elif was != now:
            changed.append(f"{section} {json.dumps(was)} (now {json.dumps(now)})")
    if changed:
        raise SystemExit(
            f"error: the kept paper-ratio results in {KEPT} were made with {', '.join(changed)} ({path.name}); "
            "adding to them would mix two protocols. Fix: restore those settings (on a GPU machine, "
            "CUDA_VISIBLE_DEVICES= keeps the CPU's float32), or move the folder aside to start the experiment afresh.")


def one_run_for_grpo(root: Path, seed: int) -> None:
    """Make GRPO's two evaluations of ``seed``, its final checkpoint and its step-(T - S) control, come from one run.
    A kept evaluation counts as this run's only when it scored this run's checkpoint (the path its summary.json
    records) and that checkpoint is still here; otherwise both kept evaluations are dropped and made again from the
    run trained here. A finished run that lost the control's checkpoint is trained again."""
    c = PAPER_RATIO
    run = root / f"grpo-seed{seed}"
    control = c["steps"] - c["internal_steps"]
    names = {c["steps"]: f"grpo-seed{seed}", control: f"grpo-{control}-seed{seed}"}
    here = {step: run / "checkpoints" / f"step-{step}" for step in names}
    kept = [step for step, name in names.items() if (KEPT / name / "problems.csv").is_file()]
    if len(kept) == len(names):
        return
    if here[c["steps"]].is_dir() and not all(checkpoint.is_dir() for checkpoint in here.values()):
        shutil.rmtree(run)  # finished, but a checkpoint to evaluate is gone: only training again brings it back

    def scored_here(step: int) -> bool:
        scored = json.loads((KEPT / names[step] / "summary.json").read_text())["config"]["model"]
        return here[step].is_dir() and [Path(m).resolve() for m in scored] == [here[step].resolve()]

    if not all(scored_here(step) for step in kept):
        for name in names.values():
            shutil.rmtree(KEPT / name, ignore_errors=True)
            shutil.rmtree(root / "eval" / name, ignore_errors=True)


def paper_ratio(runs: Path, seeds: int) -> dict:
    """Every run and evaluation of the paper-ratio stage, seed by seed (GRPO, then BuPO at each K, then the control),
    resumable, also on another machine: a run whose final evaluation is kept (``KEPT``) is not trained again. The GRPO
    run's checkpoint at step T - S is the control "GRPO with BuPO's full-policy budget" (a constant learning rate and
    a data order fixed by the seed make it exactly a (T - S)-step GRPO run). Returns ``paper_ratio_summary``."""
    check_protocol(resolve_device("auto"))
    c = PAPER_RATIO
    root = runs / "paper-ratio"
    control = c["steps"] - c["internal_steps"]
    for s in range(1, seeds + 1):
        for name, bupo in paper_ratio_methods().items():
            if name == "grpo":
                one_run_for_grpo(root, s)
            kept_control = (KEPT / f"grpo-{control}-seed{s}" / "problems.csv").is_file()
            if (KEPT / f"{name}-seed{s}" / "problems.csv").is_file() and (name != "grpo" or kept_control):
                continue
            run = train(root, f"{name}-seed{s}", c["steps"], seed=s, save_every=c["save_every"],
                        recipe=paper_ratio_recipe(), **bupo)
            keep(run, KEPT / f"{name}-seed{s}", ["run.json", "metrics.jsonl"])
            evaluate_at_64(root, str(run / "checkpoints" / f"step-{c['steps']}"), f"{name}-seed{s}")
            if name == "grpo":
                evaluate_at_64(root, str(run / "checkpoints" / f"step-{control}"), f"grpo-{control}-seed{s}")
            if s > 1:  # seed 1 keeps a checkpoint every 3 steps for the dynamics stage
                prune(run, {control, c["steps"]} if name == "grpo" else {c["steps"]})
        evaluate_at_64(root, RECIPE.get("model", ip.DEFAULT_MODEL), "base")
    return paper_ratio_summary(seeds)


def complete_seeds() -> list[int]:
    """The seeds whose every paper-ratio evaluation is kept: each method's final checkpoint and GRPO's control."""
    control = PAPER_RATIO["steps"] - PAPER_RATIO["internal_steps"]
    names = [*paper_ratio_methods(), f"grpo-{control}"]
    seeds = sorted(int(p.parent.name.removeprefix("grpo-seed")) for p in KEPT.glob("grpo-seed*/problems.csv"))
    return [s for s in seeds if all((KEPT / f"{n}-seed{s}" / "problems.csv").is_file() for n in names)]


def paper_ratio_summary(seeds: int) -> dict:
    """The numbers of experiments.json's ``paper_ratio`` from the kept evaluations: every method over every complete
    seed (``complete_seeds``), pass@k and Avg@64 with bootstrap intervals over seeds and problems, the paired
    differences with a seed-level test; ``complete`` says whether the ``seeds`` planned are all there."""
    check_protocol(None)
    c = PAPER_RATIO
    control = c["steps"] - c["internal_steps"]
    names = [*paper_ratio_methods(), f"grpo-{control}"]
    done = complete_seeds()
    metrics = ["accuracy", *(f"pass@{k}" for k in c["ks"])]
    rename = {"accuracy": f"avg@{c['n']}"}
    kept = {p.parent.name: {rename.get(m, m): float(v) for m, v in read_kept(p.parent.name)[metrics].mean().items()}
            for p in sorted(KEPT.glob("*/problems.csv"))}
    if not done or "base" not in kept:  # in progress: every finished evaluation, one mean each, no comparison yet
        return {"task": c["task"], "T": c["steps"], "S": c["internal_steps"], "K": list(c["layers"]), "n": c["n"],
                "seeds": 0, "seeds_planned": seeds, "complete": False, "evaluated": kept}
    base = read_kept("base")
    seconds = {f"{n}-seed{s}": float(pd.read_json(KEPT / f"{n}-seed{s}" / "metrics.jsonl", lines=True)["step_seconds"].sum())
               for n in paper_ratio_methods() for s in done}
    result = {"task": c["task"], "held_out_problems": len(base), "T": c["steps"], "S": c["internal_steps"],
              "K": list(c["layers"]), "mini_batches": RECIPE["prompts_per_step"] // c["mini_batch_prompts"],
              "n": c["n"], "seeds": len(done), "seeds_planned": seeds, "complete": len(done) >= seeds,
              "seed_list": done, "train_seconds": seconds, "evaluated": kept,
              "base": {rename.get(m, m): bootstrap(base[m].to_numpy()) for m in metrics},
              "methods": {}, "differences": {}}
    stacked = {n: {m: np.stack([read_kept(f"{n}-seed{s}")[m].to_numpy() for s in done]) for m in metrics} for n in names}
    for name, values in stacked.items():
        result["methods"][name] = {rename.get(m, m): {"mean": bootstrap(v), "per_seed": v.mean(axis=1).tolist()}
                                   for m, v in values.items()}
        if name in paper_ratio_methods():
            result["methods"][name]["final_entropy_per_seed"] = [
                float(pd.read_json(KEPT / f"{name}-seed{s}" / "metrics.jsonl", lines=True)["entropy"].iloc[-1])
                for s in done]
    bupos = [n for n in names if n.startswith("bupo")]
    pairs = [(f"{b} - grpo", b, "grpo") for b in bupos] + [(f"{b} - grpo-{control}", b, f"grpo-{control}") for b in bupos]
    pairs += [(f"grpo - grpo-{control}", "grpo", f"grpo-{control}")]
    for label, a, b in pairs:
        result["differences"][label] = {rename.get(m, m): {
            "bootstrap": bootstrap(stacked[a][m] - stacked[b][m]),
            "seed_test": seed_level_test(stacked[a][m].mean(axis=1) - stacked[b][m].mean(axis=1))
            if len(done) > 1 else None} for m in metrics}  # a seed-level test needs two seeds
    return result


def method_labels(result: dict) -> dict[str, str]:
    """Each method's label in the figure and tables of ``result`` (``paper_ratio_summary``'s), in their row order."""
    control = result["T"] - result["S"]
    return {"grpo": f"GRPO, T = {result['T']}", f"grpo-{control}": f"GRPO, T \u2212 S = {control}",
            **{f"bupo-k{k}": f"BuPO K = {k}, S = {result['S']}" for k in result["K"]}}


def paper_ratio_figures(result: dict, out: Path) -> list[Path]:
    """figures/paper_ratio_pass_at_k.{png,pdf}: pass@k against k per method with its bootstrap band (Fig. 6's view),
    and beside it each BuPO's paired difference to GRPO against k (same seeds, same problems) with its band; none
    while no seed is complete."""
    if not result["seeds"]:
        return []
    import matplotlib.pyplot as plt

    from internal_policy.figures import pass_at_k_bands, save_figure

    control = f"grpo-{result['T'] - result['S']}"
    names = {"base": "base model", **method_labels(result)}
    colors = dict(zip(names.values(), ["0.45", "#0072B2", "#56B4E9", "#D55E00", "#CC79A7"]))
    styles = {name: {"color": color} for name, color in colors.items()}
    styles[names[control]].update(linestyle="--", marker="s")  # it lies on GRPO's line: dashed, so both show
    rows = [{"method": "base model", "k": int(m[5:]), "mean": v[0], "low": v[1], "high": v[2]}
            for m, v in result["base"].items() if m.startswith("pass@")]
    rows += [{"method": names[name], "k": int(m[5:]), "mean": v["mean"][0], "low": v["mean"][1], "high": v["mean"][2]}
             for name in names if name != "base" for m, v in result["methods"][name].items() if m.startswith("pass@")]
    differences = [{"method": f"{names[name]} \u2212 GRPO", "k": int(m[5:]), "mean": v["bootstrap"][0],
                    "low": v["bootstrap"][1], "high": v["bootstrap"][2]}
                   for name in names if name.startswith("bupo")
                   for m, v in result["differences"][f"{name} - grpo"].items() if m.startswith("pass@")]
    seeds = f"{result['seeds']} seed{'s' if result['seeds'] > 1 else ''}"
    interim = "" if result["complete"] else f" of {result['seeds_planned']} (interim)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    pass_at_k_bands(pd.DataFrame(rows), "pass@k per method", ax=left, styles=styles)
    pass_at_k_bands(pd.DataFrame(differences), "paired with GRPO (same seeds, same problems)", ax=right,
                    ylabel="difference in pass@k",
                    styles={f"{names[n]} \u2212 GRPO": {"color": colors[names[n]]} for n in names
                            if n.startswith("bupo")})
    fig.suptitle(f"{result['task']}: {result['held_out_problems']} held-out problems, n = {result['n']}, "
                 f"{seeds}{interim}; bands: 95 % bootstrap intervals over seeds and problems", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out / "paper_ratio_pass_at_k", ("png", "pdf"))


def paper_ratio_markdown(result: dict) -> str:
    """The Results page's tables of ``result`` (``paper_ratio_summary``'s): per method the mean of Avg@n and pass@k over
    seeds and problems with its 95 % bootstrap interval, then every paired difference with its interval and the
    seed-level sign-flip p, then each method's Avg@n and pass@n per seed. Numbers to 3 decimals, signed for
    differences."""
    if not result["seeds"]:
        return ""
    minus = "\u2212"  # the typographic minus of the Results page
    names = method_labels(result)
    metrics = [f"avg@{result['n']}", *(m for m in result["base"] if m.startswith("pass@") and m != "pass@1")]

    def cell(v: list[float], sign: str = "") -> str:
        return f"{v[0]:{sign}.3f} [{v[1]:{sign}.3f}, {v[2]:{sign}.3f}]".replace("-", minus)

    head = "| | " + " | ".join(m.replace("avg", "Avg") for m in metrics) + " |\n|" + " --- |" * (len(metrics) + 1)
    rows = ["| base model | " + " | ".join(cell(result["base"][m]) for m in metrics) + " |"]
    rows += [f"| {names[n]} | " + " | ".join(cell(result["methods"][n][m]["mean"]) for m in metrics) + " |"
             for n in names]
    diffs = [f"| {f' {minus} '.join(names[n] for n in label.split(' - '))} | "
             + " | ".join(cell(d[m]["bootstrap"], "+") + (f", p = {d[m]['seed_test']['sign_flip_p']:.3g}"
                                                          if d[m]["seed_test"] else "") for m in metrics) + " |"
             for label, d in result["differences"].items()]
    last = metrics[-1]
    per_seed = [f"| Avg@{result['n']} / {last} | " + " | ".join(f"seed {s}" for s in result["seed_list"]) + " |",
                "|" + " --- |" * (len(result["seed_list"]) + 1)]
    per_seed += [f"| {names[n]} | " + " | ".join(
        f"{a:.3f} / {b:.3f}" for a, b in zip(result["methods"][n][metrics[0]]["per_seed"],
                                             result["methods"][n][last]["per_seed"])) + " |" for n in names]
    return "\n".join([head, *rows, "", head.replace("| |", "| paired (same seed, same problems) |", 1), *diffs, "",
                      *per_seed])


def paper_ratio_dynamics(runs: Path, figures_out: Path) -> dict:
    """Seed 1 of each method (a checkpoint every 3 steps; trained again where its checkpoints are gone): the internal
    policy entropy of the base model and every checkpoint on 16 held-out prompts with the base model's responses, in
    both norm modes, with the refinement of the internal layer, kept in ``KEPT/dynamics`` (summary.csv and
    refinement.csv of each); then the figures of those tables and of every kept run's training metrics (ipolicy
    figures; the training curves of the complete seeds). Where all the tables are kept, only the figures are drawn
    again: no run, no model."""
    c = PAPER_RATIO
    root = runs / "paper-ratio"
    out, results = {}, []
    for name, bupo in paper_ratio_methods().items():
        kept = {mode: KEPT / "dynamics" / f"dyn-{name}-{mode}" for mode in ("none", "final")}
        if not all((tables / "summary.csv").is_file() for tables in kept.values()):
            check_protocol(resolve_device("auto"))
            run = train(root, f"{name}-seed1", c["steps"], seed=1, save_every=c["save_every"],
                        recipe=paper_ratio_recipe(), **bupo)
            for mode, tables in kept.items():
                analysis = root / f"dyn-{name}-{mode}"
                ip.compare([str(run)], data=f"{c['task']}:test", limit=16, max_new_tokens=c["max_new_tokens"],
                           norm_mode=mode, refine_layer=bupo.get("internal_layer", c["layers"][0]), out=analysis,
                           progress=True)
                keep(analysis, tables, ["refinement.csv", "summary.csv"])  # summary.csv last: its presence means done
        out.update({f"{name}-{mode}": str(tables.relative_to(KEPT)) for mode, tables in kept.items()})
        results.append(kept["none"])
    kept_runs = [KEPT / f"{name}-seed{s}" for name in paper_ratio_methods() for s in complete_seeds()]
    written = ip.figures_from_results(results + kept_runs, figures_out / "paper-ratio")
    return {"results": out, "figures": sorted(str(p.relative_to(figures_out.parent)) for p in written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["learn", "compare", "sweep", "dynamics", "seed-tests", "paper-ratio",
                                            "paper-ratio-summary", "paper-ratio-dynamics", "all"], default="all")
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
    if args.stage in ("seed-tests", "all"):
        results = add_seed_tests(results)
    if args.stage in ("paper-ratio", "all"):
        results["paper_ratio"] = paper_ratio(args.runs, args.seeds)
    if args.stage == "paper-ratio-summary":  # the kept evaluations only: no run, no model
        results["paper_ratio"] = paper_ratio_summary(args.seeds)
    if args.stage in ("paper-ratio", "paper-ratio-summary", "all"):
        paper_ratio_figures(results["paper_ratio"], args.out.parent)
    if args.stage in ("paper-ratio-dynamics", "all"):
        results["paper_ratio_dynamics"] = paper_ratio_dynamics(args.runs, args.out.parent)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if args.stage in ("paper-ratio", "paper-ratio-summary", "all"):  # the Results page's tables, from these numbers
        print(paper_ratio_markdown(results["paper_ratio"]))


if __name__ == "__main__":
    main()
