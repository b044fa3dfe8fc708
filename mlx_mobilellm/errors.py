"""The error type for bad user input (files, tensors, config fields)."""


def _printable(text: str) -> str:
    """Control characters escaped (a newline as \\n, ESC as \\x1b): messages quote names and
    values from untrusted files, and must stay one line that cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class CheckpointError(ValueError):
    """Bad input: the message names the file / tensor / field and says what would fix it.
    Command-line entry points print it as one line and exit non-zero."""

    def __init__(self, message: str = "", *args):
        super().__init__(_printable(str(message)), *args)
