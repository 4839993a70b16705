"""The entropy run: data -> responses -> streamed entropies -> an ``EntropyResult`` (and, when asked, a results
folder with figures). ``analyse`` is what ``ipolicy entropy`` calls, and what a notebook calls.

Samples are analysed in length-sorted batches of about ``batch_tokens`` tokens; each finished batch is a shard,
kept in memory or, with ``out``, written to ``out/.partial/`` so that an interrupted run resumes.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from . import figures
from .config import DEFAULT_MODEL, EntropyConfig, parse_chat_template_kwargs
from .data import (Sample, check_prompt_fits, data_location, encode, load_samples, read_jsonl_samples, render_prompt, samples_digest,
                   tokenize_sample, write_jsonl)
from .errors import IPolicyError
from .lens.engine import EngineConfig, EntropyEngine
from .lens.refinement import feature_refinement
from .models import (LoadedModel, load_model, model_files, model_identity, model_location, resolve_device, resolve_dtype,
                     weights_digest)
from .rl.generation import (SamplingConfig, complete_samples, sample_responses, sample_responses_vllm,
                            stop_token_ids)
from .runs import ComparisonFolder, EntropyFolder, checkpoint_series, folder_lock
from .stats import boundary_layer, summarize

SHARD_ORDER = ["sample_index", "layer", "position"]
GIVEN_SAMPLES = "(samples given in Python)"  # the data of a run whose samples were passed as `samples`


@dataclass
class EntropyResult:
    """What an entropy run measured (docs/definitions.md).

    ``tokens``: one row per analysed token x layer x module; ``summary``: one row per layer x module (across
    checkpoints: per step, too); ``boundary``: the boundary layer or None (of the last model); ``refinement``: cos
    and KL of ``refine_layer`` against the layers above, or None; ``out``: the results folder, or None when nothing
    was written; ``predictions`` (with ``top_k``): one row per analysed token x distinct state, what that policy
    predicts (``top_tokens`` shows one); ``vocabulary``: the text of every token id those name. The ``plot_*`` methods
    return matplotlib figures; ``view`` the interactive per-token view.
    """

    summary: pd.DataFrame
    boundary: int | None
    manifest: dict
    samples: list[Sample]
    tokens: pd.DataFrame = field(repr=False)
    refinement: pd.DataFrame | None = None
    out: Path | None = None
    prediction_table: pa.Table | None = field(default=None, repr=False)
    vocabulary: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def norm_mode(self) -> str:
        return self.manifest["norm_mode"]

    @property
    def predictions(self) -> pd.DataFrame | None:
        """What every policy predicts at every analysed token (docs/definitions.md, predictions.parquet): columns
        sample_index, position, layer, state, top_ids, top_probs, token_prob, token_rank (and step, checkpoint across
        checkpoints); None when the run had no ``top_k``."""
        if self.prediction_table is None:
            return None
        if "_predictions_frame" not in self.__dict__:
            self.__dict__["_predictions_frame"] = self.prediction_table.to_pandas()
        return self.__dict__["_predictions_frame"]

    def top_tokens(self, sample_index: int, position: int, layer: int, state: str = "resid",
                   checkpoint: str | None = None) -> pd.DataFrame:
        """The top-k tokens of one policy at one token, most probable first: rank, token_id, text, prob.
        ``state``: resid (h_layer; layer L: the real policy), attn_in, attn_out, ffn_in or ffn_out; ``checkpoint``:
        across checkpoints, the model's label (a value of the ``checkpoint`` column; default: the last)."""
        import pyarrow.compute as pc

        from .lens.engine import STATES

        if self.prediction_table is None:
            raise IPolicyError("This result has no predictions. Fix: analyse with `top_k` >= 1.")
        if state not in STATES.values():
            raise IPolicyError(f"`state` must be one of {', '.join(STATES.values())}, got '{state}'. Fix: pass one of these.")
        table = self.prediction_table
        mask = pc.and_(pc.and_(pc.equal(table["sample_index"], sample_index), pc.equal(table["position"], position)),
                       pc.and_(pc.equal(table["layer"], layer), pc.equal(table["state"], state)))
        if "checkpoint" in table.column_names:
            checkpoint = checkpoint or self.last_checkpoint
            if checkpoint not in set(table["checkpoint"].to_pylist()):
                raise IPolicyError(f"`checkpoint` '{checkpoint}' is not in this result. Fix: use one of "
                                   f"{', '.join(m['label'] for m in self.manifest['models'])}.")
            mask = pc.and_(mask, pc.equal(table["checkpoint"], checkpoint))
        rows = table.filter(mask).to_pylist()
        if not rows:
            raise IPolicyError(f"No prediction for sample {sample_index}, position {position}, layer {layer}. Fix: "
                               "pick a sample_index and position from `tokens`, and a layer in 0..L (0: resid only).")
        text = dict(zip(self.vocabulary["token_id"], self.vocabulary["text"]))
        ids, probs = rows[0]["top_ids"], rows[0]["top_probs"]
        return pd.DataFrame({"rank": range(1, len(ids) + 1), "token_id": ids, "text": [text.get(i) for i in ids],
                             "prob": probs})

    def __repr__(self) -> str:
        m = self.manifest
        first = m["checkpoints"][-1] if "checkpoints" in m else m
        steps = f", {len(m['models'])} checkpoints" if "models" in m else ""
        return (f"EntropyResult(model={first['model']!r}, samples={first['n_samples']}, tokens={first['n_tokens']}, "
                f"layers={first['n_layers']}, norm_mode={self.norm_mode!r}, boundary={self.boundary}{steps})")

    def _repr_html_(self) -> str:
        """In a notebook: the one-line summary, the head of the summary table and the entropy-flow figure."""
        import base64
        import html
        import io

        figure = self.plot_flow()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        figures.plt.close(figure)
        image = base64.b64encode(buffer.getvalue()).decode()
        return (f"<div><code>{html.escape(repr(self))}</code>{self._last_step().head(6).to_html(index=False)}"
                f"<img alt='entropy flow' src='data:image/png;base64,{image}'/></div>")

    def view(self, out: str | Path | None = None, samples: int | None = None):
        """The interactive per-token view (one self-contained HTML page, no network): the response tokens against
        the layers, coloured by the entropy of a chosen policy or its ΔH, each cell's top-k tokens on hover. With
        ``out`` the page is written there (returned as its path); without, an object that a notebook displays
        inline. ``samples``: how many samples the page holds, the first ones (default 8; across checkpoints, 8
        sample-checkpoints)."""
        from .view import write_view

        return write_view(self, out, samples)

    @property
    def last_checkpoint(self) -> str | None:
        """Across checkpoints, the label of the last model (in step order, as given); else None."""
        return self.manifest["models"][-1]["label"] if "models" in self.manifest else None

    def _last_step(self) -> pd.DataFrame:
        if "checkpoint" not in self.summary:
            return self.summary
        return self.summary[self.summary["checkpoint"] == self.last_checkpoint]

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
            raise IPolicyError(f"'{out}' holds no finished entropy run (no manifest.json). Fix: analyse into it (`ipolicy entropy --out`, or `out` of analyse), or check the path.")
        manifest = json.loads((out / "manifest.json").read_text())
        refinement = pd.read_csv(out / "refinement.csv") if (out / "refinement.csv").is_file() else None
        boundary = manifest.get("boundary_layer", manifest.get("checkpoints", [{}])[-1].get("boundary_layer"))
        predictions, vocabulary = _read_predictions(out, manifest)
        return cls(pd.read_csv(out / "summary.csv"), boundary, manifest, read_jsonl_samples(out / "samples.jsonl"),
                   pd.read_parquet(out / "tokens.parquet"), refinement, out, predictions, vocabulary)

    def plot_refinement(self):
        """The paper's Fig. 5: cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) against the higher layer j."""
        if self.refinement is None:
            raise IPolicyError("No refinement was measured. Fix: pass `refine_layer`.")
        return figures.feature_refinement(self.refinement)


