"""Every folder layout ipolicy writes or reads, in one place.

Entropy results (``ipolicy entropy --out DIR``), ``EntropyFolder``::

    samples.jsonl     the analysed samples, with their (given or generated) responses
    tokens.parquet    one row per analysed token x layer x module
    predictions.parquet   with top_k: one row per analysed token x distinct state (top-k, the token's rank)
    vocabulary.parquet    with top_k: the text of every token id the predictions and responses name
    summary.csv       one row per layer x module
    refinement.csv    with refine_layer: one row per higher layer
    manifest.json     model, revision, dtype, norm mode, data, seed, versions, timings, and the run's fingerprint
    entropy_flow.png, entropy_change.png
    .partial/         shards of finished batches while a run is in progress (removed when it completes)
    checkpoints/LABEL/ across checkpoints: one entropy folder per model

Training runs (``ipolicy train-* --out DIR``), ``RunFolder``::

    run.json                 base model, configuration, internal layer
    metrics.jsonl            one line per step
    checkpoints/step-N/      a save_pretrained folder (safetensors, tokenizer) + the trainer state (rl/checkpoint.py)

Series of checkpoints (``checkpoint_series``) that entropy, compare, eval and figures read, in the layouts of
ipolicy, TRL / the HF Trainer (``checkpoint-N/``, full weights or PEFT adapters), verl
(``global_step_N/actor/huggingface/``), Hub revisions, and folders of numbered model folders.

Evaluations (``ipolicy eval --out DIR``), ``EvalFolder``::

    responses/MODEL--DATASET.jsonl   every response with its reward and verdict
    problems.csv, summary.csv, summary.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IPolicyError
from .io import atomic_write, atomic_write_json, atomic_write_text

FINGERPRINT_KEY = b"ipolicy_fingerprint"


def check_output_folder(out: str | Path) -> Path:
    """Refuse, before any work, an output folder that cannot be one: an existing file, or a place this process may
    not write to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IPolicyError(f"`out` '{out}' is a file, not a folder. Fix: choose a folder (new or a previous run's).")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise IPolicyError(f"`out` '{out}' cannot be written: '{existing}' is not writable by this user. "
                           "Fix: choose another `out`, or fix the folder's permissions.")
    return out


def _lock_paths(out: Path) -> tuple[Path, Path]:
    """The lock file and its holder record, beside the folder (so a refused run leaves the folder untouched)."""
    out = out.resolve()  # a folder reached through a symlink has the one lock of the folder itself
    return out.parent / f".{out.name}.lock", out.parent / f".{out.name}.lock.json"


