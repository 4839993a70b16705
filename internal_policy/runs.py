"""Every folder layout ipolicy writes or reads, in one place.

Entropy results (``ipolicy entropy --out DIR``), ``EntropyFolder``::

    samples.jsonl     the analysed samples, with their (given or generated) responses
    tokens.parquet    one row per analysed token x layer x module
    summary.csv       one row per layer x module
    refinement.csv    with refine_layer: one row per higher layer
    manifest.json     model, revision, dtype, norm mode, data, seed, versions, timings, and the run's fingerprint
    entropy_flow.png, entropy_change.png
    .partial/         shards of finished batches while a run is in progress (removed when it completes)
    checkpoints/NN-LABEL/   across checkpoints: one entropy folder per model

Training runs (``ipolicy train-* --out DIR``), ``RunFolder``::

    run.json                 base model, configuration, internal layer
    metrics.jsonl            one line per step
    checkpoints/step-N/      a save_pretrained folder (safetensors, tokenizer) + the trainer state (rl/checkpoint.py)

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
    out = out.absolute()
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
        lock.release()


class ResultsFolder:
    """An output folder whose results are fingerprinted (everything that changes the numbers): a rerun with the same
    fingerprint resumes, a different one is refused unless ``overwrite``.

    ``outputs`` are the files (or folders) a run writes, removed by ``overwrite``; ``manifest`` is the one of them
    that records the fingerprint of a finished run."""

    outputs: tuple[str, ...] = ()
    manifest_name = "manifest.json"

    def __init__(self, out: Path, fingerprint: dict, overwrite: bool = False):
        self.out = Path(out)
        self.partial = self.out / ".partial"
        self.manifest = self.out / self.manifest_name
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        if overwrite and self.out.exists():
            for name in self.outputs:
                path = self.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            shutil.rmtree(self.partial, ignore_errors=True)
        self._check_fingerprint()

    def start(self) -> None:
        """Create the folder and record the fingerprint: called just before the first result is written, so that a
        run that fails earlier (bad model, bad data) leaves nothing behind."""
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

    def write_manifest(self, manifest: dict) -> None:
        """Record the finished run (with its fingerprint) and drop the in-progress state."""
        atomic_write_json(self.manifest, {**manifest, "fingerprint": self.fingerprint})
        shutil.rmtree(self.partial, ignore_errors=True)


class EntropyFolder(ResultsFolder):
    """The results folder of an entropy run: each finished batch is an atomic parquet shard, merged at the end."""

    outputs = ("samples.jsonl", "tokens.parquet", "summary.csv", "refinement.csv", "manifest.json")

    @property
    def samples_path(self) -> Path:
        return self.out / "samples.jsonl"

    def _shards(self) -> list[Path]:
        return sorted(self.partial.glob("batch-*.parquet"))

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
        if self.manifest.is_file() and (self.out / "tokens.parquet").is_file():
            done |= set(pd.read_parquet(self.out / "tokens.parquet", columns=["sample_index"])["sample_index"])
        for indices in self._shard_samples().values():
            done |= indices
        return {int(i) for i in done}

    def add_shard(self, table: pd.DataFrame, process: int | None = None) -> None:
        """Write one finished batch; ``process``: this process's index in a data-parallel run (its own shard names)."""
        self.start()
        first = int(table["sample_index"].min())
        prefix = "batch-" if process is None else f"batch-p{process:03d}-"
        name = f"{prefix}{len(list(self.partial.glob(prefix + '[0-9]*.parquet'))):05d}-{first:06d}.parquet"
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), FINGERPRINT_KEY: self._fingerprint_hash})
        atomic_write(self.partial / name, lambda tmp: pq.write_table(arrow, tmp))

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

    @staticmethod
    def model_subfolder(out: Path, index: int, label: str) -> Path:
        """Across checkpoints: the entropy folder of the ``index``-th model (labelled ``label``) under ``out``."""
        return Path(out) / "checkpoints" / f"{index:02d}-{label}"

    def finish(self, summary: pd.DataFrame, manifest: dict, refinement: pd.DataFrame | None = None) -> None:
        atomic_write(self.out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
        if refinement is not None:
            atomic_write(self.out / "refinement.csv", lambda tmp: refinement.to_csv(tmp, index=False))
        self.write_manifest(manifest)


def _file_name(text: str) -> str:
    """A readable, unique file-name part for a model label or dataset spec: its last path part, and a short hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name).strip("_.")[:60]
    return f"{readable}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


class EvalFolder(ResultsFolder):
    """The folder of an evaluation: one responses file per (model, dataset), written whole when that pair is done."""

    outputs = ("responses", "problems.csv", "summary.csv", "summary.json")
    manifest_name = "summary.json"

    def responses_path(self, model_label: str, dataset: str) -> Path:
        return self.out / "responses" / f"{_file_name(model_label)}--{_file_name(dataset)}.jsonl"

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
        return self.metrics_path.is_file() or (self.path / "checkpoints").is_dir()

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

    def label(self) -> str:
        """'GRPO seed S' or 'BuPO seed S', for figures that compare runs."""
        info = self.info()
        config = info.get("config", {})
        method = "BuPO" if info.get("internal_layer") and config.get("internal_steps") else "GRPO"
        return f"{method} seed {config.get('seed', self.path.name)}"


def run_checkpoints(spec: str) -> list[tuple[str, int, str]]:
    """(label, step, model) for a model spec, or for a training run folder its base model (step 0, from run.json) and
    every ``checkpoints/step-N`` in step order."""
    path = Path(spec)
    run = RunFolder(path)
    if not (path / "checkpoints").is_dir():
        is_checkpoint = path.name.startswith("step-") and path.name[5:].isdigit()
        step = int(path.name[5:]) if is_checkpoint else 0
        if is_checkpoint and path.parent.name == "checkpoints":  # RUN/checkpoints/step-N -> "RUN-step-N"
            return [(f"{path.parent.parent.name}-{path.name}", step, spec)]
        return [(path.name if path.exists() else spec, step, spec)]
    checkpoints = run.checkpoints()
    if not checkpoints:
        raise IPolicyError(f"Run folder '{spec}' has no checkpoints/step-N. Fix: train with `save_every`, or pass a model.")
    base_model = run.info().get("base_model")
    base = [(f"{path.name}-step-0", 0, base_model)] if base_model else []
    return base + [(f"{path.name}-{c.name}", int(c.name[5:]), str(c)) for c in checkpoints]
