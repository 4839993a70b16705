"""Avg@n and unbiased pass@k (docs/definitions.md §6) of one or more models on one or more datasets."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from .config import EvalConfig, default_reward, parse_chat_template_kwargs
from .data import encode, load_samples, render_prompt, samples_digest
from .errors import IPolicyError
from .io import json_lines
from .models import load_model, model_files, model_identity
from .rl.generation import SamplingConfig, sample_responses, sample_responses_vllm
from .rl.rewards import load_reward, score
from .runs import Checkpoint, EvalFolder, checkpoint_series, folder_lock
from .stats import pass_at_k


@dataclass
class EvalResult:
    """What an evaluation measured (docs/definitions.md §6 and "ipolicy eval").

    ``summary``: one row per (model, dataset): ``avg@N``, the mean ``pass@k`` for each k, ``problems``;
    ``problems``: one row per (model, dataset, problem): ``n``, ``correct``, ``answer``, ``accuracy``, ``pass@k``;
    ``responses``: one row per response with its reward and verdict; ``out``: the folder, or None when nothing was
    written.
    """

    summary: pd.DataFrame
    problems: pd.DataFrame
    config: dict
    responses: pd.DataFrame = field(repr=False)
    out: Path | None = None

    def __repr__(self) -> str:
        models, datasets = self.summary["model"].nunique(), self.summary["dataset"].nunique()
        n = self.config.get("n")
        return (f"EvalResult({models} model(s) x {datasets} dataset(s), n={n}, "
                f"{len(self.problems)} problem rows, out={str(self.out) if self.out else None!r})")

    def plot_pass_at_k(self):
        """Mean pass@k against k per model, one panel per dataset (the paper's Fig. 6 view)."""
        from . import figures

        return figures.pass_at_k_curves(self.problems)

    @classmethod
    def load(cls, out: str | Path) -> "EvalResult":
        """The result of a finished evaluation, read back from its folder."""
        out = Path(out)
        if not (out / "summary.json").is_file():
            raise IPolicyError(f"'{out}' holds no finished evaluation (no summary.json). Fix: evaluate into it (`ipolicy eval --out`, or `out` of evaluate), or check the path.")
        manifest = json.loads((out / "summary.json").read_text())
        responses = pd.DataFrame([row for path in sorted((out / "responses").glob("*.jsonl"))
                                  for row in json_lines(path.read_text())])
        return cls(pd.read_csv(out / "summary.csv"), pd.read_csv(out / "problems.csv"), manifest.get("config", {}),
                   responses, out)


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


def _model_labels(config: EvalConfig) -> list[tuple[str, Checkpoint]]:
    """(label, checkpoint) for every model and every checkpoint of every series (runs.checkpoint_series); repeated
    labels made unique."""
    targets = [c for spec in config.model for c in checkpoint_series(spec, config.base_model, config.revisions).checkpoints]
    labels = [c.label for c in targets]
    return [(f"{c.label}#{t}" if labels.count(c.label) > 1 else c.label, c) for t, c in enumerate(targets)]


def evaluate(config: EvalConfig | None = None, *, out: str | Path | None = None, progress: bool = False,
             overwrite: bool = False, **options) -> EvalResult:
    """Sample ``config.n`` responses per problem for every (model, dataset) and score them: Avg@n and unbiased pass@k.
    ``config`` fields may be given as keywords (``evaluate(model=["runs/grpo"], data=["amc23"], n=16)``).

    With ``out`` the folder is written (docs/definitions.md, "ipolicy eval"): responses/ (one atomic file per
    (model, dataset), named by the model's identity and the problems' content, so that a rerun samples only what is
    missing, and another model, dataset or new checkpoint extends the folder), problems.csv, summary.csv and
    summary.json. Other sampling settings into the same ``out`` are refused unless ``overwrite``."""
    config = replace(config, **options) if config is not None else EvalConfig(**options)
    if out is None:
        return _evaluate(config, None, progress)
    from .models import resolve_device, resolve_dtype

    fingerprint = {**config.fingerprint(),  # the dtype the weights really have: "auto" differs between CPU and GPU
                   "dtype": str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")}
    with folder_lock(out):  # one writer per folder
        return _evaluate(config, EvalFolder(Path(out), fingerprint, overwrite), progress)


def _evaluate(config: EvalConfig, folder: EvalFolder | None, progress: bool) -> EvalResult:
    data = {d: load_samples(d, limit=config.limit, seed=config.seed) for d in config.data}
    rewards = {d: default_reward(d) if config.reward == "auto" else config.reward for d in data}
    reward_fns = {spec: load_reward(spec) for spec in set(rewards.values())}
    for name, samples in data.items():
        if rewards[name] == "math" and any(s.answer is None for s in samples):
            raise IPolicyError(f"Dataset '{name}' has rows without a ground truth. Fix: add answers or use a custom "
                               "`reward` (FILE.py:FUNCTION).")
    targets = _model_labels(config)
    chat = parse_chat_template_kwargs(config.chat_template_kwargs)
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.batch_size, config.seed)
    digests = {name: samples_digest(samples) for name, samples in data.items()}
    stored: dict[tuple[str, str], list[dict]] = {}
    for label, checkpoint in targets:
        model, revision, base = checkpoint.model, checkpoint.revision, checkpoint.base_model or config.base_model
        identity = json.dumps(model_identity(model, revision, base), sort_keys=True)
        paths = {name: folder.responses_path(label, identity, name, digests[name]) if folder else None for name in data}
        reuse = folder is not None and folder.holds_previous_results  # not what `overwrite` is about to replace
        todo = [name for name in data if not (reuse and paths[name].is_file())]
        for name in data:
            if name not in todo:  # done by an earlier run into this folder: not even loaded
                stored[label, name] = json_lines(paths[name].read_text())
        if not todo:
            continue
        if config.rollouts == "vllm":  # vLLM loads the weights itself; only the tokenizer is needed here
            files = model_files(model, revision=revision)
            tokenizer = files.tokenizer
            generate = lambda ids, n: sample_responses_vllm(files.location, ids, sampling, n, config.dtype, progress,  # noqa: E731
                                                            revision=revision)
        else:
            loaded = load_model(model, dtype=config.dtype, device=config.device, revision=revision, base_model=base)
            tokenizer = loaded.tokenizer
            generate = lambda ids, n: sample_responses(loaded, ids, sampling, n, progress)  # noqa: E731
        for name in todo:
            rows = [{"model": label, "dataset": name, **r}
                    for r in _sample_and_score(tokenizer, generate, data[name], config.n, reward_fns[rewards[name]], chat)]
            if folder is not None:
                folder.write_responses(paths[name], rows)
            stored[label, name] = rows
        loaded = generate = None  # the next model loads with this one's memory free
        gc.collect()

    responses = pd.DataFrame([row for label, _ in targets for name in data for row in stored[label, name]])
    problems, summary = _score_tables(responses, config)
    manifest = {"config": config.__dict__, "results": summary.to_dict("records"), "rewards": rewards,
                "verifier_failures": sum(getattr(f, "failures", 0) for f in reward_fns.values())}
    if folder is not None:
        folder.finish(problems, summary, manifest)
    return EvalResult(summary, problems, json.loads(json.dumps(manifest["config"], default=str)), responses,
                      folder.out if folder else None)


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
