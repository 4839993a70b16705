"""``ipolicy entropy``: one call of ``internal_policy.analyse`` (or ``compare`` for several models), then a table."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def entropy(
    options: dict,
    run: list[Path] = typer.Option([], "--run", help="A training run folder: its base model and every checkpoints/step-N, "
                                   "on the same samples (the same as passing it to --model). Repeatable."),
    out: Path = typer.Option(Path("runs/entropy"), "--out", "-o", help="Output folder. Rerunning into it resumes; "
                             "finished samples are not recomputed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of a different run in --out instead of "
                                   "refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Layer-wise and module-wise internal policy entropy over a dataset, and what each internal policy predicts.

    Writes summary.csv, tokens.parquet, predictions.parquet, manifest.json, samples.jsonl and the figures
    entropy_flow.png (Fig. 2) and entropy_change.png (Fig. 3) to --out, then prints the table and the boundary layer.

    Every number is defined at https://ipolicy.readthedocs.io/en/latest/definitions/ and what --fast and --top-k cost
    is measured at https://ipolicy.readthedocs.io/en/latest/performance/
    """
    import internal_policy as ip
    from internal_policy.config import DEFAULT_MODEL

    given = options.pop("model")
    models = [str(r) for r in run] + (given if not run or given != [DEFAULT_MODEL] else [])
    config = ip.EntropyConfig(model=models[0], **options)
    progress = not quiet and sys.stderr.isatty()
    if len(models) == 1:
        result = ip.analyse(config, out=out, overwrite=overwrite, progress=progress)
    else:
        result = ip.compare(models, config, out=out, overwrite=overwrite, progress=progress)
    if "checkpoint" in result.summary:
        summary = result.summary[result.summary["checkpoint"] == result.last_checkpoint]
        Console().print(f"{len(result.manifest['models'])} models/checkpoints on the same samples; the last one, "
                        f"{result.last_checkpoint}:")
        print_summary(summary, result.boundary, config.boundary_tolerance)
        Console().print(f"Results: [bold]{result.out}[/] (summary.csv and tokens.parquet with step and checkpoint columns)")
        return
    print_summary(result.summary, result.boundary, config.boundary_tolerance)
    Console().print(f"{run_line(result.manifest)} Results: [bold]{result.out}[/]")


def run_line(manifest: dict) -> str:
    """What the run did, in one sentence: its tokens, its time and, where it resumed, what was analysed anew."""
    timings, n_tokens = manifest["timings"], manifest["n_tokens"]
    skipped = manifest.get("skipped_samples") or []
    done = (f"{n_tokens} tokens x {manifest['n_layers']} layers in {timings['total_s']:.1f} s"
            + (f" ({len(skipped)} sample(s) with no response token skipped: {', '.join(skipped[:3])})" if skipped else ""))
    analysed = timings["analysed_tokens"]
    if analysed == 0:
        return f"{done}: all were analysed by an earlier run in this folder, and the results are rebuilt from what it saved."
    resumed = f", {n_tokens - analysed} of them resumed from an earlier run" if analysed < n_tokens else ""
    return (f"{done}{resumed} (the analysis itself: {analysed} tokens in {timings['analyse_s']:.1f} s, "
            f"{timings['tokens_per_second']:.1f} tokens/s).")


def print_summary(summary, boundary: int | None, tolerance: float) -> None:
    """The per-layer table: input entropy, ΔH of attention, FFN and layer (coloured by sign), output entropy."""
    table = Table(title="Internal policy entropy (nats, token means)", title_style="bold")
    for column in ("layer", "H(h_{l-1})", "ΔH attn", "ΔH ffn", "ΔH layer", "H(h_l)"):
        table.add_column(column, justify="right")
    rows = summary.set_index(["layer", "module"])

    def signed(value: float) -> str:
        color = "green" if value > tolerance else "red" if value < -tolerance else "white"
        return f"[{color}]{value:+.3f}[/]"

    for layer in sorted(summary["layer"].unique()):
        table.add_row(
            str(layer),
            f"{rows.loc[(layer, 'layer'), 'entropy_in_mean']:.3f}",
            signed(rows.loc[(layer, "attn"), "delta_mean"]),
            signed(rows.loc[(layer, "ffn"), "delta_mean"]),
            signed(rows.loc[(layer, "layer"), "delta_mean"]),
            f"{rows.loc[(layer, 'layer'), 'entropy_out_mean']:.3f}",
        )
    Console().print(table)
    if boundary is None:
        Console().print(f"Boundary layer: none (no FFN layer raises entropy by more than {tolerance} nats).")
    else:
        Console().print(
            f"Boundary layer: [bold]{boundary}[/] (last layer of the first run with mean FFN ΔH > {tolerance} nats)."
        )
