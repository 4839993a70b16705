"""``ipolicy entropy`` as a library call: data -> responses -> streamed entropies -> results folder and figures."""

from __future__ import annotations

import platform
import time
import shutil
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import plots
from .data import BUILTIN_ARITHMETIC, encode, load_samples, read_jsonl_samples, render_prompt, tokenize_sample, write_jsonl
from .entropy import EngineConfig, EntropyEngine
from .errors import IPolicyError
from .loading import DEFAULT_MODEL, LoadedModel, load_model, run_checkpoints
from .policy import NORM_MODES
from .io import atomic_write, atomic_write_json
from .refinement import feature_refinement
from .results import BOUNDARY_TOLERANCE, ResultsFolder, boundary_layer, summarize
from .rollouts import SamplingConfig, complete_samples


@dataclass
class EntropyRunConfig:
    """Everything ``ipolicy entropy`` takes. Generation options apply to rows without a response."""

    model: str = DEFAULT_MODEL
    data: str = BUILTIN_ARITHMETIC
    limit: int | None = None
    samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    norm_mode: str = "none"
    fast: bool = False
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    batch_tokens: int = 4096
    generation_batch_size: int = 16
    boundary_tolerance: float = BOUNDARY_TOLERANCE
    refine_layer: int | None = None  # also write refinement.csv: cos and KL of layer k against every higher layer

    def fingerprint(self) -> dict:
        """What changes the numbers: a rerun into the same folder resumes only when these agree."""
        keep = ("model", "data", "limit", "samples", "max_new_tokens", "temperature", "top_p", "seed", "norm_mode",
                "fast", "dtype", "revision")
        return {k: v for k, v in asdict(self).items() if k in keep}

    def validate(self) -> None:
        if self.norm_mode not in NORM_MODES:
            raise IPolicyError(f"Unknown --norm-mode '{self.norm_mode}'. Fix: use 'none' (the paper's) or 'final' (logit lens).")
        for name in ("samples", "max_new_tokens", "batch_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise IPolicyError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.limit is not None and self.limit < 1:
            raise IPolicyError(f"--limit must be at least 1, got {self.limit}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise IPolicyError("--temperature must be >= 0 and --top-p in (0, 1].")


@dataclass
class EntropyResult:
    out: Path
    summary: pd.DataFrame
    boundary: int | None
    manifest: dict


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("ipolicy", "torch", "transformers", "transformer-lens", "numpy", "pandas"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _check_lengths(loaded: LoadedModel, samples, max_new_tokens: int) -> None:
    """Refuse, before anything is generated or written, a sample that cannot fit the model's context."""
    context = loaded.context_length
    for sample in samples:
        if sample.response is not None:
            tokenize_sample(loaded.tokenizer, sample, context)
        elif context is not None:
            n_prompt = len(encode(loaded.tokenizer, render_prompt(loaded.tokenizer, sample.prompt)))
            if n_prompt + max_new_tokens > context:
                raise IPolicyError(
                    f"Sample '{sample.id}' has a {n_prompt}-token prompt; with --max-new-tokens {max_new_tokens} it "
                    f"exceeds the model's context of {context}. Fix: lower --max-new-tokens."
                )


def run_entropy(config: EntropyRunConfig, out: Path, overwrite: bool = False, progress: bool = True,
                loaded: LoadedModel | None = None) -> EntropyResult:
    """Analyse ``config.data`` with ``config.model`` and write the results folder ``out`` (resumable)."""
    config.validate()
    started = time.perf_counter()
    folder = ResultsFolder(Path(out), config.fingerprint(), overwrite=overwrite)
    samples = None if folder.samples_path.is_file() else load_samples(config.data, limit=config.limit, seed=config.seed)
    timings = {}
    t = time.perf_counter()
    loaded = loaded or load_model(config.model, dtype=config.dtype, device=config.device, device_map=config.device_map,
                                  revision=config.revision, trust_remote_code=config.trust_remote_code)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if samples is None:
        samples = read_jsonl_samples(folder.samples_path)  # resume: the responses of the interrupted run
    else:
        _check_lengths(loaded, samples, config.max_new_tokens)
        sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p,
                                  config.generation_batch_size, config.seed)
        samples = complete_samples(loaded, samples, config.samples, sampling, progress=progress)
        folder.start()
        write_jsonl(folder.samples_path, samples)
    timings["generate_s"] = time.perf_counter() - t

    tokenized = [tokenize_sample(loaded.tokenizer, s, loaded.context_length) for s in samples]
    engine = EntropyEngine(loaded, EngineConfig(norm_mode=config.norm_mode, fast=config.fast,
                                                batch_tokens=config.batch_tokens))
    done = folder.done_sample_indices()
    todo = [i for i in range(len(tokenized)) if i not in done]
    t = time.perf_counter()
    with tqdm(total=len(tokenized), initial=len(done), desc="analysing", unit="sample", disable=not progress) as bar:
        for batch in engine.batches([tokenized[i] for i in todo]):
            indices = [todo[i] for i in batch]
            table = engine.analyse([tokenized[i] for i in indices], sample_index=indices)
            table["norm_mode"] = config.norm_mode
            folder.add_shard(table)
            bar.update(len(indices))
    timings["analyse_s"] = time.perf_counter() - t

    if config.refine_layer is not None:
        refinement = feature_refinement(engine, tokenized, config.refine_layer)
        atomic_write(folder.out / "refinement.csv", lambda tmp: refinement.to_csv(tmp, index=False))
    tokens = folder.combine_tokens()
    summary = summarize(tokens)
    summary.insert(6, "norm_mode", config.norm_mode)
    boundary = boundary_layer(summary, config.boundary_tolerance)
    label = Path(config.model).name if config.model.endswith(".gguf") else config.model
    plots.save_figure(plots.entropy_flow(summary, f"{label}: internal policy entropy", config.norm_mode),
                      folder.out / "entropy_flow")
    plots.save_figure(plots.entropy_change(summary, boundary, f"{label}: module entropy change", config.norm_mode),
                      folder.out / "entropy_change")
    timings["total_s"] = time.perf_counter() - started
    n_tokens = int(summary["n_tokens"].iloc[0])
    manifest = {
        "model": config.model,
        "model_source": loaded.source,
        "revision": loaded.revision,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "n_layers": loaded.n_layers,
        "norm_mode": config.norm_mode,
        "fast": config.fast,
        "data": config.data,
        "n_samples": len(samples),
        "n_tokens": n_tokens,
        "seed": config.seed,
        "boundary_layer": boundary,
        "boundary_tolerance_nats": config.boundary_tolerance,
        "config": asdict(config),
        "versions": _versions(),
        "timings": {**timings, "tokens_per_second": n_tokens / max(timings["analyse_s"], 1e-9)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    folder.finish(summary, manifest)
    return EntropyResult(folder.out, summary, boundary, manifest)


def run_entropy_checkpoints(models: list[str], config: EntropyRunConfig, out: Path, overwrite: bool = False,
                            progress: bool = True) -> EntropyResult:
    """Analyse the same samples with several models or every checkpoint of training runs.

    Each model gets a resumable subfolder ``out/checkpoints/<label>``. Responses are given by the data or generated
    once by the first model and reused (``out/samples.jsonl``), so differences come from the weights. The combined
    ``summary.csv`` / ``tokens.parquet`` (and ``refinement.csv``) add ``step`` (0 for a base model) and ``checkpoint``.
    """
    config.validate()
    out = Path(out)
    targets = [target for spec in models for target in run_checkpoints(spec)]
    labels = [f"{i:02d}-{label}" for i, (label, _, _) in enumerate(targets)]
    summaries, tokens, refinements, results = [], [], [], []
    for i, ((label, step, model), folder) in enumerate(zip(targets, labels)):
        sub_config = replace(config, model=model)
        if i > 0:  # the first model's responses, analysed as given
            sub_config = replace(sub_config, data=str(out / "samples.jsonl"), limit=None, samples=1)
        result = run_entropy(sub_config, out / "checkpoints" / folder, overwrite=overwrite, progress=progress)
        if i == 0:
            atomic_write(out / "samples.jsonl", lambda tmp: shutil.copyfile(result.out / "samples.jsonl", tmp))
        for frame, name in ((summaries, "summary.csv"), (refinements, "refinement.csv")):
            if (result.out / name).is_file():
                table = pd.read_csv(result.out / name)
                table.insert(min(6, len(table.columns)), "step", step)
                table.insert(min(7, len(table.columns)), "checkpoint", label)
                frame.append(table)
        table = pd.read_parquet(result.out / "tokens.parquet")
        table["step"], table["checkpoint"] = step, label
        tokens.append(table)
        results.append(result)
    summary = pd.concat(summaries, ignore_index=True)
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write(out / "tokens.parquet", lambda tmp: pd.concat(tokens, ignore_index=True).to_parquet(tmp, index=False))
    if refinements:
        refinement = pd.concat(refinements, ignore_index=True)
        atomic_write(out / "refinement.csv", lambda tmp: refinement.to_csv(tmp, index=False))
    plots.save_figure(plots.entropy_dynamics(summary), out / "entropy_dynamics")
    manifest = {"models": [dict(label=l, step=s, model=m) for l, s, m in targets], "norm_mode": config.norm_mode,
                "data": config.data, "checkpoints": [r.manifest for r in results]}
    atomic_write_json(out / "manifest.json", manifest)
    return EntropyResult(out, summary, results[-1].boundary, manifest)
