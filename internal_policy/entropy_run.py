"""The entropy run: data -> responses -> streamed entropies -> an ``EntropyResult`` (and, when asked, a results
folder with figures). ``analyse`` is what ``ipolicy entropy`` calls, and what a notebook calls.

Samples are analysed in length-sorted batches of about ``batch_tokens`` tokens; each finished batch is a shard,
kept in memory or, with ``out``, written to ``out/.partial/`` so that an interrupted run resumes.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import figures
from .config import EntropyConfig, parse_chat_template_kwargs
from .data import Sample, encode, load_samples, read_jsonl_samples, render_prompt, tokenize_sample, write_jsonl
from .errors import IPolicyError
from .io import atomic_write, atomic_write_json
from .lens.engine import EngineConfig, EntropyEngine
from .lens.refinement import feature_refinement
from .models import LoadedModel, load_model, model_files
from .rl.generation import SamplingConfig, complete_samples, sample_responses, sample_responses_vllm
from .runs import EntropyFolder, folder_lock, run_checkpoints
from .stats import boundary_layer, summarize

SHARD_ORDER = ["sample_index", "layer", "position"]


@dataclass
class EntropyResult:
    """What an entropy run measured (docs/definitions.md).

    ``tokens``: one row per analysed token x layer x module; ``summary``: one row per layer x module (across
    checkpoints: per step, too); ``boundary``: the boundary layer or None (of the last model); ``refinement``: cos
    and KL of ``refine_layer`` against the layers above, or None; ``out``: the results folder, or None when nothing
    was written. The ``plot_*`` methods return matplotlib figures.
    """

    summary: pd.DataFrame
    boundary: int | None
    manifest: dict
    samples: list[Sample]
    tokens: pd.DataFrame = field(repr=False)
    refinement: pd.DataFrame | None = None
    out: Path | None = None

    @property
    def norm_mode(self) -> str:
        return self.manifest["norm_mode"]

    def _last_step(self) -> pd.DataFrame:
        if "step" not in self.summary:
            return self.summary
        return self.summary[self.summary["step"] == self.summary["step"].max()]

    def plot_flow(self, title: str = ""):
        """The paper's Fig. 2: entropy of layer input, attention output, FFN output and layer output per layer."""
        return figures.entropy_flow(self._last_step(), title, self.norm_mode)

    def plot_change(self, title: str = ""):
        """The paper's Fig. 3: mean ΔH of attention and FFN per layer with the interquartile band."""
        return figures.entropy_change(self._last_step(), self.boundary, title, self.norm_mode)

    def plot_dynamics(self):
        """Layer policy entropy across checkpoints (needs a run over several checkpoints)."""
        if "step" not in self.summary:
            raise IPolicyError("plot_dynamics needs results across checkpoints. Fix: analyse a training run folder.")
        return figures.entropy_dynamics(self.summary)

    @classmethod
    def load(cls, out: str | Path) -> "EntropyResult":
        """The result of a finished run, read back from its folder."""
        out = Path(out)
        if not (out / "manifest.json").is_file():
            raise IPolicyError(f"'{out}' holds no finished entropy run (no manifest.json). Fix: run `analyse` into it.")
        manifest = json.loads((out / "manifest.json").read_text())
        refinement = pd.read_csv(out / "refinement.csv") if (out / "refinement.csv").is_file() else None
        boundary = manifest.get("boundary_layer", manifest.get("checkpoints", [{}])[-1].get("boundary_layer"))
        return cls(pd.read_csv(out / "summary.csv"), boundary, manifest, read_jsonl_samples(out / "samples.jsonl"),
                   pd.read_parquet(out / "tokens.parquet"), refinement, out)

    def plot_refinement(self):
        """The paper's Fig. 5: cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) against the higher layer j."""
        if self.refinement is None:
            raise IPolicyError("No refinement was measured. Fix: pass `refine_layer`.")
        return figures.feature_refinement(self.refinement)


class _InMemory:
    """Where finished batches go when nothing is written: the same calls as ``runs.EntropyFolder``, kept in memory."""

    def __init__(self):
        self.shards: list[pd.DataFrame] = []

    def done_sample_indices(self) -> set[int]:
        return set()

    def add_shard(self, table: pd.DataFrame, process: int | None = None) -> None:
        self.shards.append(table)

    def combine_tokens(self) -> pd.DataFrame:
        return pd.concat(self.shards, ignore_index=True).sort_values(SHARD_ORDER, kind="stable", ignore_index=True)


