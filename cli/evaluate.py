"""``ipolicy eval``: one call of ``internal_policy.evaluate``, then the summary table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def evaluate(
    options: dict,
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Writes responses/, problems.csv, summary.csv, "
                             "summary.json. Rerunning into it resumes: finished (model, dataset) pairs are not sampled "
                             "again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of a different evaluation in --out "
                                   "instead of refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Avg@n and unbiased pass@k per model and dataset, with per-problem details.

    Definitions: https://ipolicy.readthedocs.io/en/latest/definitions/#6-evaluation
    """
    import internal_policy as ip

    config = ip.EvalConfig(**options)
    summary = ip.evaluate(config, out=out, progress=not quiet, overwrite=overwrite).summary
    table = Table(title=f"Avg@{config.n} and pass@k", title_style="bold")
    for column in summary.columns:
        table.add_column(str(column), justify="right")
    for row in summary.itertuples(index=False):
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)
