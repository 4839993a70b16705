"""``ipolicy``: look inside a language model's policy and train it from the inside out.

This module only builds the Typer app; each command lives in its own module and imports the library (torch, the
model stack) only when it runs, so ``ipolicy --help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal

import typer
from rich.console import Console

from internal_policy.config import DEFINITIONS_URL, DOCS_URL, EntropyConfig, EvalConfig, TrainConfig
from internal_policy.errors import IPolicyError

from . import entropy, evaluate, figures, help_style, train, view
from .options import as_flags, command_from_config, flags

help_style.install()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Internal policy entropy of causal LMs (layer-wise and module-wise), what each internal policy predicts, and "
         f"GRPO/BuPO training.\n\nGuide: {DOCS_URL}\n\nDefinitions of every number: {DEFINITIONS_URL}",
)
console = Console(stderr=True)
FLAGS = flags(EntropyConfig, TrainConfig, EvalConfig)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "transformer_lens", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _terminate(signum, frame):
    raise KeyboardInterrupt


def friendly_errors(command, on_interrupt: str = "nothing was written half-way."):
    """Bad input becomes one red line on stderr (parameters shown as flags) and exit code 2, no traceback; Ctrl-C
    exits 130 saying what was kept (``on_interrupt``)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            quiet_libraries()
            # a SIGTERM (a scheduler's kill, `kill PID`) ends the run as Ctrl-C does: locks released, one line
            signal.signal(signal.SIGTERM, _terminate)
            return command(*args, **kwargs)
        except IPolicyError as error:
            console.print(f"[bold red]error:[/] {as_flags(str(error), FLAGS)}", highlight=False, soft_wrap=True,
                          markup=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted:[/] {on_interrupt}")
            raise typer.Exit(130)

    return wrapper


RESUME_TRAINING = ("the checkpoints written so far are kept; rerun the same command with --resume to continue from "
                   "the latest (or without --resume to start again, if none was written yet).")



def paragraphs(doc: str) -> str:
    """A docstring as help text: its paragraphs (blank-line separated) each on one line, which rich then wraps to the
    terminal; Typer would keep the docstring's own line breaks mid-sentence."""
    return "\n\n".join(" ".join(part.split()) for part in inspect.cleandoc(doc).split("\n\n"))


def register(name: str, command, on_interrupt: str = "nothing was written half-way.") -> None:
    app.command(name, help=paragraphs(command.__doc__))(friendly_errors(command, on_interrupt))


register("entropy", command_from_config(entropy.entropy, EntropyConfig),
         "finished batches are kept; rerun the same command to resume.")
register("train-bupo", command_from_config(train.train, TrainConfig, doc=train.BUPO_HELP,
                                           defaults={"internal_layer": "auto", "internal_steps": 2}), RESUME_TRAINING)
register("train-grpo", command_from_config(train.train, TrainConfig, exclude=("internal_layer", "internal_steps"),
                                           doc=train.GRPO_HELP), RESUME_TRAINING)
register("eval", command_from_config(evaluate.evaluate, EvalConfig),
         "finished (model, dataset) pairs are kept; rerun the same command to resume.")
register("figures", figures.figures)
register("view", view.view)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"ipolicy {version('ipolicy')}")
        except PackageNotFoundError:  # a source tree that was not installed
            print("ipolicy (not installed)")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Internal policy entropy of causal LMs (layer-wise and module-wise), and GRPO/BuPO training."""


if __name__ == "__main__":
    app()