def analyse(config: EntropyConfig | None = None, *, out: str | Path | None = None, overwrite: bool = False,
            progress: bool = False, samples: list[Sample] | None = None, loaded: LoadedModel | None = None,
            **options) -> EntropyResult:
    """Layer-wise and module-wise internal policy entropy of ``config.model`` on ``config.data``.

    ``config`` fields may also be given as keywords (``analyse(model="Qwen/Qwen3-4B", data="math500", limit=8)``).
    ``samples`` replaces ``config.data`` (rows without a response get generated ones); ``loaded`` reuses a model
    already in memory. A training run folder as ``config.model`` analyses its base model and every checkpoint
    (``compare``). With ``out`` the results folder is written (resumable; figures included); without, nothing is.
    """
    config = replace(config, **options) if config is not None else EntropyConfig(**options)
    if loaded is None and len(run_checkpoints(config.model)) > 1:
        return compare([config.model], config, out=out, overwrite=overwrite, progress=progress, samples=samples)
    if out is None:
        return _analyse(config, _InMemory(), progress, samples, loaded)
    share = _Share.of_launch(config.device)
    if share.processes > 1:  # under `accelerate launch`: the main process holds the lock and merges
        return _analyse_shared(config, Path(out), overwrite, progress, samples, share)
    with folder_lock(out):  # one writer per folder
        return _analyse(config, EntropyFolder(Path(out), config.fingerprint(), overwrite), progress, samples, loaded)


@dataclass
class _Share:
    """This process's share of a data-parallel run (``accelerate launch``): samples i with i % processes == index."""

    index: int = 0
    processes: int = 1
    state: object = None

    @classmethod
    def of_launch(cls, device: str) -> "_Share":
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu" or not __import__("torch").cuda.is_available())
        return cls(state.process_index, state.num_processes, state)

    def mine(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.processes == self.index]

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def _analyse_shared(config: EntropyConfig, out: Path, overwrite: bool, progress: bool, samples, share: _Share):
    """Data-parallel: the main process prepares the folder and the responses (samples.jsonl), every process analyses
    its share of the samples into the shared shard folder, and the main process merges them and writes the results;
    every process returns the merged result. Resume works per process: finished shards are skipped by all."""
    device = f"cuda:{share.state.local_process_index}" if "cuda" in str(share.state.device) else "cpu"
    config = replace(config, device=device)
    if share.index == 0:
        with folder_lock(out):
            sink = EntropyFolder(out, config.fingerprint(), overwrite)
            _, loaded = _responses_and_model(config, sink, samples, None, progress, {})  # responses once, saved
            share.wait()  # samples.jsonl is written
            _analyse(config, sink, progress, None, loaded, share)  # waits for every share, then merges
            share.wait()  # the results are written
    else:
        share.wait()
        _analyse(config, EntropyFolder(out, config.fingerprint()), progress, None, None, share)
        share.wait()
    return EntropyResult.load(out)


def _analyse(config: EntropyConfig, sink, progress: bool, samples: list[Sample] | None,
             loaded: LoadedModel | None, share: _Share | None = None) -> EntropyResult | None:
    """The run itself. With a ``share`` of a data-parallel run, this process analyses its samples only, and only the
    main process (after everyone's shards are written) merges and writes the results; the others return None."""
    share = share or _Share()
    out = sink.out if isinstance(sink, EntropyFolder) else None
    started = time.perf_counter()
    timings: dict[str, float] = {}
    samples, loaded = _responses_and_model(config, sink, samples, loaded, progress, timings)
    chat = parse_chat_template_kwargs(config.chat_template_kwargs)
    tokenized = [tokenize_sample(loaded.tokenizer, s, loaded.context_length, chat) for s in samples]
    engine = EntropyEngine(loaded, EngineConfig(norm_mode=config.norm_mode, fast=config.fast,
                                                batch_tokens=config.batch_tokens))
    t = time.perf_counter()
    timings["analysed_tokens"] = _analyse_batches(engine, tokenized, sink, config.norm_mode, progress, share)
    if share.processes > 1:
        share.wait()  # every process's shards are written
    timings["analyse_s"] = time.perf_counter() - t
    if share.index != 0:
        return None
    refinement = feature_refinement(engine, tokenized, config.refine_layer) if config.refine_layer else None
    tokens = sink.combine_tokens()
    summary = summarize(tokens)
    summary.insert(6, "norm_mode", config.norm_mode)
    boundary = boundary_layer(summary, config.boundary_tolerance)
    timings["total_s"] = time.perf_counter() - started
    manifest = {**_manifest(config, loaded, engine, samples, summary, boundary, timings), "processes": share.processes}
    result = EntropyResult(summary, boundary, manifest, samples, tokens, refinement, out)
    if out is not None:
        sink.finish(summary, manifest, refinement)
        label = Path(config.model).name if config.model.endswith(".gguf") else config.model
        figures.save_figure(result.plot_flow(f"{label}: internal policy entropy"), sink.out / "entropy_flow")
        figures.save_figure(result.plot_change(f"{label}: module entropy change"), sink.out / "entropy_change")
    return result


