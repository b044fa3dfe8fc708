"""How every command declares its options: a table of Option entries, turned into argparse flags
by add_options, so that all commands read and behave alike (flags spelled --name-with-hyphens
after mlx-lm's where the idea is the same, defaults shown in --help). Options several commands
share are declared once here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..loading import DTYPES


@dataclass(frozen=True)
class Option:
    name: str
    """The argparse dest and, for lora, the config-file key."""
    default: Any
    help: str
    type: Optional[Callable] = None
    """None: a switch (on when given)."""
    choices: tuple = ()
    flags: tuple = ()
    """The flag spellings; default: --name-with-hyphens."""
    required: bool = False
    repeatable: bool = False
    """Given once per value (--stop a --stop b): the value is a list."""

    @property
    def flag(self) -> str:
        return (self.flags or ("--" + self.name.replace("_", "-"),))[0]


def add_options(parser: argparse.ArgumentParser, options, defaults: bool = True) -> None:
    """One flag per option. defaults=False leaves every default None, so that a later layer
    (lora's config file) can tell a flag given from one left out."""
    for option in options:
        flags = option.flags or (option.flag,)
        default = option.default if defaults else None
        shown = "" if option.default in (None, False, ()) else f" (default: {option.default})"
        if option.type is None:
            parser.add_argument(*flags, dest=option.name, action="store_true",
                                default=default, help=option.help)
        elif option.repeatable:
            parser.add_argument(*flags, dest=option.name, type=option.type, action="append",
                                default=[] if defaults else None, help=option.help)
        else:
            parser.add_argument(*flags, dest=option.name, type=option.type,
                                choices=option.choices or None, required=option.required,
                                default=default, help=option.help + shown)


def dtype_option(help: str) -> Option:
    return Option("dtype", None, help, str, tuple(DTYPES))


def output_options(output: str) -> tuple:
    """--force and --quiet, for a command that writes `output`."""
    return (Option("force", False, f"replace an existing {output} (only one this tool wrote)"),
            Option("quiet", False, "no progress bars"))