@contextmanager
def folder_lock(out: str | Path):
    """Hold the one writer's lock of output folder ``out`` (``filelock``: an OS file lock, which the OS releases when
    its process dies, so a killed run never blocks a rerun). A second writer is refused at once, with the holder's
    pid, host, command and start time."""
    from filelock import FileLock, Timeout

    out = check_output_folder(out)
    lock_path, holder_path = _lock_paths(out)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(holder_path.read_text())
            who = (f"pid {holder['pid']} on {holder['host']} since {holder['started']}: "
                   f"{holder['command']}")
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise IPolicyError(f"'{out}' is being written by {who}. Fix: wait for it to finish, or choose another "
                           "`out`.") from None
    try:
        atomic_write_json(holder_path, {"pid": os.getpid(), "host": socket.gethostname(),
                                        "command": " ".join(sys.argv) or "python",
                                        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        yield out
    finally:
        holder_path.unlink(missing_ok=True)
        # removed while still held, so that no lock files pile up beside folders: a peer that opened the old file
        # finds it unlinked when it gets the lock, and filelock makes it take a fresh one
        lock_path.unlink(missing_ok=True)
        lock.release()


def _refuse_model_or_run(out: Path) -> None:
    """Results never go into a model or a training run's folder, where overwriting or tidying would delete weights."""
    if not out.is_dir():
        return
    what = ("a model folder" if _is_model(out) else
            "a training run's folder" if (out / "run.json").is_file() or (out / "metrics.jsonl").is_file()
            or any((out / "checkpoints").glob("step-*/config.json")) else
            "a trainer's output folder" if any(out.glob("checkpoint-*/config.json")) or any(out.glob("global_step_*"))
            else None)
    if what:
        raise IPolicyError(f"`out` '{out}' is {what}; results written there could replace its files. Fix: choose "
                           "another `out` (e.g. a subfolder of runs/).")


class ResultsFolder:
    """An output folder whose results are fingerprinted (everything that changes the numbers): a rerun with the same
    fingerprint resumes, a different one is refused unless ``overwrite``.

    ``outputs`` are every file and folder a run writes; ``overwrite`` removes them all, at the first write (``start``),
    so that a run refused or failing before that (a mistyped model, bad data) leaves the previous results whole.
    ``manifest`` is the output that records the fingerprint of a finished run."""

    outputs: tuple[str, ...] = ()
    manifest_name = "manifest.json"

    def __init__(self, out: Path, fingerprint: dict, overwrite: bool = False):
        self.out = Path(out)
        _refuse_model_or_run(self.out)
        self.partial = self.out / ".partial"
        self.manifest = self.out / self.manifest_name
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.overwrite = overwrite and self.out.exists()  # until start() has cleared the folder
        if not self.overwrite:
            self._check_fingerprint()

    @property
    def holds_previous_results(self) -> bool:
        """Whether the folder's results belong to this run (to resume from): not when they are to be overwritten."""
        return not self.overwrite

    def start(self) -> None:
        """Called just before the first result is written: with ``overwrite``, remove the previous run's outputs;
        then record the fingerprint. A run that fails earlier (bad model, bad data) leaves the folder as it was."""
        if self.overwrite:
            for name in (*self.outputs, ".partial"):
                for path in self.out.glob(name):
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            self.overwrite = False
        if not (self.partial / "fingerprint.json").is_file():
            atomic_write_json(self.partial / "fingerprint.json", self.fingerprint)

    def _check_fingerprint(self) -> None:
        for path in (self.partial / "fingerprint.json", self.manifest):
            if not path.is_file():
                continue
            stored = json.loads(path.read_text())
            stored = stored.get("fingerprint", stored)
            changed = sorted(k for k in set(stored) | set(self.fingerprint) if stored.get(k) != self.fingerprint.get(k))
            if changed:
                raise IPolicyError(
                    f"'{self.out}' holds results of a different run (differs in: {', '.join(changed)}). "
                    "Fix: choose another `out`, or add `overwrite` to replace them."
                )

    def remove(self, *names: str) -> None:
        """Drop outputs of an earlier run that this run does not write (so that no stale file is read as its own)."""
        for name in names:
            for path in self.out.glob(name):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def unchanged(self, manifest: dict) -> bool:
        """Whether a finished run's results are those the folder already held (a rerun that found everything done):
        then a view made of them stays."""
        if not self.manifest.is_file():
            return False
        old, new = json.loads(self.manifest.read_text()), {**manifest, "fingerprint": self.fingerprint}
        return all(old.get(key) == json.loads(json.dumps(new.get(key), default=str))
                   for key in ("fingerprint", "models", "n_samples", "n_tokens"))

    def write_manifest(self, manifest: dict) -> None:
        """Record the finished run (with its fingerprint) and drop the in-progress state."""
        atomic_write_json(self.manifest, {**manifest, "fingerprint": self.fingerprint})
        shutil.rmtree(self.partial, ignore_errors=True)


class EntropyFolder(ResultsFolder):
    """The results folder of an entropy run: each finished batch is an atomic parquet shard, merged at the end."""

    # everything an entropy run writes, and what a comparison into the same folder writes (an --overwrite replaces
    # either with the other)
    outputs = ("samples.jsonl", "tokens.parquet", "predictions.parquet", "vocabulary.parquet", "summary.csv",
               "refinement.csv", "manifest.json", "entropy_flow.png", "entropy_change.png", "view.html", "checkpoints",
               "entropy_dynamics.png")

    @property
    def samples_path(self) -> Path:
        return self.out / "samples.jsonl"

    def _shards(self) -> list[Path]:
        return sorted(self.partial.glob("batch-*.parquet")) if self.holds_previous_results else []

    @property
    def _fingerprint_hash(self) -> bytes:
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16].encode()

    def _read_shard(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        """A shard, checked: readable, and written by a run with this folder's fingerprint."""
        fix = f"Fix: delete '{path}' and rerun (its samples are recomputed), or add `overwrite` to start afresh."
        try:
            schema = pq.read_schema(path)
            table = pq.read_table(path, columns=columns)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise IPolicyError(f"Shard '{path}' is damaged ({type(error).__name__}: {error}). {fix}") from None
        if (schema.metadata or {}).get(FINGERPRINT_KEY) != self._fingerprint_hash:
            raise IPolicyError(f"Shard '{path}' was not written by this run (its fingerprint differs). {fix}")
        return table

    def _shard_samples(self) -> dict[Path, set[int]]:
        """The sample indices of every shard, refusing a sample that two shards both hold."""
        seen: dict[int, Path] = {}
        out = {}
        for shard in self._shards():
            indices = {int(i) for i in self._read_shard(shard, ["sample_index"]).column("sample_index").to_pylist()}
            for i in indices:
                if i in seen:
                    raise IPolicyError(f"Sample {i} is in two shards, '{seen[i]}' and '{shard}' (two runs wrote this "
                                       f"folder). Fix: delete '{self.partial}' and rerun, or add `overwrite`.")
                seen[i] = shard
            out[shard] = indices
        return out

    def done_sample_indices(self) -> set[int]:
        done: set[int] = set()
        if self.holds_previous_results and self.manifest.is_file() and (self.out / "tokens.parquet").is_file():
            done |= set(pd.read_parquet(self.out / "tokens.parquet", columns=["sample_index"])["sample_index"])
        for indices in self._shard_samples().values():
            done |= indices
        return {int(i) for i in done}

    def add_shard(self, table: pd.DataFrame, process: int | None = None, predictions: pa.Table | None = None) -> None:
        """Write one finished batch; ``process``: this process's index in a data-parallel run (its own shard names).
        Its predictions (with top_k) go to a shard of the same name with the prefix "pred-", written first: a batch
        shard always has its predictions beside it."""
        self.start()
        first = int(table["sample_index"].min())
        prefix = "batch-" if process is None else f"batch-p{process:03d}-"
        name = f"{prefix}{len(list(self.partial.glob(prefix + '[0-9]*.parquet'))):05d}-{first:06d}.parquet"
        for path, arrow in ((self.partial / f"pred-{name}", predictions),
                            (self.partial / name, pa.Table.from_pandas(table, preserve_index=False))):
            if arrow is not None:
                arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                                       FINGERPRINT_KEY: self._fingerprint_hash})
                atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))

    def combine_tokens(self) -> pd.DataFrame:
        """Merge the shards (and a previous complete tokens.parquet) into tokens.parquet; return the table. Arrow
        buffers are released as they are converted, so the merge holds about one copy of the table."""
        self._shard_samples()  # every shard readable, of this run, and no sample twice
        tables = [self._read_shard(path) for path in self._shards()]
        if (self.out / "tokens.parquet").is_file() and self.manifest.is_file():
            tables = [pq.read_table(self.out / "tokens.parquet"), *tables]
        if not tables:
            raise IPolicyError(f"No results in '{self.out}'. Fix: rerun the analysis.")
        table = pa.concat_tables(tables, promote_options="default")
        del tables
        table = table.sort_by([("sample_index", "ascending"), ("layer", "ascending"), ("position", "ascending")])
        atomic_write(self.out / "tokens.parquet", lambda tmp: pq.write_table(table, tmp))
        return table.to_pandas(split_blocks=True, self_destruct=True)

    def combine_predictions(self) -> pa.Table:
        """Merge the predictions shards of the batch shards (and a previous complete predictions.parquet) into
        predictions.parquet; return the table (sorted by sample, layer, state, position)."""
        tables = []
        for shard in self._shards():
            pred = shard.with_name(f"pred-{shard.name}")
            if not pred.is_file():
                raise IPolicyError(f"Shard '{shard}' has no predictions beside it ('{pred.name}'). Fix: delete '{shard}' "
                                   "and rerun (its samples are recomputed), or add `overwrite` to start afresh.")
            tables.append(self._read_shard(pred))
        if (self.out / "predictions.parquet").is_file() and self.manifest.is_file():
            tables = [pq.read_table(self.out / "predictions.parquet"), *tables]
        table = pa.concat_tables(tables)
        del tables
        table = table.sort_by([("sample_index", "ascending"), ("layer", "ascending"), ("state", "ascending"),
                               ("position", "ascending")])
        atomic_write(self.out / "predictions.parquet", lambda tmp: pq.write_table(table, tmp))
        return table

    def finish(self, summary: pd.DataFrame, manifest: dict, refinement: pd.DataFrame | None = None,
               vocabulary: pd.DataFrame | None = None) -> None:
        atomic_write(self.out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
        if refinement is not None:
            atomic_write(self.out / "refinement.csv", lambda tmp: refinement.to_csv(tmp, index=False))
        else:
            self.remove("refinement.csv")  # an earlier run's, with another `refine_layer`
        if vocabulary is not None:
            atomic_write(self.out / "vocabulary.parquet", lambda tmp: vocabulary.to_parquet(tmp, index=False))
        else:  # an earlier run's, with `top_k`
            self.remove("predictions.parquet", "vocabulary.parquet")
        self.remove("checkpoints", "entropy_dynamics.png")  # a comparison's, which this folder held before
        if not self.unchanged(manifest):
            self.remove("view.html")  # a view of the results as they were
        self.write_manifest(manifest)


class ComparisonFolder(ResultsFolder):
    """Several models on the same samples (``compare``): the samples, one entropy folder per model under
    ``checkpoints/LABEL/``, and the combined tables. Its fingerprint holds the options, the input samples' content
    and the identity of the first model (whose responses every model analyses); each model's folder has its own, so
    a series that gained a checkpoint analyses only that one.

    ``overwrite`` removes the previous outputs at the first write, except the model folders of this comparison
    (``keep``), which replace their own contents as they are analysed."""

    outputs = EntropyFolder.outputs
    keep: set[str] = set()

    @property
    def samples_path(self) -> Path:
        return self.out / "samples.jsonl"

    def model_folder(self, label: str) -> Path:
        """The entropy folder of the model labelled ``label`` (made safe for a file name)."""
        return self.out / "checkpoints" / re.sub(r"[^A-Za-z0-9._@#-]+", "_", label)

    def _model_folders(self) -> list[Path]:
        """The entropy folders under checkpoints/ (finished or in progress); nothing else there is ever removed."""
        return [p for p in (self.out / "checkpoints").glob("*")
                if (p / "manifest.json").is_file() or (p / ".partial").is_dir()]

    def start(self) -> None:
        if self.overwrite:  # the previous run's outputs, not this run's model folders
            stale = [p for p in self._model_folders() if p.name not in self.keep]
            self.remove(*(n for n in self.outputs if n != "checkpoints"), ".partial",
                        *(p.relative_to(self.out).as_posix() for p in stale))
            self.overwrite = False
        super().start()

    def write_samples(self, source: Path) -> None:
        """The first model's samples (given or generated responses), which every later model analyses."""
        self.start()
        atomic_write(self.samples_path, lambda tmp: shutil.copyfile(source, tmp))

    def finish(self, summary: pd.DataFrame, tokens: pd.DataFrame, refinement: pd.DataFrame | None, manifest: dict,
               model_folders: list[Path]) -> None:
        """The combined tables and the manifest; model folders of an earlier comparison that this one no longer holds
        are removed, so that the folder holds this comparison only."""
        atomic_write(self.out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
        atomic_write(self.out / "tokens.parquet", lambda tmp: tokens.to_parquet(tmp, index=False))
        if refinement is not None:
            atomic_write(self.out / "refinement.csv", lambda tmp: refinement.to_csv(tmp, index=False))
        else:
            self.remove("refinement.csv")
        keep = {Path(f).name for f in model_folders}
        self.remove(*(p.relative_to(self.out).as_posix() for p in self._model_folders() if p.name not in keep))
        self.remove("predictions.parquet", "vocabulary.parquet", "entropy_flow.png",
                    "entropy_change.png")  # a single model's outputs, which this folder held before
        if not self.unchanged(manifest):
            self.remove("view.html")  # a view of the comparison as it was
        self.write_manifest(manifest)


def _file_name(text: str, identity: str = "") -> str:
    """A readable, unique file-name part for a model label or dataset spec: its last path part, and a short hash of
    it and its ``identity``."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name).strip("_.")[:60]
    return f"{readable}-{hashlib.sha1((text + identity).encode()).hexdigest()[:8]}"


class EvalFolder(ResultsFolder):
    """The folder of an evaluation: one responses file per (model, dataset), written whole when that pair is done."""

    outputs = ("responses", "problems.csv", "summary.csv", "summary.json", "pass_at_k.png")
    manifest_name = "summary.json"

    def responses_path(self, model_label: str, model_identity: str, dataset: str, problems_digest: str) -> Path:
        """The responses of one (model, dataset): named by the model's label and identity (its files) and the
        dataset's name and problems (their content), so a model trained again or a changed data file gets new ones."""
        return self.out / "responses" / (f"{_file_name(model_label, model_identity)}--"
                                         f"{_file_name(dataset, problems_digest)}.jsonl")

    def write_responses(self, path: Path, rows: list[dict]) -> None:
        self.start()
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def finish(self, problems: pd.DataFrame, summary: pd.DataFrame, manifest: dict) -> None:
        atomic_write(self.out / "problems.csv", lambda tmp: problems.to_csv(tmp, index=False))
        atomic_write(self.out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
        self.write_manifest(manifest)


class RunFolder:
    """A training run: ``run.json``, ``metrics.jsonl`` and ``checkpoints/step-N`` (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def is_run(self) -> bool:
        """Whether the folder holds a run, finished, stopped, or stopped before its first checkpoint."""
        return self.metrics_path.is_file() or self.run_json.is_file() or (self.path / "checkpoints").is_dir()

    def checkpoint(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step}"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, in step order (a checkpoint is renamed into place only once it is whole)."""
        found = [p for p in self.path.glob("checkpoints/step-*") if p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def info(self) -> dict:
        """run.json: base model, configuration, internal layer ({} when absent)."""
        return json.loads(self.run_json.read_text()) if self.run_json.is_file() else {}

    def write_info(self, info: dict) -> None:
        atomic_write_text(self.run_json, json.dumps(info, indent=2, default=str))

    def metrics(self) -> pd.DataFrame:
        return pd.read_json(self.metrics_path, lines=True)

    def method(self) -> str:
        """'GRPO', or 'BuPO K=k S=s': runs that share it differ only by seed (and are drawn as one method)."""
        info = self.info()
        config = info.get("config", {})
        if info.get("internal_layer") and config.get("internal_steps"):
            return f"BuPO K={info['internal_layer']} S={config['internal_steps']}"
        return "GRPO"

    def label(self) -> str:
        """'GRPO seed 1' or 'BuPO K=5 S=2 seed 1', for figures that compare runs."""
        return f"{self.method()} seed {self.info().get('config', {}).get('seed', self.path.name)}"


# ---------------------------------------------------------------------------------------------------------------
# Series of checkpoints: the one place that reads a checkpoint folder's name.

MODEL_FILES = ("config.json", "adapter_config.json")  # a folder with one of these is a model (or a PEFT adapter)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass
class Checkpoint:
    """One model of a series: its training ``step`` (0: the base model), a ``label`` for tables and figures, the
    ``model`` that ``load_model`` takes (a folder, a Hub id), the Hub ``revision`` (or None), the ``base_model`` a PEFT
    adapter applies to (or None), and the ``source`` it was found at."""

    step: int
    label: str
    model: str
    revision: str | None = None
    base_model: str | None = None
    source: str = ""


@dataclass
class CheckpointSeries:
    """An ordered series of checkpoints and the layout it was recognised in: ``model`` (one model), ``ipolicy-run``,
    ``trainer-output`` (TRL, HF Trainer: checkpoint-N, full weights or PEFT adapters), ``verl`` (global_step_N/actor/
    huggingface), ``hub-revisions`` or ``numbered-folders`` (any folder of model folders whose names carry a number)."""

    layout: str
    checkpoints: list[Checkpoint]

    def record(self) -> dict:
        """What manifests record of it."""
        return {"layout": self.layout, "checkpoints": [asdict(c) for c in self.checkpoints]}


def _is_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FILES)


def _number(name: str) -> int | None:
    """The step a folder or revision name carries: its last number (step1000, checkpoint-20, global_step_7, iter_0300)."""
    found = re.findall(r"\d+", name)
    return int(found[-1]) if found else None


def _adapter_base(folder: Path, base_model: str | None) -> str | None:
    """The base model of a PEFT adapter folder: ``base_model`` when given, else its adapter_config.json's."""
    if not (folder / "adapter_config.json").is_file():
        return None
    if base_model:
        return base_model
    named = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not named:
        raise IPolicyError(f"The adapter '{folder}' does not name its base model (adapter_config.json has no "
                           "base_model_name_or_path). Fix: give `base_model`.")
    return named


def checkpoint_series(spec: str, base_model: str | None = None, revisions: str | list[str] | None = None) -> CheckpointSeries:
    """The checkpoints ``spec`` names, in step order (see ``CheckpointSeries``). ``base_model``: the step-0 model of a
    trainer or verl output and the base of PEFT adapters that do not name theirs; ``revisions``: Hub revisions of
    ``spec`` (a list, comma-separated, or a pattern such as 'step*', matched against the repository's branches).

    Examples:
        >>> series = checkpoint_series("EleutherAI/pythia-160m", revisions="step2000,step1000")
        >>> series.layout, [(c.step, c.revision) for c in series.checkpoints]
        ('hub-revisions', [(1000, 'step1000'), (2000, 'step2000')])
    """
    path = Path(spec).expanduser()
    if revisions:
        return _hub_revisions(spec, revisions)
    if not path.is_dir():
        return CheckpointSeries("model", [Checkpoint(_number_of_checkpoint(path) or 0, path.name if path.exists() else spec,
                                                     spec, source=spec)])
    if _is_model(path) and not any(re.fullmatch(r"checkpoint-\d+", p.name) and _is_model(p) for p in path.iterdir()):
        step = _number_of_checkpoint(path)
        label = (f"{path.parent.parent.name}-{path.name}" if path.parent.name == "checkpoints" and step is not None
                 else path.name)
        return CheckpointSeries("model", [Checkpoint(step or 0, label, spec, base_model=_adapter_base(path, base_model),
                                                     source=spec)])
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        return _ipolicy_run(path)
    # a trainer's output folder may also hold the final model (trainer.save_model()): its checkpoint-N/ are the series
    children = sorted(p for p in path.iterdir() if p.is_dir())
    if any(re.fullmatch(r"global_step_\d+", p.name) for p in children):
        return _verl(path, children, base_model)
    numbered = [p for p in children if _is_model(p) and _number(p.name) is not None]
    if numbered:
        layout = "trainer-output" if all(re.fullmatch(r"checkpoint-\d+", p.name) for p in numbered) else "numbered-folders"
        shapes = {p.name: _shape(p) for p in numbered}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{name} ({shape[0]}, {shape[1]} layers)" for name, shape in shapes.items())
            raise IPolicyError(f"'{spec}' holds model folders of different architectures ({listed}), not the "
                               "checkpoints of one run. Fix: pass the models one by one (--model A --model B).")
        checkpoints = [Checkpoint(_number(p.name), f"{path.name}-{p.name}", str(p), base_model=_adapter_base(p, base_model),
                                  source=str(p)) for p in numbered]
        base = base_model or next((c.base_model for c in checkpoints if c.base_model), None)
        first = [Checkpoint(0, f"{path.name}-base", base, source="base model")] if base else []
        return CheckpointSeries(layout, first + sorted(checkpoints, key=lambda c: c.step))
    experiments = [p.name for p in children if any(re.fullmatch(r"global_step_\d+", q.name) for q in p.iterdir())]
    if experiments:
        raise IPolicyError(f"'{spec}' is a verl project folder: it holds the experiments {', '.join(experiments)}. Fix: "
                           f"pass one experiment, e.g. '{path / experiments[0]}'.")
    raise IPolicyError(f"'{spec}' is a folder but neither a model (no config.json or adapter_config.json) nor a series "
                       "of checkpoints (an ipolicy run, checkpoint-N/, global_step_N/, or model folders with a step "
                       "number in their names). Fix: point at a model folder or a run's output folder.")


def _shape(folder: Path) -> tuple:
    """What checkpoints of one run share: architecture, depth, width and vocabulary (an adapter: its base model)."""
    if (folder / "adapter_config.json").is_file():
        return ("adapter of " + str(json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")), "-")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    config = config.get("text_config", config)
    return (config.get("model_type", "?"), config.get("num_hidden_layers", config.get("n_layer", "?")),
            config.get("hidden_size", config.get("n_embd")), config.get("vocab_size"))


def _number_of_checkpoint(path: Path) -> int | None:
    """The step of a single checkpoint folder named like one (step-N, checkpoint-N, global_step_N), else None."""
    match = re.fullmatch(r"(?:step-|checkpoint-|global_step_)(\d+)", path.name)
    return int(match.group(1)) if match else None


def _ipolicy_run(path: Path) -> CheckpointSeries:
    run = RunFolder(path)
    checkpoints = run.checkpoints()
    if not checkpoints:
        raise IPolicyError(f"Run folder '{path}' has no checkpoints/step-N. Fix: train with `save_every`, or pass a model.")
    base_model = run.info().get("base_model")
    base = [Checkpoint(0, f"{path.name}-step-0", base_model, source="run.json base_model")] if base_model else []
    return CheckpointSeries("ipolicy-run", base + [Checkpoint(int(c.name[5:]), f"{path.name}-{c.name}", str(c), source=str(c))
                                                   for c in checkpoints])


def _verl(path: Path, children: list[Path], base_model: str | None) -> CheckpointSeries:
    """verl: EXPERIMENT/global_step_N/actor/huggingface holds the HF weights when the run saved `hf_model`; FSDP
    shards alone (pickles, never opened here) must first be merged by verl's model merger."""
    checkpoints = []
    for step_folder in sorted((p for p in children if re.fullmatch(r"global_step_\d+", p.name)), key=lambda p: _number(p.name)):
        actor = step_folder / "actor"
        hf = actor / "huggingface"
        if not (hf / "config.json").is_file() or not any(any(hf.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            shard = next(iter(sorted(actor.glob("model_world_size_*_rank_*.pt"))), actor)
            raise IPolicyError(
                f"verl checkpoint '{step_folder}' has no Hugging Face weights in actor/huggingface, only FSDP shards "
                f"('{shard}'), which ipolicy does not open (they are pickles). Fix: merge them with verl: python -m "
                f"verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {hf}")
        checkpoints.append(Checkpoint(_number(step_folder.name), f"{path.name}-{step_folder.name}", str(hf), source=str(hf)))
    base = [Checkpoint(0, f"{path.name}-base", base_model, source="base model")] if base_model else []
    return CheckpointSeries("verl", base + checkpoints)


# TRL's and the HF Trainer's names for what metrics.jsonl calls reward_mean, response_len_mean, entropy
TRAINER_METRICS = {"reward": "reward_mean", "completions/mean_length": "response_len_mean", "entropy": "entropy"}


def trainer_metrics(path: Path) -> pd.DataFrame | None:
    """The training metrics of a TRL / HF Trainer output folder, one row per logged step, from its latest
    checkpoint's trainer_state.json (JSON; training_args.bin, a pickle, is never read), renamed to metrics.jsonl's
    names where they mean the same; None when ``path`` is not such a folder."""
    checkpoints = sorted((p for p in Path(path).glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                         key=lambda p: _number(p.name))
    if not checkpoints:
        return None
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text()).get("log_history", [])
    rows = [{TRAINER_METRICS.get(k, k): v for k, v in entry.items()} for entry in history if "step" in entry
            and any(k in entry for k in TRAINER_METRICS)]
    return pd.DataFrame(rows) if rows else None


def _hub_revisions(spec: str, revisions: str | list[str]) -> CheckpointSeries:
    """Revisions of a Hub model (Pythia and OLMo publish training steps as branches), in step order; a pattern
    ('step*') is matched against the repository's branches."""
    import fnmatch

    names = [r.strip() for r in (revisions.split(",") if isinstance(revisions, str) else revisions) if r.strip()]
    if any(ch in name for name in names for ch in "*?["):
        from huggingface_hub import list_repo_refs

        try:
            branches = [b.name for b in list_repo_refs(spec).branches]
        except Exception as error:  # the Hub client raises many types offline or for a bad id
            raise IPolicyError(f"Could not list the revisions of '{spec}' on the Hub ({str(error).splitlines()[0]}). "
                               "Fix: check the id and your network, or give `revisions` by name.") from None
        names = sorted({b for b in branches for pattern in names if fnmatch.fnmatch(b, pattern)})
        if not names:
            raise IPolicyError(f"No branch of '{spec}' matches `revisions` {revisions!r}. Fix: check the pattern.")
    steps = [(_number(name), name) for name in names]
    if any(step is None for step, _ in steps):
        raise IPolicyError(f"`revisions` {revisions!r}: every revision must carry a step number (step1000). Fix: name them.")
    return CheckpointSeries("hub-revisions", [Checkpoint(step, f"{Path(spec).name}@{name}", spec, revision=name,
                                                         source=f"{spec}@{name}") for step, name in sorted(steps)])