def _read_predictions(out: Path, manifest: dict) -> tuple[pa.Table | None, pd.DataFrame | None]:
    """predictions.parquet and vocabulary.parquet of a results folder; across checkpoints, every model's, with its
    step and label."""
    import pyarrow.parquet as pq

    if "models" not in manifest:
        if not (out / "predictions.parquet").is_file():
            return None, None
        return pq.read_table(out / "predictions.parquet"), pd.read_parquet(out / "vocabulary.parquet")
    tables, vocabularies = [], []
    for model in manifest["models"]:
        folder = out / "checkpoints" / model.get("folder", "")
        if not model.get("folder") or not (folder / "predictions.parquet").is_file():
            return None, None
        table = pq.read_table(folder / "predictions.parquet")
        tables.append(table.append_column("step", pa.array(np.full(len(table), model["step"], dtype=np.int64)))
                      .append_column("checkpoint", pa.array([model["label"]] * len(table))))
        vocabularies.append(pd.read_parquet(folder / "vocabulary.parquet"))
    return pa.concat_tables(tables), pd.concat(vocabularies).drop_duplicates("token_id").reset_index(drop=True)


class _InMemory:
    """Where finished batches go when nothing is written: the same calls as ``runs.EntropyFolder``, kept in memory."""

    def __init__(self):
        self.shards: list[pd.DataFrame] = []
        self.predictions: list[pa.Table] = []

    def done_sample_indices(self) -> set[int]:
        return set()

    def add_shard(self, table: pd.DataFrame, process: int | None = None, predictions: pa.Table | None = None) -> None:
        self.shards.append(table)
        if predictions is not None:
            self.predictions.append(predictions)

    def combine_tokens(self) -> pd.DataFrame:
        return pd.concat(self.shards, ignore_index=True).sort_values(SHARD_ORDER, kind="stable", ignore_index=True)

    def combine_predictions(self) -> pa.Table:
        return pa.concat_tables(self.predictions).sort_by([("sample_index", "ascending"), ("layer", "ascending"),
                                                           ("state", "ascending"), ("position", "ascending")])


