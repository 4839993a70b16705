"""``ipolicy figures``: one call of ``internal_policy.figures_from_results``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def figures(
    results: list[Path] = typer.Argument(..., metavar="RESULT", help="Result folders: `ipolicy entropy` outputs, training runs, "
                                         "`ipolicy eval` outputs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where the figures go (PNG and PDF); default: a new "
                                       "folder runs/figures-YYYYMMDD-HHMMSS."),
):
    """The paper's figures from stored results.

    Entropy flow, ΔH, dynamics across checkpoints (several runs side by side, and the refined layer's entropy and ΔH
    per checkpoint), training curves, feature refinement and pass@k, as PNG and PDF.
    """
    import internal_policy as ip

    out = out or Path("runs") / datetime.now().strftime("figures-%Y%m%d-%H%M%S")
    for path in ip.figures_from_results(results, out):
        Console().print(str(path))
