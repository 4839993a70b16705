"""Results of the entropy engine: the per-token table, the per-(layer, module) summary, the boundary layer, and the
output folder (atomic files, resumable shards).

Folder layout (``--out DIR``):

    samples.jsonl     the analysed samples, with their (given or generated) responses
    tokens.parquet    long per-token table (one row per sample token x layer x module)
    summary.csv       one row per (layer, module)
    manifest.json     model, revision, dtype, norm mode, data, seed, versions, timings
    entropy_flow.png, entropy_change.png
    .partial/         shards of finished batches while a run is in progress (removed when it completes)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IPolicyError
from .io import atomic_write, atomic_write_json

ENTROPY_OUTPUTS = ("samples.jsonl", "tokens.parquet", "summary.csv", "manifest.json")


class ResultsFolder:
    """An output folder that resumes: each finished batch is an atomic parquet shard; the fingerprint (everything
    that changes the numbers) must match for a rerun to reuse them.

    ``outputs`` are the files (or folders) a run writes, removed by ``overwrite``; ``manifest`` is the one of them
    that records the fingerprint of a finished run."""

    def __init__(self, out: Path, fingerprint: dict, overwrite: bool = False, outputs: tuple[str, ...] = ENTROPY_OUTPUTS,
                 manifest: str = "manifest.json"):
        self.out = Path(out)
        self.partial = self.out / ".partial"
        self.manifest = self.out / manifest
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        if overwrite and self.out.exists():
            for name in outputs:
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
                    "Fix: choose another --out, or add --overwrite to replace them."
                )

    @property
    def samples_path(self) -> Path:
        return self.out / "samples.jsonl"

    def _shards(self) -> list[Path]:
        return sorted(self.partial.glob("batch-*.parquet"))

    def done_sample_indices(self) -> set[int]:
        done: set[int] = set()
        if self.manifest.is_file() and (self.out / "tokens.parquet").is_file():
            done |= set(pd.read_parquet(self.out / "tokens.parquet", columns=["sample_index"])["sample_index"])
        for shard in self._shards():
            done |= set(pd.read_parquet(shard, columns=["sample_index"])["sample_index"])
        return {int(i) for i in done}

    def add_shard(self, table: pd.DataFrame) -> None:
        self.start()
        first = int(table["sample_index"].min())
        name = f"batch-{len(self._shards()):05d}-{first:06d}.parquet"
        atomic_write(self.partial / name, lambda tmp: table.to_parquet(tmp, index=False))

    def combine_tokens(self) -> pd.DataFrame:
        """Merge the shards (and a previous complete tokens.parquet) into tokens.parquet; return the table."""
        sources = self._shards()
        if (self.out / "tokens.parquet").is_file() and self.manifest.is_file():
            sources = [self.out / "tokens.parquet", *sources]
        tables = [pq.read_table(path) for path in sources]
        if not tables:
            raise IPolicyError(f"No results in '{self.out}'. Fix: rerun the analysis.")
        table = pa.concat_tables(tables, promote_options="default").sort_by(
            [("sample_index", "ascending"), ("layer", "ascending"), ("position", "ascending")]
        )
        atomic_write(self.out / "tokens.parquet", lambda tmp: pq.write_table(table, tmp))
        return table.to_pandas()

    def finish(self, summary: pd.DataFrame, manifest: dict) -> None:
        atomic_write(self.out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
        atomic_write_json(self.manifest, {**manifest, "fingerprint": self.fingerprint})
        shutil.rmtree(self.partial, ignore_errors=True)


def run_checkpoints(spec: str) -> list[tuple[str, int, str]]:
    """(label, step, model) for a model spec, or for a training run folder its base model (step 0, from run.json) and
    every ``checkpoints/step-N`` in step order."""
    path = Path(spec)
    if not (path / "checkpoints").is_dir():
        is_checkpoint = path.name.startswith("step-") and path.name[5:].isdigit()
        step = int(path.name[5:]) if is_checkpoint else 0
        if is_checkpoint and path.parent.name == "checkpoints":  # RUN/checkpoints/step-N -> "RUN-step-N"
            return [(f"{path.parent.parent.name}-{path.name}", step, spec)]
        return [(path.name if path.exists() else spec, step, spec)]
    checkpoints = sorted(path.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise IPolicyError(f"Run folder '{spec}' has no checkpoints/step-N. Fix: train with --save-every, or pass --model.")
    run = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    base = [(f"{path.name}-step-0", 0, run["base_model"])] if run.get("base_model") else []
    return base + [(f"{path.name}-{c.name}", int(c.name.split("-")[1]), str(c)) for c in checkpoints]