def vocabulary_of(tokenizer, tokens: pd.DataFrame, predictions: pa.Table) -> pd.DataFrame:
    """The token ids that the responses and the predictions name, with their vocabulary spelling and decoded text:
    what a reader (or the view) needs to show predictions without the model (vocabulary.parquet)."""
    import pyarrow.compute as pc

    listed = pc.list_flatten(predictions.column("top_ids")).to_numpy() if len(predictions) else np.empty(0, int)
    ids = np.unique(np.concatenate([tokens["token_id"].to_numpy(), listed])).tolist()
    return pd.DataFrame({"token_id": ids, "token": tokenizer.convert_ids_to_tokens(ids),
                         "text": tokenizer.batch_decode([[i] for i in ids])})


def analyse(config: EntropyConfig | None = None, *, out: str | Path | None = None, overwrite: bool = False,
            progress: bool = False, samples: list[Sample] | None = None, loaded: LoadedModel | None = None,
            **options) -> EntropyResult:
    """Layer-wise and module-wise internal policy entropy of ``config.model`` on ``config.data``.

    ``config`` fields may also be given as keywords (``analyse(model="Qwen/Qwen3-4B", data="math500", limit=8)``).
    ``samples`` replaces ``config.data`` (rows without a response get generated ones); ``loaded`` reuses a model
    already in memory (``config.model`` must name it, or be left at its default). A training run folder as
    ``config.model`` analyses its base model and every checkpoint (``compare``). With ``out`` the results folder is
    written (resumable; figures included); without, nothing is. A folder resumes only a run of the same options, the
    same input samples (by content) and the same model (by its files, or its weights in memory for ``loaded``).
    """
    config = replace(config, **options) if config is not None else EntropyConfig(**options)
    if samples is not None:
        config = replace(config, data=GIVEN_SAMPLES)  # what manifest.json records as the data
    if loaded is not None:
        config = _naming(config, loaded)
    elif len(checkpoint_series(config.model, config.base_model, config.revisions).checkpoints) > 1:
        return compare([config.model], config, out=out, overwrite=overwrite, progress=progress, samples=samples)
    inputs = samples if samples is not None else load_samples(config.data, limit=config.limit, seed=config.seed)
    if out is None:
        return _analyse(config, _InMemory(), progress, inputs, loaded)
    fingerprint = run_fingerprint(config, inputs, loaded, given=samples is not None)
    share = _Share.of_launch(config.device)
    if share.processes > 1:  # under `accelerate launch`: the main process holds the lock and merges
        return _analyse_shared(config, Path(out), overwrite, progress, inputs, share, fingerprint)
    with folder_lock(out):  # one writer per folder
        return _analyse(config, EntropyFolder(Path(out), fingerprint, overwrite), progress, inputs, loaded)


