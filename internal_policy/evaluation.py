"""Avg@K and unbiased pass@k (SPEC §6) of one or more models on one or more datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .data import encode, load_samples, render_prompt
from .errors import IPolicyError
from .io import atomic_write, atomic_write_json
from .loading import load_model, run_checkpoints
from .rewards import load_reward, score
from .rollouts import SamplingConfig, sample_responses


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


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


def evaluate(models: list[str], datasets: list[str], config: EvalConfig, out: Path, progress: bool = True) -> pd.DataFrame:
    """Write per-problem details (problems.csv) and the summary (summary.csv, summary.json) to ``out``."""
    for k in config.k:
        if not 1 <= k <= config.n:
            raise IPolicyError(f"--k {k} must be between 1 and --n {config.n}. Fix: raise --n or lower --k.")
    reward_fn = load_reward(config.reward)
    data = {d: load_samples(d, limit=config.limit, seed=config.seed) for d in datasets}
    for name, samples in data.items():
        if config.reward == "math" and any(s.answer is None for s in samples):
            raise IPolicyError(f"Dataset '{name}' has rows without a ground truth. Fix: add answers or use --reward FILE.py:FN.")
    targets = [(label, model) for spec in models for label, _, model in run_checkpoints(spec)]
    problems = []
    for label, model in targets:
        loaded = load_model(model, dtype=config.dtype, device=config.device)
        for name, samples in data.items():
            prompts = [encode(loaded.tokenizer, render_prompt(loaded.tokenizer, s.prompt)) for s in samples]
            sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.batch_size, config.seed)
            responses = sample_responses(loaded, prompts, sampling, per_prompt=config.n, progress=progress)
            for i, sample in enumerate(samples):
                texts = [loaded.tokenizer.decode(r, skip_special_tokens=True) for r in responses[i * config.n : (i + 1) * config.n]]
                correct = [score(reward_fn, render_prompt(loaded.tokenizer, sample.prompt), t, sample.answer) >= 1.0 for t in texts]
                c = sum(correct)
                row = {"model": label, "dataset": name, "problem": sample.id, "n": config.n, "correct": c,
                       "accuracy": c / config.n, "answer": sample.answer}
                row.update({f"pass@{k}": pass_at_k(config.n, c, k) for k in config.k})
                problems.append(row)
    table = pd.DataFrame(problems)
    metrics = ["accuracy"] + [f"pass@{k}" for k in config.k]
    summary = table.groupby(["model", "dataset"], sort=False)[metrics].mean().reset_index()
    summary = summary.rename(columns={"accuracy": f"avg@{config.n}"})
    summary["problems"] = table.groupby(["model", "dataset"], sort=False).size().values
    atomic_write(out / "problems.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write_json(out / "summary.json", {"config": config.__dict__, "results": summary.to_dict("records"),
                                             "verifier_failures": getattr(reward_fn, "failures", 0)})
    return summary
