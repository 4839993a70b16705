"""``ipolicy view``: one call of ``EntropyResult.view``, the interactive per-token view of a results folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def view(
    result: Path = typer.Argument(..., metavar="RESULT", help="A results folder of `ipolicy entropy` (one model, or "
                                  "across checkpoints)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML file to write, or a folder for "
                                  "view.html (default: RESULT/view.html)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="How many samples the page holds, the first ones "
                                          "(default: 8; across checkpoints, 8 sample-checkpoints)."),
):
    """The interactive per-token view of a results folder: one self-contained HTML page that needs no network.

    The response tokens against the layers, coloured by the entropy of a chosen policy (layer, attention or FFN
    output) or its ΔH; hovering a cell shows that policy's top-k tokens and the sampled token's probability and rank.
    """
    import internal_policy as ip

    path = ip.EntropyResult.load(result).view(out or result, samples=samples)
    Console().print(f"View: [bold]{path}[/] ({path.stat().st_size / 1e6:.1f} MB); open it in a browser.")