def _naming(config: EntropyConfig, loaded: LoadedModel) -> EntropyConfig:
    """The config of a run on a model already in memory: its ``model`` names that model (the default is taken to
    mean "the loaded one"); a config naming another model is refused."""
    if config.model == DEFAULT_MODEL and model_location(loaded.name) != model_location(DEFAULT_MODEL):
        return replace(config, model=loaded.name)
    if model_location(config.model) != model_location(loaded.name):
        raise IPolicyError(f"`model` is '{config.model}' but `loaded` holds '{loaded.name}'. Fix: leave `model` out "
                           "when passing `loaded`, or pass the model it names.")
    return config


def run_fingerprint(config: EntropyConfig, inputs: list[Sample], loaded: LoadedModel | None = None,
                    given: bool = False) -> dict:
    """What decides the numbers of a run, resolved (docs/definitions.md, manifest.json ``fingerprint``): the options,
    the model's identity (absolute location and its files' digest; with ``loaded``, its weights in memory), the data
    as an absolute path and the input samples by content (``given``: samples passed in, not read from ``data``), and
    the dtype the weights really have ("auto" means float32 on a CPU, bfloat16 on a GPU)."""
    fingerprint = config.fingerprint()
    fingerprint["model"] = model_identity(config.model, config.revision, config.base_model)
    if loaded is not None:
        fingerprint["model"]["weights"] = weights_digest(loaded.hf_model)
        fingerprint["dtype"] = str(loaded.dtype).removeprefix("torch.")
    else:
        fingerprint["dtype"] = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    fingerprint["data"] = None if given else data_location(config.data)
    fingerprint["samples"] = samples_digest(inputs)
    return fingerprint


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


def _analyse_shared(config: EntropyConfig, out: Path, overwrite: bool, progress: bool, inputs: list[Sample],
                    share: _Share, fingerprint: dict):
    """Data-parallel: the main process prepares the folder and the responses (samples.jsonl), every process analyses
    its share of the samples into the shared shard folder, and the main process merges them and writes the results;
    every process returns the merged result. Resume works per process: finished shards are skipped by all."""
    device = f"cuda:{share.state.local_process_index}" if "cuda" in str(share.state.device) else "cpu"
    config = replace(config, device=device)
    if share.index == 0:
        with folder_lock(out):
            sink = EntropyFolder(out, fingerprint, overwrite)
            _, loaded = _responses_and_model(config, sink, inputs, None, progress, {})  # responses once, saved
            share.wait()  # samples.jsonl is written
            _analyse(config, sink, progress, inputs, loaded, share)  # waits for every share, then merges
            share.wait()  # the results are written
    else:
        share.wait()
        _analyse(config, EntropyFolder(out, fingerprint), progress, inputs, None, share)
        share.wait()
    return EntropyResult.load(out)


