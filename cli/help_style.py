"""How ``ipolicy``'s help and usage errors look: Typer's rich output, adjusted where it reads badly on a common
terminal. ``install()`` applies it (once, when the app is built)."""

from __future__ import annotations

import re

import rich.markup
import rich.table
import rich.text
import typer.core
import typer.rich_utils
from rich.console import Console

_display_type = typer.core.TyperOption.display_type_rich
_argument_type = typer.core.TyperArgument.display_type_rich


def _one_value_type(shown: str | None) -> str | None:
    return re.sub(r"list\[(\w+)\]", lambda match: match[1].lower(), shown) if shown else shown


def _flag_without_type(self, ctx):
    """A flag (--fast, --overwrite, --help) takes no value: Typer 0.29 would still print it a <bool> type. A repeatable
    option shows the type of one value (<str>, not Python's <list[str]>); its help says it repeats."""
    return None if self.is_flag else _one_value_type(_display_type(self, ctx))


class _OptionsTable(rich.table.Table):
    """Typer's options table with a switch's negative form (--no-autocast) under its positive one in the first column
    instead of a column of its own, which on an 80-column terminal squeezed the flags and defaults into ellipses. On a
    narrow terminal no flag is cut (its column does not wrap), and a word of help wider than its column (a long default)
    folds onto the next line instead of ending in an ellipsis."""

    def add_row(self, *cells, **kwargs):
        if len(cells) < 6:  # the commands panel: name and description
            return super().add_row(*cells, **kwargs)
        *required, long, short, negative, negative_short, kind, help_text = cells
        if str(negative):
            long = rich.text.Text.assemble(long, "\n", negative)
        for part in getattr(help_text, "renderables", [help_text]):  # a word wider than the column folds, not cut
            if isinstance(part, rich.text.Text):
                part.overflow = "fold"
        super().add_row(*required, long, short, negative_short, kind, help_text, **kwargs)
        self.columns[len(required)].no_wrap = True  # Typer's columns appear with the first row


def _one_line_usage_error(error) -> None:
    """A flag Typer cannot parse (--top-k 2.5, an unknown option) answers as the library's errors do: one red line
    with the fix (Typer would print the usage and a boxed message), exit code 2."""
    if type(error).__name__ == "NoArgsIsHelpError":
        return
    ctx = getattr(error, "ctx", None)
    command = " ".join(["ipolicy", *(ctx.command_path.split()[1:] if ctx is not None else [])])  # python -m too
    message = error.format_message().rstrip(".")
    Console(stderr=True).print(f"[bold red]error:[/] {rich.markup.escape(message)}. Fix: see `{command} --help`.",
                               highlight=False, soft_wrap=True)


def install() -> None:
    typer.core.TyperOption.display_type_rich = _flag_without_type
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: _one_value_type(_argument_type(self, ctx))
    typer.rich_utils.Table = _OptionsTable
    typer.rich_utils.rich_format_error = _one_line_usage_error
