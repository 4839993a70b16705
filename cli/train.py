"""``ipolicy train-grpo`` / ``train-bupo``: one call of ``internal_policy.train``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from internal_policy.config import DEFINITIONS_URL

GRPO_HELP = ("GRPO: group-normalised advantages and the clipped surrogate on the full policy.\n\n"
             f"Definitions: {DEFINITIONS_URL}#4-grpo")
BUPO_HELP = ("BuPO: GRPO on the internal layer policy pi(h_K) for --internal-steps steps, then on the full policy.\n\n"
             f"Definitions: {DEFINITIONS_URL}#5-bupo")


def train(
    options: dict,
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder: checkpoints/step-N/, metrics.jsonl, "
                             "run.json."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint (same data "
                                "order and RNG)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    import internal_policy as ip

    result = ip.train(ip.TrainConfig(**options), out=out, resume=resume, progress=not quiet)
    if len(result.metrics):
        last = result.metrics.iloc[-1]
        Console().print(f"step {last['step']}: reward {last['reward_mean']:.3f}, accuracy {last['accuracy']:.3f}, "
                        f"entropy {last['entropy']:.3f}. Run: [bold]{out}[/]")