def _analyse(config: EntropyConfig, sink, progress: bool, inputs: list[Sample], loaded: LoadedModel | None,
             share: _Share | None = None) -> EntropyResult | None:
    """The run itself. With a ``share`` of a data-parallel run, this process analyses its samples only, and only the
    main process (after everyone's shards are written) merges and writes the results; the others return None."""
    share = share or _Share()
    out = sink.out if isinstance(sink, EntropyFolder) else None
    started = time.perf_counter()
    timings: dict[str, float] = {}
    samples, loaded = _responses_and_model(config, sink, inputs, loaded, progress, timings)
    chat = parse_chat_template_kwargs(config.chat_template_kwargs)
    tokenized = [tokenize_sample(loaded.tokenizer, s, loaded.context_length, chat) for s in samples]
    analysable = [i for i, t in enumerate(tokenized) if t.response_ids]  # docs/definitions.md §2
    if not analysable:
        raise IPolicyError(f"None of the {len(samples)} samples has a response token to analyse. Fix: give responses "
                           "with text, or leave `response` out of the rows to generate them.")
    engine = EntropyEngine(loaded, EngineConfig(norm_mode=config.norm_mode, fast=config.fast,
                                                batch_tokens=config.batch_tokens, top_k=config.top_k))
    t = time.perf_counter()
    timings["analysed_tokens"] = _analyse_batches(engine, tokenized, analysable, sink, config.norm_mode, progress, share)
    if share.processes > 1:
        share.wait()  # every process's shards are written
    timings["analyse_s"] = time.perf_counter() - t
    if share.index != 0:
        return None
    refinement = (feature_refinement(engine, [tokenized[i] for i in analysable], config.refine_layer)
                  if config.refine_layer else None)
    tokens = sink.combine_tokens()
    predictions = sink.combine_predictions() if config.top_k else None
    vocabulary = vocabulary_of(loaded.tokenizer, tokens, predictions) if config.top_k else None
    summary = summarize(tokens)
    summary.insert(6, "norm_mode", config.norm_mode)
    boundary = boundary_layer(summary, config.boundary_tolerance)
    timings["total_s"] = time.perf_counter() - started
    skipped = [samples[i].id for i in range(len(samples)) if i not in set(analysable)]
    manifest = {**_manifest(config, loaded, engine, samples, summary, boundary, timings, skipped),
                "processes": share.processes, "skipped_samples": skipped}
    result = EntropyResult(summary, boundary, manifest, samples, tokens, refinement, out, predictions, vocabulary)
    if out is not None:
        sink.finish(summary, manifest, refinement, vocabulary)
        label = Path(config.model).name if config.model.endswith(".gguf") else config.model
        figures.save_figure(result.plot_flow(f"{label}: internal policy entropy"), sink.out / "entropy_flow")
        figures.save_figure(result.plot_change(f"{label}: module entropy change"), sink.out / "entropy_change")
    return result


def _responses_and_model(config: EntropyConfig, sink, inputs: list[Sample], loaded: LoadedModel | None,
                         progress: bool, timings: dict) -> tuple[list[Sample], LoadedModel]:
    """The samples with a response each (given, resumed from the folder, or generated) and the loaded model.
    vLLM generates before the model loads (it needs the memory); transformers generates with the loaded model."""
    saved = getattr(sink, "samples_path", None)
    resumed = saved is not None and saved.is_file() and sink.holds_previous_results
    samples = read_jsonl_samples(saved) if resumed else inputs  # resumed: the responses of the interrupted run
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.generation_batch_size,
                              config.seed)
    options = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    chat = parse_chat_template_kwargs(config.chat_template_kwargs)
    timings["generate_s"] = 0.0

    def generate_responses(tokenizer, context: int | None, generate, stop_ids: list[int]) -> list[Sample]:
        t = time.perf_counter()
        _check_lengths(tokenizer, context, samples, config.max_new_tokens, chat)
        done = complete_samples(tokenizer, samples, config.samples, generate, chat, stop_ids)
        if isinstance(sink, EntropyFolder):
            sink.start()
            write_jsonl(sink.samples_path, done)
        timings["generate_s"] += time.perf_counter() - t
        return done

    if not resumed and config.rollouts == "vllm" and any(s.response is None for s in samples):
        files = model_files(config.model, **options)
        samples = generate_responses(files.tokenizer, files.context_length, lambda ids, n: sample_responses_vllm(
            files.location, ids, sampling, n, config.dtype, progress, **options), stop_token_ids(files.tokenizer))
    t = time.perf_counter()
    loaded = loaded or load_model(config.model, dtype=config.dtype, device=config.device, device_map=config.device_map,
                                  base_model=config.base_model, **options)
    timings["load_s"] = time.perf_counter() - t
    if config.refine_layer is not None and not 1 <= config.refine_layer < loaded.n_layers:
        raise IPolicyError(f"`refine_layer` must be in 1..{loaded.n_layers - 1}, got {config.refine_layer}. "
                           "Fix: pick a layer below the last.")
    if not resumed:  # generates what is missing, and saves the samples (samples.jsonl) before any result
        samples = generate_responses(loaded.tokenizer, loaded.context_length,
                                     lambda ids, n: sample_responses(loaded, ids, sampling, n, progress),
                                     stop_token_ids(loaded.tokenizer, loaded.hf_model))
    return samples, loaded


