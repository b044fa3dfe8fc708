"""How every subcommand runs: bad input (and a failing disk) is one `error:` line on stderr and
exit status 1, never a traceback; usage errors included."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CheckpointError, ParameterError


class ArgumentParser(argparse.ArgumentParser):
    """A usage error is bad input like any other: one `error:` line and exit status 1 (argparse
    prints the usage block and exits with 2)."""

    def error(self, message: str):
        self.exit(1, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def flag_namer(parser: argparse.ArgumentParser, aliases: dict = None):
    """name(parameter) -> the flag that sets it in `parser` (a library parameter of another
    name maps through `aliases`); a parameter no flag sets keeps its name."""
    flags = {action.dest: next(o for o in action.option_strings if o.startswith("--"))
             for action in parser._actions if action.option_strings}
    aliases = aliases or {}
    return lambda parameter: flags.get(aliases.get(parameter, parameter), parameter)


def one_line(error: BaseException, name=None) -> str:
    """The message of an error as a single line (messages from libraries may span several);
    parameters named as `name` (flag_namer) gives them."""
    if isinstance(error, ParameterError) and name is not None:
        return " ".join(error.naming(name).split())
    if isinstance(error, OSError) and error.strerror:
        # The disk, permissions or a vanished file: the environment's failure, said as the OS says it.
        names = [str(n) for n in (error.filename, error.filename2) if n is not None]
        return ": ".join([*names, error.strerror]) if names else error.strerror
    return " ".join(str(error).split())


def _fill_closed_stdin() -> None:
    """With standard input closed, the next file opened gets descriptor 0, and MLX's loaders
    take a file on descriptor 0 for one that failed to open ("truncated or corrupt"). Keep
    descriptor 0 taken by /dev/null; sys.stdin stays None, so commands reading it still see
    it closed."""
    try:
        os.fstat(0)
    except OSError:
        os.open(os.devnull, os.O_RDONLY)


def run_reporting_errors(run, args: argparse.Namespace, name=None) -> int:
    """Run a command; bad input (and a failing disk) becomes one line on stderr and exit status 1,
    naming parameters as `name` (flag_namer) does."""
    _fill_closed_stdin()
    try:
        run(args)
    except (CheckpointError, OSError) as error:
        print(f"error: {one_line(error, name)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
