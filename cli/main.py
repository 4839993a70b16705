"""``ipolicy``: look inside a language model's policy and train it from the inside out."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from internal_policy.errors import IPolicyError
from internal_policy.models import DEFAULT_MODEL

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


ON_INTERRUPT = {  # what Ctrl-C leaves behind, per command
    "entropy": "finished batches are kept; rerun the same command to resume.",
    "eval_command": "finished (model, dataset) pairs are kept; rerun the same command to resume.",
    "train_bupo": "the checkpoints written so far are kept; rerun the same command with --resume to continue.",
}
ON_INTERRUPT["train_grpo"] = ON_INTERRUPT["train_bupo"]


def friendly_errors(command):
    """Bad input becomes one red line on stderr and exit code 2; no traceback. Ctrl-C exits 130 with what was kept."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except IPolicyError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            kept = ON_INTERRUPT.get(command.__name__, "nothing was written half-way.")
            console.print(f"[yellow]interrupted:[/] {kept}")
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
    model: list[str] = typer.Option([DEFAULT_MODEL], "--model", "-m", help="Hub id (Qwen/Qwen3-4B), local HF folder, .gguf file, or the embedded 'smollm2-135m-instruct'. Repeat to compare models on the same samples."),
    run: list[Path] = typer.Option([], "--run", help="A training run folder: its base model and every checkpoints/step-N, on the same samples. Repeatable."),
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
    rollouts: str = typer.Option("transformers", help="Engine that generates the responses: transformers (generate), or vllm where installed (much faster on a GPU; it runs before the model is loaded)."),
    refine_layer: Optional[int] = typer.Option(None, help="Also write refinement.csv: cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) of this layer k against every higher layer j."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of a different run in --out instead of refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Layer-wise and module-wise internal policy entropy (docs/definitions.md §1–2) over a dataset.

    Writes summary.csv, tokens.parquet, manifest.json, samples.jsonl and the figures entropy_flow.png (Fig. 2) and
    entropy_change.png (Fig. 3) to --out, then prints the table and the boundary layer.
    """
    _quiet_libraries()
    from internal_policy.entropy_run import EntropyRunConfig, run_entropy, run_entropy_checkpoints

    models = [str(r) for r in run] + (model if not run or model != [DEFAULT_MODEL] else [])
    config = EntropyRunConfig(
        model=models[0], data=data, refine_layer=refine_layer, limit=limit, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, norm_mode=norm_mode, fast=fast, dtype=dtype, device=device, device_map=device_map,
        revision=revision, trust_remote_code=trust_remote_code, batch_tokens=batch_tokens, rollouts=rollouts,
    )
    progress = not quiet and sys.stderr.isatty() or None
    if len(models) == 1 and not run:
        result = run_entropy(config, out, overwrite=overwrite, progress=progress)
    else:
        result = run_entropy_checkpoints(models, config, out, overwrite=overwrite, progress=progress)
        last = result.summary[result.summary["step"] == result.summary["step"].max()]
        Console().print(f"{len(result.manifest['models'])} models/checkpoints on the same samples; the last one:")
        print_summary(last, result.boundary, config.boundary_tolerance)
        Console().print(f"Results: [bold]{result.out}[/] (summary.csv and tokens.parquet with step and checkpoint columns)")
        return
    print_summary(result.summary, result.boundary, config.boundary_tolerance)
    timings = result.manifest["timings"]
    Console().print(
        f"{result.manifest['n_tokens']} tokens x {result.manifest['n_layers']} layers in {timings['total_s']:.1f} s "
        f"({timings['tokens_per_second']:.1f} tokens/s analysed). Results: [bold]{result.out}[/]"
    )


def train_bupo(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Base model: Hub id, folder, .gguf file or the embedded model."),
    data: str = typer.Option("arithmetic", "--data", "-d", help="Training prompts with ground truths: 'arithmetic', .jsonl/.parquet (verl layout or prompt + answer), or a Hub dataset."),
    data_limit: Optional[int] = typer.Option(None, help="Use only the first N rows (built-in task: N problems, default 8)."),
    reward: str = typer.Option("math", help="'math' (last \\boxed{} vs ground truth, math-verify), FILE.py:FUNCTION or module:function called as fn(prompt, response, ground_truth) -> float."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder: checkpoints/step-N/, metrics.jsonl, run.json."),
    internal_layer: str = typer.Option("auto", help="BuPO's K (1-based, < number of layers), or 'auto': the boundary layer measured on the first rollouts."),
    internal_steps: int = typer.Option(2, help="BuPO's S: optimise the layer-K policy for steps 1..S, then the full policy."),
    steps: int = typer.Option(10, help="Optimisation steps (each: rollouts, then PPO epochs)."),
    prompts_per_step: int = typer.Option(4, help="Prompts per step."),
    group_size: int = typer.Option(8, help="Responses per prompt (G)."),
    mini_batch_prompts: Optional[int] = typer.Option(None, help="Prompts per optimiser step, over all processes (default: all prompts of the step)."),
    micro_batch_size: int = typer.Option(8, help="Sequences per forward/backward (gradient accumulation)."),
    ppo_epochs: int = typer.Option(1, help="Passes over each step's rollouts."),
    lr: float = typer.Option(1e-6, help="AdamW learning rate (the paper: 1e-6)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient-norm clipping."),
    clip_low: float = typer.Option(0.2, help="eps_low of the clipped ratio."),
    clip_high: float = typer.Option(0.2, help="eps_high of the clipped ratio."),
    no_std_scaling: bool = typer.Option(False, "--no-std-scaling", help="Advantages R - mean(R), without dividing by std."),
    kl_coef: float = typer.Option(0.0, help="k3 KL penalty to the frozen base model (0 = none, the paper's)."),
    entropy_coef: float = typer.Option(0.0, help="Entropy bonus (0 = none, the paper's)."),
    max_new_tokens: int = typer.Option(256, help="Rollout length limit."),
    temperature: float = typer.Option(1.0, help="Rollout temperature; log-probs are divided by it."),
    top_p: float = typer.Option(1.0, help="Rollout top-p."),
    monitor_layer: Optional[int] = typer.Option(None, help="Layer whose policy entropy is logged as internal_entropy (default: K, or round(L/6) for GRPO)."),
    seed: int = typer.Option(0, help="Seed of data order, rollouts and initialisation."),
    save_every: int = typer.Option(10, help="Write checkpoints/step-N every N steps (and at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint (same data order and RNG)."),
    dtype: str = typer.Option("auto", help="Weights: auto (= float32 master weights), float32, bfloat16 (updates near lr 1e-6 vanish in bfloat16)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    autocast: Optional[bool] = typer.Option(None, "--autocast/--no-autocast", help="bfloat16 autocast of forwards and rollouts (default: on a GPU, off on the CPU)."),
    rollouts: str = typer.Option("transformers", help="Rollout engine: transformers (generate) or vllm (a GPU with vllm and trl installed; colocated, weights pushed every step)."),
    vllm_gpu_memory: float = typer.Option(0.3, help="--rollouts vllm: the fraction of GPU memory vLLM reserves (weights and KV cache); the rest stays for training."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log to OUT/tensorboard."),
    wandb: bool = typer.Option(False, "--wandb", help="Also log to Weights & Biases."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """BuPO (docs/definitions.md §5): GRPO on the internal layer policy pi(h_K) for --internal-steps steps, then on the full policy."""
    _quiet_libraries()
    from internal_policy.rl.trainer import TrainConfig, train

    config = TrainConfig(
        model=model, data=data, data_limit=data_limit, reward=reward, steps=steps, prompts_per_step=prompts_per_step,
        group_size=group_size, mini_batch_prompts=mini_batch_prompts, micro_batch_size=micro_batch_size,
        ppo_epochs=ppo_epochs, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, clip_low=clip_low,
        clip_high=clip_high, scale_std=not no_std_scaling, kl_coef=kl_coef, entropy_coef=entropy_coef,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, save_every=save_every,
        internal_layer=_layer_option(internal_layer), internal_steps=internal_steps, monitor_layer=monitor_layer,
        dtype=dtype, device=device, autocast=autocast, rollouts=rollouts, vllm_gpu_memory=vllm_gpu_memory, tensorboard=tensorboard, wandb=wandb,
    )
    rows = train(config, out, resume=resume, progress=not quiet)
    if rows:
        last = rows[-1]
        Console().print(f"step {last['step']}: reward {last['reward_mean']:.3f}, accuracy {last['accuracy']:.3f}, "
                        f"entropy {last['entropy']:.3f}. Run: [bold]{out}[/]")


def _layer_option(value: str | None):
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise IPolicyError(f"--internal-layer must be a layer number or 'auto', got '{value}'.") from None


def _grpo_from_bupo():
    """train-grpo is train-bupo without the internal phase: the same options, minus K and S."""
    signature = inspect.signature(train_bupo)
    params = [p for name, p in signature.parameters.items() if name not in ("internal_layer", "internal_steps")]

    def train_grpo(**kwargs):
        return train_bupo(internal_layer=None, internal_steps=0, **kwargs)

    train_grpo.__signature__ = signature.replace(parameters=params)
    train_grpo.__annotations__ = {k: v for k, v in train_bupo.__annotations__.items() if k in signature.parameters
                                  and k not in ("internal_layer", "internal_steps")}
    train_grpo.__doc__ = "GRPO (docs/definitions.md §4): group-normalised advantages and the clipped surrogate on the full policy."
    return train_grpo


app.command("train-bupo")(friendly_errors(train_bupo))
app.command("train-grpo")(friendly_errors(_grpo_from_bupo()))


@app.command("eval")
@friendly_errors
def eval_command(
    model: list[str] = typer.Option([DEFAULT_MODEL], "--model", "-m", help="Model(s) or training run folder(s) (base + every checkpoint); repeat the option."),
    data: list[str] = typer.Option(["arithmetic"], "--data", "-d", help="Dataset(s) with ground truths; repeat the option."),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Writes responses/, problems.csv, summary.csv, summary.json. Rerunning into it resumes: finished (model, dataset) pairs are not sampled again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of a different evaluation in --out instead of refusing."),
    n: int = typer.Option(16, "--n", help="Responses per problem; Avg@n is their mean accuracy (the paper: 16, 32 for AIME)."),
    k: list[int] = typer.Option([1], "--k", help="pass@k values (unbiased estimator, k <= n); repeat the option."),
    limit: Optional[int] = typer.Option(None, help="First N problems of each dataset."),
    max_new_tokens: int = typer.Option(1024, help="Response length limit."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    top_p: float = typer.Option(1.0, help="Sampling top-p."),
    reward: str = typer.Option("math", help="'math' or FILE.py:FUNCTION; a response is correct when it scores >= 1."),
    seed: int = typer.Option(0, help="Sampling seed."),
    dtype: str = typer.Option("auto", help="Model dtype."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    rollouts: str = typer.Option("transformers", help="Sampling engine: transformers (generate), or vllm where installed (much faster on a GPU)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Avg@n and unbiased pass@k (docs/definitions.md §6) per model and dataset, with per-problem details."""
    _quiet_libraries()
    from internal_policy.evaluation import EvalConfig, evaluate

    config = EvalConfig(n=n, k=tuple(k), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        limit=limit, reward=reward, dtype=dtype, device=device, rollouts=rollouts)
    summary = evaluate(model, data, config, out, progress=not quiet, overwrite=overwrite)
    table = Table(title=f"Avg@{n} and pass@k", title_style="bold")
    for column in summary.columns:
        table.add_column(str(column), justify="right")
    for row in summary.itertuples(index=False):
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)


@app.command()
@friendly_errors
def figures(
    results: list[Path] = typer.Argument(..., help="Result folders: `ipolicy entropy` outputs, training runs, `ipolicy eval` outputs."),
    out: Path = typer.Option(Path("figures"), "--out", "-o", help="Where the figures go (PNG and PDF)."),
):
    """The paper's figures from stored results: entropy flow, ΔH, dynamics across checkpoints, training curves,
    feature refinement and pass@k."""
    _quiet_libraries()
    from internal_policy.figures import figures_from_results

    for path in figures_from_results(results, out):
        Console().print(str(path))


if __name__ == "__main__":
    app()
