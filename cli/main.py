"""``ipolicy``: look inside a language model's policy and train it from the inside out."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from internal_policy.errors import IPolicyError
from internal_policy.loading import DEFAULT_MODEL

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Internal policy entropy of causal LMs (layer-wise and module-wise), and GRPO/BuPO training.",
)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """Internal policy entropy of causal LMs (layer-wise and module-wise), and GRPO/BuPO training."""


def friendly_errors(command):
    """Bad input becomes one red line on stderr and exit code 2; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except IPolicyError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/] finished batches are kept; rerun the same command to resume.")
            raise typer.Exit(130)

    return wrapper


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "transformer_lens", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def print_summary(summary, boundary, tolerance: float) -> None:
    table = Table(title="Internal policy entropy (nats, token means)", title_style="bold")
    for column in ("layer", "H(h_{l-1})", "ΔH attn", "ΔH ffn", "ΔH layer", "H(h_l)"):
        table.add_column(column, justify="right")
    rows = summary.set_index(["layer", "module"])
    for layer in sorted(summary["layer"].unique()):
        def fmt(value):
            color = "green" if value > tolerance else "red" if value < -tolerance else "white"
            return f"[{color}]{value:+.3f}[/]"

        table.add_row(
            str(layer),
            f"{rows.loc[(layer, 'layer'), 'entropy_in_mean']:.3f}",
            fmt(rows.loc[(layer, "attn"), "delta_mean"]),
            fmt(rows.loc[(layer, "ffn"), "delta_mean"]),
            fmt(rows.loc[(layer, "layer"), "delta_mean"]),
            f"{rows.loc[(layer, 'layer'), 'entropy_out_mean']:.3f}",
        )
    Console().print(table)
    if boundary is None:
        Console().print(f"Boundary layer: none (no FFN layer raises entropy by more than {tolerance} nats).")
    else:
        Console().print(
            f"Boundary layer: [bold]{boundary}[/] (last layer of the first run with mean FFN ΔH > {tolerance} nats)."
        )


@app.command()
@friendly_errors
def entropy(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id (Qwen/Qwen3-4B), local HF folder, .gguf file, or the embedded 'smollm2-135m-instruct'."),
    data: str = typer.Option("arithmetic", "--data", "-d", help="'arithmetic' (built-in, seeded), a .jsonl/.parquet file (verl layout or prompt/response/answer rows), or a Hub dataset NAME[:SPLIT]."),
    out: Path = typer.Option(Path("runs/entropy"), "--out", "-o", help="Output folder. Rerunning into it resumes; finished samples are not recomputed."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N rows (built-in task: N prompts, default 8)."),
    samples: int = typer.Option(1, help="Responses generated per prompt (rows without a 'response')."),
    max_new_tokens: int = typer.Option(64, help="Length limit of generated responses, in tokens."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of generated responses (0 = greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold of generated responses."),
    seed: int = typer.Option(0, help="Seed of the built-in task and of generation."),
    norm_mode: str = typer.Option("none", help="'none': pi(x) = softmax(U x), the paper's; 'final': logit lens, softmax(U LNf(x))."),
    fast: bool = typer.Option(False, "--fast", help="bf16 unembedding matmul: ~3x faster on CPU, layer means within ~1e-2 nats (see README)."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N, or auto."),
    device_map: Optional[str] = typer.Option(None, help="Spread a model too big for one GPU with accelerate, e.g. 'auto'."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit) of --model."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the Hub (off by default)."),
    batch_tokens: int = typer.Option(4096, help="Padded tokens per forward pass of the analysis."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of a different run in --out instead of refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Layer-wise and module-wise internal policy entropy (SPEC §1–2) over a dataset.

    Writes summary.csv, tokens.parquet, manifest.json, samples.jsonl and the figures entropy_flow.png (Fig. 2) and
    entropy_change.png (Fig. 3) to --out, then prints the table and the boundary layer.
    """
    _quiet_libraries()
    from internal_policy.analysis import EntropyRunConfig, run_entropy

    config = EntropyRunConfig(
        model=model, data=data, limit=limit, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, norm_mode=norm_mode, fast=fast, dtype=dtype, device=device, device_map=device_map,
        revision=revision, trust_remote_code=trust_remote_code, batch_tokens=batch_tokens,
    )
    result = run_entropy(config, out, overwrite=overwrite, progress=not quiet and sys.stderr.isatty() or None)
    print_summary(result.summary, result.boundary, config.boundary_tolerance)
    timings = result.manifest["timings"]
    Console().print(
        f"{result.manifest['n_tokens']} tokens x {result.manifest['n_layers']} layers in {timings['total_s']:.1f} s "
        f"({timings['tokens_per_second']:.1f} tokens/s analysed). Results: [bold]{result.out}[/]"
    )


if __name__ == "__main__":
    app()
