"""Typer commands derived from the job configs of ``internal_policy.config``: each config field becomes one flag
(``max_new_tokens`` -> ``--max-new-tokens``) with the field's default and help, so an option is declared once."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Any, Callable, Optional

import typer

PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


def flag_of(field: dataclasses.Field) -> str:
    """The flag of a config field: ``--field-name`` unless the field declares its own (``--std-scaling/--no-...``)."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _cli_type(field: dataclasses.Field, hint: Any) -> Any:
    """The type Typer parses: ``int | None`` -> Optional[int], a repeatable tuple[T, ...] -> list[T]."""
    declared = field.metadata.get("cli_type")
    if field.metadata.get("repeatable"):
        return list[typing.get_args(hint)[0]]
    if field.metadata.get("cli_many"):  # one value in the config, several on the command line (compared models)
        return list[hint]
    if declared is not None:
        return Optional[declared] if field.default is None else declared
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return Optional[inner[0]] if len(inner) == 1 else Optional[str]
    return hint


def config_parameters(config_class, exclude: tuple[str, ...] = (), defaults: dict | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per CLI field of ``config_class``, with a ``typer.Option`` default."""
    hints = typing.get_type_hints(config_class)
    defaults = defaults or {}
    parameters = []
    for field in dataclasses.fields(config_class):
        if field.name in exclude or not field.metadata.get("cli", True):
            continue
        default = defaults.get(field.name, field.default if field.default_factory is dataclasses.MISSING
                               else field.default_factory())
        if field.metadata.get("repeatable"):
            default = list(default)
        elif field.metadata.get("cli_many"):
            default = [default]
        names = [flag_of(field)] + ([f"-{field.metadata['short']}"] if field.metadata.get("short") else [])
        option = typer.Option(default, *names, help=field.metadata.get("help", ""), show_default=default is not None)
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=_cli_type(field, hints[field.name])))
    return parameters


def flags(*config_classes) -> dict[str, str]:
    """Parameter name -> flag, for turning a library message's `max_new_tokens` into --max-new-tokens."""
    table = {"out": "--out", "overwrite": "--overwrite", "resume": "--resume"}
    for config_class in config_classes:
        for field in dataclasses.fields(config_class):
            flag = flag_of(field)
            table[field.name] = flag.split("/")[0]
    return table


def as_flags(message: str, table: dict[str, str]) -> str:
    """A library message with its backticked parameter names shown as flags."""
    return PARAMETER.sub(lambda m: table.get(m.group(1), m.group(0)), message)


def command_from_config(run: Callable, config_class, exclude: tuple[str, ...] = (), defaults: dict | None = None,
                        doc: str | None = None) -> Callable:
    """A Typer command whose options are the fields of ``config_class`` followed by ``run``'s own keyword options.

    ``run(options, **own)`` receives the field values as a dict (``options``) and its own options by name."""
    hints = typing.get_type_hints(run)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
           for p in list(inspect.signature(run).parameters.values())[1:]]
    parameters = config_parameters(config_class, exclude, defaults) + own
    fields = {f.name for f in dataclasses.fields(config_class)}

    @functools.wraps(run)
    def command(**kwargs):
        options = {k: v for k, v in kwargs.items() if k in fields}
        return run(options, **{k: v for k, v in kwargs.items() if k not in fields})

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    del command.__wrapped__  # Typer must read the derived signature, not run's
    if doc is not None:
        command.__doc__ = doc
    return command
