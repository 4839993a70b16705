"""Avg@n and unbiased pass@k (docs/definitions.md §6) of one or more models on one or more datasets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .config import EvalConfig, default_reward, parse_chat_template_kwargs
from .data import encode, load_samples, render_prompt
from .errors import IPolicyError
from .models import load_model, model_files
from .rl.generation import SamplingConfig, sample_responses, sample_responses_vllm
from .rl.rewards import load_reward, score
from .runs import EvalFolder, folder_lock, run_checkpoints
from .stats import pass_at_k


def _sample_and_score(tokenizer, generate, samples, n: int, reward_fn, chat: dict) -> list[dict]:
    """n responses per sample from ``generate(prompt_ids, n)``, each decoded and scored: one dict per response."""
    prompts = [render_prompt(tokenizer, s.prompt, chat) for s in samples]
    responses = generate([encode(tokenizer, p) for p in prompts], n)
    rows = []
    for i, sample in enumerate(samples):
        for j, ids in enumerate(responses[i * n : (i + 1) * n]):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            reward = score(reward_fn, prompts[i], text, sample.answer, f"on problem '{sample.id}', response {j}")
            rows.append({"problem": sample.id, "sample": j, "answer": sample.answer, "response": text,
                         "response_tokens": len(ids), "reward": reward, "correct": reward >= 1.0})
    return rows


def _model_labels(models: tuple[str, ...]) -> list[tuple[str, str]]:
    """(label, model) for every model and every checkpoint of every run folder; repeated labels made unique."""
    targets = [(label, model) for spec in models for label, _, model in run_checkpoints(spec)]
    labels = [label for label, _ in targets]
    return [(f"{label}#{t}" if labels.count(label) > 1 else label, model) for t, (label, model) in enumerate(targets)]


def evaluate(config: EvalConfig | None = None, *, out: str | Path, progress: bool = False, overwrite: bool = False,
             **options) -> pd.DataFrame:
    """Sample ``config.n`` responses per problem for every (model, dataset) and score them; returns the summary
    (Avg@n and mean pass@k per model and dataset). ``config`` fields may be given as keywords.

    Writes to ``out`` (docs/definitions.md, "ipolicy eval"): responses/ (one atomic file per pair, so a rerun into
    ``out`` skips the pairs already done), problems.csv, summary.csv and summary.json."""
    config = replace(config, **options) if config is not None else EvalConfig(**options)
    with folder_lock(out):  # one writer per folder
        return _evaluate(config, EvalFolder(Path(out), config.fingerprint(), overwrite), progress)


def _evaluate(config: EvalConfig, folder: EvalFolder, progress: bool) -> pd.DataFrame:
    data = {d: load_samples(d, limit=config.limit, seed=config.seed) for d in config.datasets}
    rewards = {d: default_reward(d) if config.reward == "auto" else config.reward for d in data}
    reward_fns = {spec: load_reward(spec) for spec in set(rewards.values())}
    for name, samples in data.items():
        if rewards[name] == "math" and any(s.answer is None for s in samples):
            raise IPolicyError(f"Dataset '{name}' has rows without a ground truth. Fix: add answers or use a custom "
                               "`reward` (FILE.py:FUNCTION).")
    targets = _model_labels(config.models)
    chat = parse_chat_template_kwargs(config.chat_template_kwargs)
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.batch_size, config.seed)
    for label, model in targets:
        todo = [name for name in data if not folder.responses_path(label, name).is_file()]
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
        for name in todo:
            rows = _sample_and_score(tokenizer, generate, data[name], config.n, reward_fns[rewards[name]], chat)
            folder.write_responses(folder.responses_path(label, name),
                                   [{"model": label, "dataset": name, **r} for r in rows])

    paths = [folder.responses_path(label, name) for label, _ in targets for name in data]
    responses = pd.DataFrame([json.loads(line) for path in paths for line in path.read_text().splitlines()])
    problems, summary = _score_tables(responses, config)
    folder.finish(problems, summary, {"config": config.__dict__, "results": summary.to_dict("records"),
                                      "rewards": rewards,
                                      "verifier_failures": sum(getattr(f, "failures", 0) for f in reward_fns.values())})
    return summary


def _score_tables(responses: pd.DataFrame, config: EvalConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per problem: n, correct, accuracy, pass@k; per model and dataset: Avg@n, mean pass@k, problems."""
    problems = (responses.groupby(["model", "dataset", "problem"], sort=False)
                .agg(n=("correct", "size"), correct=("correct", "sum"), answer=("answer", "first")).reset_index())
    problems["accuracy"] = problems["correct"] / problems["n"]
    for k in config.k:
        problems[f"pass@{k}"] = [pass_at_k(n, c, k) for n, c in zip(problems["n"], problems["correct"])]
    metrics = ["accuracy"] + [f"pass@{k}" for k in config.k]
    summary = problems.groupby(["model", "dataset"], sort=False)[metrics].mean().reset_index()
    summary = summary.rename(columns={"accuracy": f"avg@{config.n}"})
    summary["problems"] = problems.groupby(["model", "dataset"], sort=False).size().values
    return problems, summary
