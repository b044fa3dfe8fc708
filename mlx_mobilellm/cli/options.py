"""Options that several commands share, declared once so that they read and behave alike."""

from __future__ import annotations

import argparse

from ..loading import DTYPES


def add_dtype(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), help=default_help)


def add_output_switches(parser: argparse.ArgumentParser, output: str) -> None:
    """--force and --quiet, for a command that writes `output`."""
    parser.add_argument("--force", action="store_true", help=f"replace an existing {output} "
                        "(only one this tool wrote)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