def _check_lengths(tokenizer, context: int | None, samples: list[Sample], max_new_tokens: int, chat: dict) -> None:
    """Refuse, before anything is generated or written, a sample that cannot fit the model's context (tokens), and
    samples that leave nothing to analyse (every response given, and every one empty)."""
    if all(s.response is not None for s in samples) and not any(
            tokenize_sample(tokenizer, s, None, chat).response_ids for s in samples):
        raise IPolicyError(f"Every one of the {len(samples)} samples has an empty response: there is no token to "
                           "analyse. Fix: give responses with text, or leave `response` out to generate them.")
    for sample in samples:
        if sample.response is not None:
            tokenize_sample(tokenizer, sample, context, chat)
        elif context is not None:
            n_prompt = len(encode(tokenizer, render_prompt(tokenizer, sample.prompt, chat)))
            check_prompt_fits(sample.id, n_prompt, max_new_tokens, context)


def _analyse_batches(engine, tokenized, analysable: list[int], sink, norm_mode: str, progress: bool, share: _Share) -> int:
    """Analyse every sample of ``analysable`` (of this process's share) not yet in ``sink``, one length-sorted batch at
    a time, each batch one shard. Returns the response tokens of the samples that this run analyses, over all
    processes (those resumed from earlier shards excluded)."""
    done = sink.done_sample_indices()
    missing = [i for i in analysable if i not in done]
    todo = share.mine(missing)
    with tqdm(total=len(analysable), initial=len(done), desc="analysing", unit="sample", disable=not progress) as bar:
        for batch in engine.batches([tokenized[i] for i in todo]):
            indices = [todo[i] for i in batch]
            table, predictions = engine.analyse_batch([tokenized[i] for i in indices], sample_index=indices)
            table["norm_mode"] = norm_mode
            sink.add_shard(table, share.index if share.processes > 1 else None, predictions)
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


