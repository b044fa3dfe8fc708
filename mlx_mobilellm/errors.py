"""The error types for bad user input (files, tensors, config fields, parameters)."""

from typing import Callable


def _printable(text: str) -> str:
    """Control characters escaped (a newline as \\n, ESC as \\x1b): messages quote names and
    values from untrusted files, and must stay one line that cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class CheckpointError(ValueError):
    """Bad input: the message names the file / tensor / field and says what would fix it.
    Command-line entry points print it as one line and exit non-zero."""

    def __init__(self, message: str = "", *args):
        super().__init__(_printable(str(message)), *args)


class ParameterError(CheckpointError):
    """Bad input through a parameter of a library function. `describe(name)` writes the message,
    calling name(parameter) wherever it names one: the library's message names the parameters
    (`q_group_size`), the command line's their flags (`--q-group-size`)."""

    def __init__(self, describe: Callable[[Callable[[str], str]], str]):
        self.describe = describe
        super().__init__(describe(lambda parameter: parameter))

    def naming(self, name: Callable[[str], str]) -> str:
        return _printable(self.describe(name))