def _responses_and_model(config: EntropyConfig, sink, samples: list[Sample] | None, loaded: LoadedModel | None,
                         progress: bool, timings: dict) -> tuple[list[Sample], LoadedModel]:
    """The samples with a response each (given, resumed from the folder, or generated) and the loaded model.
    vLLM generates before the model loads (it needs the memory); transformers generates with the loaded model."""
    saved = getattr(sink, "samples_path", None)
    resumed = saved is not None and saved.is_file()
    if resumed:
        samples = read_jsonl_samples(saved)  # the responses of the interrupted run
    elif samples is None:
        samples = load_samples(config.data, limit=config.limit, seed=config.seed)
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.generation_batch_size,
                              config.seed)
    options = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    chat = parse_chat_template_kwargs(config.chat_template_kwargs)
    timings["generate_s"] = 0.0

    def generate_responses(tokenizer, context: int | None, generate) -> list[Sample]:
        t = time.perf_counter()
        _check_lengths(tokenizer, context, samples, config.max_new_tokens, chat)
        done = complete_samples(tokenizer, samples, config.samples, generate, chat)
        if isinstance(sink, EntropyFolder):
            sink.start()
            write_jsonl(sink.samples_path, done)
        timings["generate_s"] += time.perf_counter() - t
        return done

    if not resumed and config.rollouts == "vllm" and any(s.response is None for s in samples):
        files = model_files(config.model, **options)
        samples = generate_responses(files.tokenizer, files.context_length, lambda ids, n: sample_responses_vllm(
            files.location, ids, sampling, n, config.dtype, progress, **options))
    t = time.perf_counter()
    loaded = loaded or load_model(config.model, dtype=config.dtype, device=config.device, device_map=config.device_map,
                                  **options)
    timings["load_s"] = time.perf_counter() - t
    if config.refine_layer is not None and not 1 <= config.refine_layer < loaded.n_layers:
        raise IPolicyError(f"`refine_layer` must be in 1..{loaded.n_layers - 1}, got {config.refine_layer}. "
                           "Fix: pick a layer below the last.")
    if not resumed:  # generates what is missing, and saves the samples (samples.jsonl) before any result
        samples = generate_responses(loaded.tokenizer, loaded.context_length,
                                     lambda ids, n: sample_responses(loaded, ids, sampling, n, progress))
    return samples, loaded


def _check_lengths(tokenizer, context: int | None, samples: list[Sample], max_new_tokens: int, chat: dict) -> None:
    """Refuse, before anything is generated or written, a sample that cannot fit the model's context (tokens)."""
    for sample in samples:
        if sample.response is not None:
            tokenize_sample(tokenizer, sample, context, chat)
        elif context is not None:
            n_prompt = len(encode(tokenizer, render_prompt(tokenizer, sample.prompt, chat)))
            if n_prompt + max_new_tokens > context:
                raise IPolicyError(
                    f"Sample '{sample.id}' has a {n_prompt}-token prompt; with `max_new_tokens` {max_new_tokens} it "
                    f"exceeds the model's context of {context}. Fix: lower `max_new_tokens`."
                )


