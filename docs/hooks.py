"""MkDocs hooks of the documentation site.

* The reference pages are generated from the code, so they cannot drift from it: the command line from the Typer app
  (every option of every command, with its default and help, as ``ipolicy COMMAND --help`` shows it) and the Python
  API from ``internal_policy.__all__`` (each name's docstring, through mkdocstrings).
* The figures are served from where they are made (``figures/``, ``benchmarks/results/``, ``docs/images/``), not
  copied by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a docs-only build (Read the Docs) reads the code from the checkout
    sys.path.insert(0, str(ROOT))
ASSETS = {"figures": ROOT / "figures", "benchmarks": ROOT / "benchmarks" / "results"}
CLI_MARKER = "<!-- cli-reference -->"
API_MARKER = "<!-- python-api -->"


def on_files(files, config):
    from mkdocs.structure.files import File

    for prefix, folder in ASSETS.items():
        for path in sorted(folder.glob("*.png")):
            files.append(File.generated(config, f"{prefix}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, python_reference())
    return markdown


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cli_commands() -> dict:
    """command name -> the click command Typer builds for it."""
    import typer.main

    try:
        from ipolicy_cli.main import app
    except ImportError:  # not installed: the cli/ folder of the checkout
        from cli.main import app

    return dict(typer.main.get_command(app).commands)


def option_names(param) -> list[str]:
    """The flags an option answers to (--out, -o; --std-scaling, --no-std-scaling), or an argument's name."""
    names = [*param.opts, *param.secondary_opts]
    return names if param.param_type_name == "option" else [(param.metavar or param.name).upper()]


def cli_reference() -> str:
    """One section per command: what it does, its usage, and a table of every argument and option."""
    out = []
    for name, command in sorted(cli_commands().items()):
        out += [f"## `ipolicy {name}`", "", " ".join((command.help or "").split()), ""]
        out += ["| option | default | meaning |", "| --- | --- | --- |"]
        for param in command.params:
            default = "" if param.param_type_name == "argument" or param.default in (None, (), []) else param.default
            if isinstance(default, (list, tuple)):
                default = ", ".join(map(str, default))
            required = " (required)" if param.required else ""
            flags = ", ".join(f"`{n}`" for n in option_names(param))
            out.append(f"| {flags} | {_cell(default)} | {_cell(getattr(param, 'help', '') or '')}{required} |")
        out += [f"| `--help` | | Show this message and exit. |", ""]
    return "\n".join(out)


def python_reference() -> str:
    """Every public name of ``internal_policy`` (its ``__all__``), rendered from its docstring."""
    import internal_policy

    out = []
    for name in internal_policy.__all__:
        if name == "__version__":
            out += ["### `ip.__version__`", "", "The installed version of ipolicy.", ""]
            continue
        module = internal_policy._EXPORTS[name]
        out += [f"::: internal_policy.{module}.{name}", ""]
    return "\n".join(out)