def _manifest(config: EntropyConfig, loaded: LoadedModel, engine, samples, summary, boundary, timings,
              skipped: list[str]) -> dict:
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
        "n_samples": len(samples) - len(skipped),
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

    With ``out``, each model gets a resumable subfolder ``out/checkpoints/LABEL`` and the combined tables, the
    entropy-dynamics figure and the manifest are written to ``out``. The folder resumes only the same options, input
    samples and first model (whose responses every model analyses); a run folder that gained checkpoints extends it.
    """
    config = replace(config, **options) if config is not None else EntropyConfig(**options)
    if samples is not None:
        config = replace(config, data=GIVEN_SAMPLES)
    series = [checkpoint_series(spec, config.base_model, config.revisions) for spec in models]
    targets = _unique_labels([c for s in series for c in s.checkpoints])
    inputs = samples if samples is not None else load_samples(config.data, limit=config.limit, seed=config.seed)
    config = replace(config, revisions=None)  # each checkpoint carries its own revision
    if out is None:
        return _compare(targets, series, config, None, overwrite, progress, inputs)
    fingerprint = run_fingerprint(_checkpoint_config(config, targets[0]), inputs, given=samples is not None)
    with folder_lock(out):
        return _compare(targets, series, config, ComparisonFolder(Path(out), fingerprint, overwrite), overwrite, progress,
                        inputs)


def _unique_labels(targets: list) -> list:
    """Checkpoints whose labels repeat (two folders of one name, a model given twice) get '#n' appended, so that every
    table row, model folder and view entry names one model."""
    labels = [c.label for c in targets]
    return [replace(c, label=f"{c.label}#{i}") if labels.count(c.label) > 1 else c for i, c in enumerate(targets)]


def _checkpoint_config(config: EntropyConfig, checkpoint) -> EntropyConfig:
    """The config that analyses one checkpoint of a series: its model, revision and base model."""
    return replace(config, model=checkpoint.model, revision=checkpoint.revision or config.revision,
                   base_model=checkpoint.base_model or config.base_model)


def _compare(targets: list, series: list, config: EntropyConfig, folder: ComparisonFolder | None, overwrite: bool,
             progress: bool, inputs: list[Sample]) -> EntropyResult:
    if not targets:
        raise IPolicyError("`models` names no model. Fix: give at least one model or run folder.")
    tables: dict[str, list[pd.DataFrame]] = {"summary": [], "tokens": [], "refinement": []}
    results, model_folders = [], []
    if folder is not None:
        folder.keep = {folder.model_folder(c.label).name for c in targets}
    for i, checkpoint in enumerate(targets):
        label, step = checkpoint.label, checkpoint.step
        sub_config = _checkpoint_config(config, checkpoint)
        if folder is None:
            result = analyse(sub_config, progress=progress, samples=results[0].samples if i else inputs)
        else:
            model_folders.append(folder.model_folder(label))
            given = read_jsonl_samples(folder.samples_path) if i else inputs  # the first model's responses
            if i:  # recorded in the manifest: the samples this model analysed
                sub_config = replace(sub_config, data=str(folder.samples_path), limit=None, samples=1)
            result = analyse(sub_config, out=model_folders[-1], overwrite=overwrite, progress=progress, samples=given)
            if i == 0:
                folder.write_samples(result.out / "samples.jsonl")
        for name, table in (("summary", result.summary), ("tokens", result.tokens), ("refinement", result.refinement)):
            if table is not None:
                table = table.copy()
                table.insert(min(6, len(table.columns)), "step", step)
                table.insert(min(7, len(table.columns)), "checkpoint", label)
                tables[name].append(table)
        results.append(result)
    summary, tokens = (pd.concat(tables[k], ignore_index=True) for k in ("summary", "tokens"))
    refinement = pd.concat(tables["refinement"], ignore_index=True) if tables["refinement"] else None
    manifest = {"models": [dict(label=c.label, step=c.step, model=c.model, revision=c.revision, source=c.source,
                                **({"folder": f.name} if folder else {}))
                           for c, f in zip(targets, model_folders or [None] * len(targets))],
                "series": [s.record()["layout"] for s in series],
                "norm_mode": config.norm_mode, "data": config.data, "checkpoints": [r.manifest for r in results]}
    predictions = vocabulary = None
    if all(r.prediction_table is not None for r in results):
        predictions = pa.concat_tables([
            r.prediction_table.append_column("step", pa.array(np.full(len(r.prediction_table), s, dtype=np.int64)))
            .append_column("checkpoint", pa.array([c.label] * len(r.prediction_table))) for r, c, s in
            zip(results, targets, (c.step for c in targets))])
        vocabulary = pd.concat([r.vocabulary for r in results]).drop_duplicates("token_id").reset_index(drop=True)
    result = EntropyResult(summary, results[-1].boundary, manifest, results[0].samples, tokens, refinement,
                           folder.out if folder else None, predictions, vocabulary)
    if folder is not None:
        folder.finish(summary, tokens, refinement, manifest, model_folders)
        figures.save_figure(result.plot_dynamics(), folder.out / "entropy_dynamics")
    return result
