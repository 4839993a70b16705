"""Avg@K and unbiased pass@k (docs/definitions.md §6) of one or more models on one or more datasets."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .data import encode, load_samples, render_prompt
from .errors import IPolicyError
from .io import atomic_write, atomic_write_text
from .models import load_model, model_files
from .runs import run_checkpoints
from .runs import ResultsFolder
from .stats import pass_at_k
from .rl.rewards import load_reward, score
from .rl.generation import SamplingConfig, check_rollouts, sample_responses, sample_responses_vllm, vllm_installed


@dataclass
class EvalConfig:
    n: int = 16  # responses per problem (Avg@n)
    k: tuple[int, ...] = (1,)
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    limit: int | None = None
    reward: str = "math"
    batch_size: int = 32
    dtype: str = "auto"
    device: str = "auto"
    rollouts: str = "transformers"  # or "vllm" (vllm installed: a GPU, or vLLM's CPU build)

    def fingerprint(self, models: list[str], datasets: list[str]) -> dict:
        """What changes the stored responses and their scores (not k: pass@k is recomputed from them)."""
        keep = ("n", "max_new_tokens", "temperature", "top_p", "seed", "limit", "reward", "dtype", "rollouts")
        return {"models": list(models), "datasets": list(datasets), **{k: getattr(self, k) for k in keep}}


EVAL_OUTPUTS = ("responses", "problems.csv", "summary.csv", "summary.json")


def _file_name(text: str) -> str:
    """A readable, unique file-name part for a model label or dataset spec: its last path part, and a short hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name).strip("_.")[:60]
    return f"{readable}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def _sample_and_score(tokenizer, generate, samples, n: int, reward_fn) -> list[dict]:
    """n responses per sample from ``generate(prompt_ids, n)``, each decoded and scored: one dict per response."""
    prompts = [render_prompt(tokenizer, s.prompt) for s in samples]
    responses = generate([encode(tokenizer, p) for p in prompts], n)
    rows = []
    for i, sample in enumerate(samples):
        for j, ids in enumerate(responses[i * n : (i + 1) * n]):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            reward = score(reward_fn, prompts[i], text, sample.answer)
            rows.append({"problem": sample.id, "sample": j, "answer": sample.answer, "response": text,
                         "response_tokens": len(ids), "reward": reward, "correct": reward >= 1.0})
    return rows


def evaluate(models: list[str], datasets: list[str], config: EvalConfig, out: Path, progress: bool = True,
             overwrite: bool = False) -> pd.DataFrame:
    """Sample ``config.n`` responses per problem for every (model, dataset) and score them. Writes to ``out``:
    responses/<model>--<dataset>.jsonl (every response, its reward and verdict; one atomic file per pair, so a rerun
    into ``out`` skips the pairs already done), problems.csv (per problem: correct count, accuracy, pass@k) and
    summary.csv / summary.json (Avg@n and mean pass@k per model and dataset)."""
    for k in config.k:
        if not 1 <= k <= config.n:
            raise IPolicyError(f"--k {k} must be between 1 and --n {config.n}. Fix: raise --n or lower --k.")
    check_rollouts(config.rollouts, vllm_installed())
    folder = ResultsFolder(out, config.fingerprint(models, datasets), overwrite, EVAL_OUTPUTS, manifest="summary.json")
    reward_fn = load_reward(config.reward)
    data = {d: load_samples(d, limit=config.limit, seed=config.seed) for d in datasets}
    for name, samples in data.items():
        if config.reward == "math" and any(s.answer is None for s in samples):
            raise IPolicyError(f"Dataset '{name}' has rows without a ground truth. Fix: add answers or use --reward FILE.py:FN.")
    targets = [(label, model) for spec in models for label, _, model in run_checkpoints(spec)]
    labels = [label for label, _ in targets]
    targets = [(f"{label}#{t}" if labels.count(label) > 1 else label, model) for t, (label, model) in enumerate(targets)]
    parts = {(t, d): out / "responses" / f"{_file_name(label)}--{_file_name(name)}.jsonl"
             for t, (label, _) in enumerate(targets) for d, name in enumerate(data)}
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.batch_size, config.seed)
    for t, (label, model) in enumerate(targets):
        todo = [(d, name) for d, name in enumerate(data) if not parts[t, d].is_file()]
        if not todo:
            continue  # done in an earlier run: not even loaded
        if config.rollouts == "vllm":  # vLLM loads the weights itself; only the tokenizer is needed here
            files = model_files(model)
            tokenizer = files.tokenizer
            generate = lambda ids, n: sample_responses_vllm(files.location, ids, sampling, n, config.dtype, progress)  # noqa: E731
        else:
            loaded = load_model(model, dtype=config.dtype, device=config.device)
            tokenizer = loaded.tokenizer
            generate = lambda ids, n: sample_responses(loaded, ids, sampling, n, progress)  # noqa: E731
        for d, name in todo:
            rows = _sample_and_score(tokenizer, generate, data[name], config.n, reward_fn)
            folder.start()
            atomic_write_text(parts[t, d], "".join(json.dumps({"model": label, "dataset": name, **r}, ensure_ascii=False)
                                                   + "\n" for r in rows))

    responses = pd.DataFrame([json.loads(line) for key in sorted(parts) for line in parts[key].read_text().splitlines()])
    problems = (responses.groupby(["model", "dataset", "problem"], sort=False)
                .agg(n=("correct", "size"), correct=("correct", "sum"), answer=("answer", "first")).reset_index())
    problems["accuracy"] = problems["correct"] / problems["n"]
    for k in config.k:
        problems[f"pass@{k}"] = [pass_at_k(n, c, k) for n, c in zip(problems["n"], problems["correct"])]
    metrics = ["accuracy"] + [f"pass@{k}" for k in config.k]
    summary = problems.groupby(["model", "dataset"], sort=False)[metrics].mean().reset_index()
    summary = summary.rename(columns={"accuracy": f"avg@{config.n}"})
    summary["problems"] = problems.groupby(["model", "dataset"], sort=False).size().values
    atomic_write(out / "problems.csv", lambda tmp: problems.to_csv(tmp, index=False))
    folder.finish(summary, {"config": config.__dict__, "results": summary.to_dict("records"),
                            "verifier_failures": getattr(reward_fn, "failures", 0)})
    return summary