def _analyse_batches(engine, tokenized, sink, norm_mode: str, progress: bool, share: _Share) -> int:
    """Analyse every sample (of this process's share) not yet in ``sink``, one length-sorted batch at a time, each
    batch one shard. Returns the response tokens of the samples that this run analyses, over all processes (those
    resumed from earlier shards excluded)."""
    done = sink.done_sample_indices()
    missing = [i for i in range(len(tokenized)) if i not in done]
    todo = share.mine(missing)
    with tqdm(total=len(tokenized), initial=len(done), desc="analysing", unit="sample", disable=not progress) as bar:
        for batch in engine.batches([tokenized[i] for i in todo]):
            indices = [todo[i] for i in batch]
            table = engine.analyse([tokenized[i] for i in indices], sample_index=indices)
            table["norm_mode"] = norm_mode
            sink.add_shard(table, share.index if share.processes > 1 else None)
            bar.update(len(indices))
    return sum(len(tokenized[i].response_ids) for i in missing)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("ipolicy", "torch", "transformers", "transformer-lens", "numpy", "pandas"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _manifest(config: EntropyConfig, loaded: LoadedModel, engine, samples, summary, boundary, timings) -> dict:
    n_tokens = int(summary["n_tokens"].iloc[0])
    return {
        "model": config.model,
        "model_source": loaded.source,
        "revision": loaded.revision,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "n_layers": loaded.n_layers,
        "norm_mode": config.norm_mode,
        "fast": config.fast,
        "logit_transform": engine.head.transform_description,
        "block_layout": loaded.block_layout,
        "data": config.data,
        "n_samples": len(samples),
        "n_tokens": n_tokens,
        "seed": config.seed,
        "boundary_layer": boundary,
        "boundary_tolerance_nats": config.boundary_tolerance,
        "config": asdict(config),
        "versions": _versions(),
        "timings": {**timings, "tokens_per_second": (timings["analysed_tokens"] / max(timings["analyse_s"], 1e-9)
                                                     if timings["analysed_tokens"] else None)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def compare(models: list[str], config: EntropyConfig | None = None, *, out: str | Path | None = None,
            overwrite: bool = False, progress: bool = False, samples: list[Sample] | None = None,
            **options) -> EntropyResult:
    """Analyse the same samples with several models, a training run folder expanding to its base model (step 0)
    and every checkpoint. Responses are given by the data or generated once by the first model and reused, so
    differences come from the weights. The tables add ``step`` (0 for a base model) and ``checkpoint``.

    With ``out``, each model gets a resumable subfolder ``out/checkpoints/<label>`` and the combined tables, the
    entropy-dynamics figure and the manifest are written to ``out``.
    """
    config = replace(config, **options) if config is not None else EntropyConfig(**options)
    if out is None:
        return _compare(models, config, None, overwrite, progress, samples)
    with folder_lock(out):
        return _compare(models, config, Path(out), overwrite, progress, samples)


def _compare(models: list[str], config: EntropyConfig, out: Path | None, overwrite: bool, progress: bool,
             samples: list[Sample] | None) -> EntropyResult:
    targets = [target for spec in models for target in run_checkpoints(spec)]
    tables: dict[str, list[pd.DataFrame]] = {"summary": [], "tokens": [], "refinement": []}
    results = []
    for i, (label, step, model) in enumerate(targets):
        sub_out = EntropyFolder.model_subfolder(out, i, label) if out is not None else None
        sub_config = replace(config, model=model)
        if i > 0 and out is not None:  # the first model's responses, analysed as given (and fingerprinted as such)
            sub_config = replace(sub_config, data=str(out / "samples.jsonl"), limit=None, samples=1)
        given = results[0].samples if i > 0 and out is None else samples
        result = analyse(sub_config, out=sub_out, overwrite=overwrite, progress=progress, samples=given)
        if i == 0 and out is not None:
            atomic_write(out / "samples.jsonl", lambda tmp: shutil.copyfile(result.out / "samples.jsonl", tmp))
        for name, table in (("summary", result.summary), ("tokens", result.tokens), ("refinement", result.refinement)):
            if table is not None:
                table = table.copy()
                table.insert(min(6, len(table.columns)), "step", step)
                table.insert(min(7, len(table.columns)), "checkpoint", label)
                tables[name].append(table)
        results.append(result)
    summary, tokens = (pd.concat(tables[k], ignore_index=True) for k in ("summary", "tokens"))
    refinement = pd.concat(tables["refinement"], ignore_index=True) if tables["refinement"] else None
    manifest = {"models": [dict(label=l, step=s, model=m) for l, s, m in targets], "norm_mode": config.norm_mode,
                "data": config.data, "checkpoints": [r.manifest for r in results]}
    result = EntropyResult(summary, results[-1].boundary, manifest, results[0].samples, tokens, refinement, out)
    if out is not None:
        atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
        atomic_write(out / "tokens.parquet", lambda tmp: tokens.to_parquet(tmp, index=False))
        if refinement is not None:
            atomic_write(out / "refinement.csv", lambda tmp: refinement.to_csv(tmp, index=False))
        figures.save_figure(result.plot_dynamics(), out / "entropy_dynamics")
        atomic_write_json(out / "manifest.json", manifest)
    return result
